"""A trained MoTE model answering many prompts in-process: `mote-ray chat`, evaluation, benchmarks.

`OfflineMoTE(model_dir, engine="auto")` holds the vLLM MoTE engine where vLLM can load the model
(else the batched reference) and answers a list of prompts with the one chain driver: every round
sends all live chains' next stage requests as one batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from mote_ray.mote.chain import Mode, MoTEOutput, chain, run_chains


class OfflineMoTE:
    def __init__(self, model_dir: str | Path, engine: str = "auto", *, max_batch: int = 64, dtype: str | None = None):
        from mote_ray.chat import load_tokenizer
        from mote_ray.models import resolve_model
        from mote_ray.mote.engine import VLLMMoTEEngine, build_with_fallback, chain_spec_for, reference_engine

        self.engine, self.name, self.why = build_with_fallback(
            model_dir, engine, lambda: VLLMMoTEEngine(model_dir, dtype=dtype),
            lambda: reference_engine(model_dir, max_batch=max_batch))
        max_len = self.engine.max_len if self.name == "vllm" else \
            json.loads((Path(model_dir) / "base" / "config.json").read_text()).get("max_position_embeddings")
        self.tok = load_tokenizer(resolve_model(f"{model_dir}/base"))
        self.spec = chain_spec_for(model_dir, self.tok, max_len)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def encode_chat(self, prompt: str) -> list[int]:
        from mote_ray.chat import encode
        from mote_ray.records import GenerationRequest

        return encode(self.tok, GenerationRequest(messages=[{"role": "user", "content": prompt}]))

    def generate_many(self, prompts: Sequence[list[int]], mode: Mode = "adaptive", limits: dict | None = None,
                      temperature: float = 0.0, seed: int | None = None) -> list[MoTEOutput]:
        chains = [chain(self.spec, p, self.decode, mode=mode, limits=limits, temperature=temperature, seed=seed)
                  for p in prompts]
        return run_chains(self.engine.run, chains)

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close:
            close()
