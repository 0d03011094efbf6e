"""Adaptive AlignCoT chain construction (design.md, step 1) as a pure state machine plus a batched runner.

Per prompt: answer directly and self-check; if unsafe, add Analysis, answer again, check; if still
unsafe, add Guidance, answer, check. `next_stage`/`advance` decide; `ChainBuilder.run` drives many
prompts at once, sending the next stage of *every* active prompt to the engine in one call, so a
batch mixes prompts and stages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pydantic import BaseModel

from mote_ray.records import GenerationRequest, SamplingParams, request_seed
from mote_ray.stages import Stage, Templates, Verdict, parse_verdict


class Attempt(BaseModel):
    """One answer and its self-check; a chain keeps every attempt it made."""

    stages: list[str]  # chain stages the answer was conditioned on + "answer"
    answer: str
    verdict: Verdict
    check_text: str


@dataclass
class ChainState:
    id: str
    history: list[dict]
    question: str
    analysis: str | None = None
    guidance: str | None = None
    answer: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    next: Stage | None = Stage.ANSWER
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stage_tokens: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def stages_used(self) -> list[str]:
        return [s for s, t in (("analysis", self.analysis), ("guidance", self.guidance)) if t is not None] + ["answer"]

    @property
    def flagged(self) -> bool:
        """Unsafe after all stages (an unparseable verdict counts as unsafe), or failed."""
        return self.error is not None or not self.attempts or self.attempts[-1].verdict != "safe"


def next_stage(state: ChainState) -> Stage | None:
    return state.next


def advance(state: ChainState, stage: Stage, text: str) -> None:
    """Record `text` as the output of `stage` and decide what comes next."""
    if stage is Stage.ANALYSIS:
        state.analysis, state.next = text, Stage.ANSWER
    elif stage is Stage.GUIDANCE:
        state.guidance, state.next = text, Stage.ANSWER
    elif stage is Stage.ANSWER:
        state.answer, state.next = text, Stage.CHECK
    else:
        verdict = parse_verdict(text)
        state.attempts.append(Attempt(stages=state.stages_used, answer=state.answer or "", verdict=verdict,
                                      check_text=text))
        if verdict == "safe":
            state.next = None
        elif state.analysis is None:
            state.next = Stage.ANALYSIS
        elif state.guidance is None:
            state.next = Stage.GUIDANCE
        else:
            state.next = None  # unsafe after all stages: the policy decides (generation.py)


def turn_overhead(tokenizer) -> int:
    """Tokens the chat template adds around one turn of history (role markers, separators), rounded
    up: what `history_tokens` must count besides a turn's text for the budget to bound the prompt."""
    from mote_ray.chat import encode

    def n(turns: int) -> int:
        msgs = [{"role": ("user", "assistant")[i % 2], "content": "x"} for i in range(turns)]
        return len(encode(tokenizer, GenerationRequest(messages=msgs + [{"role": "user", "content": "x"}])))

    return max(0, -(-(n(2) - n(0) - 2) // 2))


class ChainBuilder:
    """Runs chains for a batch of prompts against one engine."""

    def __init__(self, engine, templates: Templates, max_tokens: dict[str, int], sampling: SamplingParams,
                 question_tokens: int = 192, history_tokens: int = 128):
        self.engine, self.templates, self.sampling = engine, templates, sampling
        self.max_tokens = max_tokens
        self.question_tokens, self.history_tokens = question_tokens, history_tokens
        self.max_model_len = engine.config.max_model_len
        self.turn_tokens = turn_overhead(engine.tokenizer)

    def start(self, rows: list[dict]) -> list[ChainState]:
        return [ChainState(id=r["id"], history=self._clip_history(r.get("history") or []),
                           question=self._clip(r["question"], self.question_tokens)) for r in rows]

    def run(self, rows: list[dict], max_active: int | None = None) -> list[ChainState]:
        """All chains of `rows`; with `max_active`, new prompts join as others finish (stages mix per call)."""
        states = self.start(rows)
        waiting, active = list(states), []
        while True:
            active = [s for s in active if s.next is not None]
            while waiting and (max_active is None or len(active) < max_active):
                active.append(waiting.pop(0))
            if not active:
                break
            t0 = time.perf_counter()
            calls = [(s, s.next, self._request(s)) for s in active]
            ready = [(s, st, r) for s, st, r in calls if r is not None]
            results = self.engine.generate([r for _, _, r in ready]) if ready else []
            share = (time.perf_counter() - t0) / len(active)
            for (state, stage, _), res in zip(ready, results):
                state.prompt_tokens += res.prompt_tokens
                state.completion_tokens += res.completion_tokens
                state.stage_tokens[stage.value] = state.stage_tokens.get(stage.value, 0) + res.completion_tokens
                advance(state, stage, res.text.strip())
            for s in active:
                s.seconds += share
        return states

    def _request(self, s: ChainState) -> GenerationRequest | None:
        from mote_ray.chat import encode

        msgs = self.templates.messages(s.next, s.history, s.question, s.analysis, s.guidance, s.answer)
        rid = f"{s.id}:{s.next.value}"
        seed = request_seed(self.sampling.seed, f"{rid}:{len(s.attempts)}")  # answer/check repeat per attempt
        req = GenerationRequest(id=rid, messages=msgs, sampling=self.sampling.model_copy(
            update={"max_tokens": self.max_tokens[s.next.value], "seed": seed}))
        n = len(encode(self.engine.tokenizer, req))
        if n + min(8, req.sampling.max_tokens) > self.max_model_len:
            s.error = (f"{s.next.value} prompt has {n} tokens; it does not fit max_model_len={self.max_model_len} "
                       f"with room to answer")
            s.next = None
            return None
        return req

    def _clip(self, text: str, n_tokens: int) -> str:
        tok = self.engine.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= n_tokens else tok.decode(ids[:n_tokens])

    def _clip_history(self, history: list[dict]) -> list[dict]:
        """Keep the most recent turns that fit the history budget, each counted as it is rendered (its
        text and the chat template's markers around it); the stored record keeps all of them."""
        kept, used = [], 0
        for turn in reversed(history):
            n = len(self.engine.tokenizer(turn["content"], add_special_tokens=False)["input_ids"]) + self.turn_tokens
            if used + n > self.history_tokens:
                break
            kept.append(turn)
            used += n
        kept.reverse()
        while kept and kept[0]["role"] != "user":  # a dialogue resumes on a user turn
            kept.pop(0)
        return kept
