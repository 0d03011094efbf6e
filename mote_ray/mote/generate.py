"""MoTEGenerator: the exact token-routed MoTE model on transformers, for a few prompts in-process.

The stage rules are mote/chain.py's (the one chain driver); the engine is the batched reference
(mote/reference.py). Each token is processed by its own stage's expert, as in training, and the
cache keeps those representations across stages (design.md, "Exactness note"). Modes:
  adaptive  the model picks the first stage (any start token) and, after each stage, the next
  direct    <|response|> only;  analysis  analysis -> response;  full  analysis -> guidance -> response
"""

from __future__ import annotations

from typing import Sequence

from mote_ray.mote.chain import DEFAULT_LIMITS, FORCED, ChainSpec, Mode, MoTEOutput, chain, run_chains
from mote_ray.mote.reference import ReferenceEngine
from mote_ray.mote.routing import stage_token_ids

__all__ = ["DEFAULT_LIMITS", "FORCED", "Mode", "MoTEOutput", "MoTEGenerator", "chain_spec"]


def chain_spec(model, tokenizer) -> ChainSpec:
    return ChainSpec(stage_token_ids(tokenizer), tokenizer.eos_token_id, model.config.inference_prompt_expert)


class MoTEGenerator:
    def __init__(self, model, tokenizer, *, max_batch: int = 32):
        self.engine = ReferenceEngine(model, tokenizer, max_batch=max_batch)
        self.tok, self.spec = tokenizer, chain_spec(model, tokenizer)
        self.ids = self.spec.stage_ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def generate(self, prompt_ids: list[int], mode: Mode = "adaptive", limits: dict[str, int] | None = None,
                 temperature: float = 0.0, seed: int | None = None, top_p: float = 1.0) -> MoTEOutput:
        return self.generate_many([prompt_ids], mode, limits, temperature, seed, top_p)[0]

    def generate_many(self, prompts: Sequence[list[int]], mode: Mode = "adaptive", limits: dict[str, int] | None = None,
                      temperature: float = 0.0, seed: int | None = None, top_p: float = 1.0) -> list[MoTEOutput]:
        """All prompts' chains at once: each round is one padded batch on the reference engine."""
        chains = [chain(self.spec, p, self.decode, mode=mode, limits=limits, temperature=temperature, top_p=top_p,
                        seed=seed) for p in prompts]
        return run_chains(self.engine.run, chains)
