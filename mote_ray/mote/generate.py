"""Reference MoTE generator (transformers): the exact token-routed model with one KV cache.

Each token is processed by its own stage's expert, as in training, and the cache keeps those
representations across stages (design.md, "Exactness note"). The prompt is encoded by
`inference_prompt_expert`, which also emits the first stage token. Modes:
  adaptive  the model picks the first stage (any start token) and, after each stage, the next
  direct    <|response|> only;  analysis  analysis -> response;  full  analysis -> guidance -> response
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from mote_ray.mote.routing import EXPERTS, stage_token_ids

Mode = Literal["adaptive", "direct", "analysis", "full"]
FORCED = {"direct": ["answer"], "analysis": ["analysis", "answer"], "full": ["analysis", "guidance", "answer"]}
DEFAULT_LIMITS = {"analysis": 128, "guidance": 128, "answer": 256}


@dataclass
class MoTEOutput:
    stages: dict[str, str]  # stage -> text, in the order generated
    token_ids: list[int]  # every generated id, stage tokens included
    stage_tokens: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    finish_reason: str = "stop"

    @property
    def answer(self) -> str:
        return self.stages.get("answer", "")


class MoTEGenerator:
    def __init__(self, model, tokenizer):
        self.model, self.tok = model.eval(), tokenizer
        self.ids = stage_token_ids(tokenizer)  # stage -> (start, end)
        self.start_to_stage = {s: st for st, (s, _) in self.ids.items()}
        self.prompt_expert = EXPERTS.index(model.config.inference_prompt_expert)
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], mode: Mode = "adaptive", limits: dict[str, int] | None = None,
                 temperature: float = 0.0, seed: int | None = None, on_token=None) -> MoTEOutput:
        limits = {**DEFAULT_LIMITS, **(limits or {})}
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        plan = list(FORCED.get(mode, []))
        out = MoTEOutput(stages={}, token_ids=[])
        stage, count, t_stage = None, 0, time.perf_counter()
        logits, past = self._forward(prompt_ids, [self.prompt_expert] * len(prompt_ids), None)
        while True:
            if stage is None:  # between stages: only a start token may come next
                allowed = self._next_starts(out, plan, mode)
                if not allowed:
                    break
                token = self._pick(logits, temperature, gen, only=allowed)
                stage, count, t_stage = self.start_to_stage[token], 0, time.perf_counter()
                out.stages[stage] = ""
                if plan:
                    plan.pop(0)
            else:
                end = self.ids[stage][1]
                if count >= limits[stage]:
                    token, out.finish_reason = end, "length" if stage == "answer" else out.finish_reason
                else:
                    banned = [t for pair in self.ids.values() for t in pair if t != end]
                    token = self._pick(logits, temperature, gen, banned=banned)
            out.token_ids.append(token)
            if on_token:
                on_token(stage, token)
            expert = EXPERTS.index(stage)
            if token == self.tok.eos_token_id:  # EOS inside a stage closes the answer
                out.stage_seconds[stage] = time.perf_counter() - t_stage
                break
            if stage is not None and token not in (self.ids[stage][0], self.ids[stage][1]):
                count += 1
                out.stage_tokens[stage] = count
            logits, past = self._forward([token], [expert], past)
            if token == self.ids[stage][1]:
                out.stage_seconds[stage] = time.perf_counter() - t_stage
                if stage == "answer":
                    break
                stage = None
        self._decode(out)
        return out

    def _next_starts(self, out: MoTEOutput, plan: list[str], mode: Mode) -> list[int]:
        if "answer" in out.stages:
            return []
        if plan:
            return [self.ids[plan[0]][0]]
        if mode != "adaptive":
            return []
        done = [EXPERTS.index(s) for s in out.stages]
        later = [s for i, s in enumerate(EXPERTS) if i > max(done, default=-1)]
        return [self.ids[s][0] for s in later]

    def _forward(self, ids: list[int], experts: list[int], past):
        x = torch.tensor([ids], device=self.device)
        e = torch.tensor([experts], device=self.device)
        res = self.model(x, e, past_key_values=past, use_cache=True)
        return res.logits[0, -1].float(), res.past_key_values

    @staticmethod
    def _pick(logits, temperature, gen, only=None, banned=None) -> int:
        logits = logits.clone()
        if only is not None:
            mask = torch.full_like(logits, float("-inf"))
            mask[only] = 0
            logits = logits + mask
        if banned:
            logits[banned] = float("-inf")
        if temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, -1)
        return int(torch.multinomial(probs, 1, generator=gen))

    def _decode(self, out: MoTEOutput) -> None:
        stage, buf = None, []
        specials = {t for pair in self.ids.values() for t in pair}
        for t in out.token_ids:
            if t in self.start_to_stage:
                stage, buf = self.start_to_stage[t], []
            elif t in specials or t == self.tok.eos_token_id:
                if stage:
                    out.stages[stage] = self.tok.decode(buf, skip_special_tokens=True)
                stage = None
            elif stage:
                buf.append(t)
                out.stages[stage] = self.tok.decode(buf, skip_special_tokens=True)
