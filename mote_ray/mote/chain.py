"""The one MoTE chain driver: the stage rules, as a generator of stage requests, for every backend.

A chain (mode, per-stage limits, EOS, stop after the answer) yields `StageRequest`s and receives
`StageResult`s. Each request carries the whole sequence so far with the expert of every token, so
any backend computes exactly what training computed: the vLLM MoTE engine (mote/vllm_model.py,
expert-tagged token ids, prefix cache), the batched transformers reference (mote/reference.py) and
the inexact multi-LoRA path (mote/engines.py). Drivers: `run_chains` (many chains, lock-step
rounds, offline) and `drive` (one chain, awaited stage by stage, serving).

Stage rules (design.md; the reference semantics of the first exact generator):
  - the prompt is read by `inference_prompt_expert`; a stage's start and end tokens and its text by
    its own expert;
  - `adaptive`: the expert that read the last token picks the next stage among the later ones (a
    one-token request restricted to their start tokens); forced modes follow their plan;
  - a stage ends at its end token or after `limits[stage]` tokens (then its end token is forced);
  - EOS inside a stage ends the chain; the chain ends after the answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Generator, Literal, Sequence

from mote_ray.mote.routing import EXPERTS

Mode = Literal["adaptive", "direct", "analysis", "full"]
MODES: tuple[str, ...] = ("adaptive", "direct", "analysis", "full")
FORCED = {"direct": ["answer"], "analysis": ["analysis", "answer"], "full": ["analysis", "guidance", "answer"]}
DEFAULT_LIMITS = {"analysis": 128, "guidance": 128, "answer": 256}


@dataclass(frozen=True)
class StageRequest:
    """One engine request of a chain: continue `tokens` (each read by its expert in `experts`)."""

    tokens: tuple[int, ...]  # (seq,) base-vocabulary ids so far: prompt + earlier stages
    experts: tuple[int, ...]  # (seq,) expert index (into EXPERTS) of every token
    expert: int | None  # the expert that reads every generated token; None for a stage choice
    max_tokens: int
    stop_ids: tuple[int, ...] = ()  # end generation (reported in `stop_token`, not in `token_ids`)
    banned: tuple[int, ...] = ()  # never sampled
    choices: tuple[tuple[int, int], ...] = ()  # stage choice: (start token, its expert) pairs, one is picked
    temperature: float = 0.0
    top_p: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's penalties, over the tokens this request has generated
    frequency_penalty: float = 0.0
    seed: int | None = None
    stage: str | None = None  # the stage being written (None for a choice), for streaming

    @property
    def is_choice(self) -> bool:
        return bool(self.choices)


@dataclass
class StageResult:
    token_ids: list[int]  # generated base ids, the stop token excluded
    finish_reason: Literal["stop", "length"] = "length"
    stop_token: int | None = None
    cached_tokens: int = 0  # prompt tokens served from the engine's prefix cache


@dataclass
class MoTEOutput:
    stages: dict[str, str]  # stage -> text, in the order generated
    token_ids: list[int]  # every generated id, stage tokens included
    stage_tokens: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens of this chain's requests served from the prefix cache
    requested_tokens: int = 0  # prompt tokens of this chain's requests (the hit rate's denominator)
    requests: int = 0
    stop_string: bool = False  # the answer was cut at a `stop` string

    @property
    def answer(self) -> str:
        return self.stages.get("answer", "")


Chain = Generator[StageRequest, StageResult, MoTEOutput]


@dataclass(frozen=True)
class ChainSpec:
    """What a chain needs to know about the model: stage token ids, EOS and the prompt expert."""

    stage_ids: dict[str, tuple[int, int]]  # stage -> (start id, end id)
    eos: int | None
    prompt_expert: str = "answer"
    max_len: int | None = None  # the engine's context: a stage's budget never runs past it


def chain(spec: ChainSpec, prompt_ids: Sequence[int], decode: Callable[[list[int]], str], *,
          mode: Mode = "adaptive", limits: dict[str, int] | None = None, temperature: float = 0.0,
          top_p: float = 1.0, seed: int | None = None, max_tokens: int | None = None, stop: Sequence[str] = (),
          presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> Chain:
    """The stage rules (module docstring). Returns the MoTEOutput when the chain ends.

    OpenAI semantics on top: `max_tokens` bounds the whole completion (every stage, stage tokens
    included), `stop` strings end the answer (the text a client receives) before the first of them,
    and the penalties count the tokens of the stage being written (each stage is its own text).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    limits = {**DEFAULT_LIMITS, **(limits or {})}
    plan = list(FORCED.get(mode, []))
    specials = [t for pair in spec.stage_ids.values() for t in pair]
    tokens, experts = list(prompt_ids), [EXPERTS.index(spec.prompt_expert)] * len(prompt_ids)
    out = MoTEOutput(stages={}, token_ids=[], prompt_tokens=len(prompt_ids))
    step = 0

    def request(**kw) -> StageRequest:
        nonlocal step
        step += 1
        return StageRequest(tokens=tuple(tokens), experts=tuple(experts), temperature=temperature, top_p=top_p,
                            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                            seed=None if seed is None else seed + step - 1, **kw)

    def account(req: StageRequest, res: StageResult) -> None:
        out.requests += 1
        out.requested_tokens += len(req.tokens)
        out.cached_tokens += res.cached_tokens

    while "answer" not in out.stages:
        room = None if spec.max_len is None else spec.max_len - len(tokens) - 2  # - choice/start - forced end
        if max_tokens is not None:  # the completion's budget: start + text + end of this stage
            left = max_tokens - len(out.token_ids) - 2
            room = left if room is None else min(room, left)
        if room is not None and room < 1:
            out.finish_reason = "length"  # the context is full: nothing more can be written
            break
        if plan:
            stage = plan.pop(0)
        elif mode != "adaptive":
            break
        else:  # the expert that read the last token picks among the later stages' start tokens
            done = [EXPERTS.index(s) for s in out.stages]
            later = [s for i, s in enumerate(EXPERTS) if i > max(done, default=-1)]
            req = request(expert=None, max_tokens=1,
                          choices=tuple((spec.stage_ids[s][0], EXPERTS.index(s)) for s in later))
            res = yield req
            account(req, res)
            picked = res.token_ids[0] if res.token_ids else res.stop_token
            stage = next((s for s in later if spec.stage_ids[s][0] == picked), None)
            if stage is None:
                raise RuntimeError(f"stage choice returned {picked}, not one of the start tokens of {later}")
        start, end = spec.stage_ids[stage]
        k = EXPERTS.index(stage)
        tokens.append(start), experts.append(k), out.token_ids.append(start)
        t0 = time.perf_counter()
        stops = (end,) if spec.eos is None else (end, spec.eos)
        budget = limits[stage] if room is None else min(limits[stage], room)
        req = request(expert=k, max_tokens=budget, stop_ids=stops, stage=stage,
                      banned=tuple(t for t in specials if t != end))
        res = yield req
        account(req, res)
        out.stage_seconds[stage] = time.perf_counter() - t0  # includes waiting for a batch it joined
        tokens += res.token_ids
        experts += [k] * len(res.token_ids)
        out.token_ids += res.token_ids
        out.stages[stage] = decode(list(res.token_ids))
        if stage == "answer" and stop and (cut := _first_stop(out.stages[stage], stop)) is not None:
            out.stages[stage] = out.stages[stage][:cut]  # OpenAI: the text ends before the stop string
            out.stop_string = True
        if res.token_ids:
            out.stage_tokens[stage] = len(res.token_ids)
        if res.stop_token is not None and res.stop_token == spec.eos:
            out.token_ids.append(spec.eos)  # EOS inside a stage closes the chain
            break
        if res.finish_reason == "length" and (stage == "answer" or budget < limits[stage]) and not out.stop_string:
            out.finish_reason = "length"
        tokens.append(end), experts.append(k), out.token_ids.append(end)  # forced after `limit` tokens
    return out


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


def run_chains(run: Callable[[list[StageRequest]], list[StageResult]], chains: Sequence[Chain]) -> list[MoTEOutput]:
    """Drive many chains offline: each round sends every live chain's next request in one batch."""
    outputs: list[MoTEOutput | None] = [None] * len(chains)
    pending = {}
    for i, c in enumerate(chains):
        try:
            pending[i] = next(c)
        except StopIteration as stop:  # no room for even one stage (e.g. max_tokens < 3): done before any request
            outputs[i] = stop.value
    while pending:
        order = list(pending)
        results = run([pending[i] for i in order])
        pending = {}
        for i, res in zip(order, results):
            try:
                pending[i] = chains[i].send(res)
            except StopIteration as stop:
                outputs[i] = stop.value
    return outputs  # type: ignore[return-value]


async def drive(run: Callable[[StageRequest], Awaitable[StageResult]], steps: Chain) -> MoTEOutput:
    """Drive one chain, awaiting each stage request (serving: concurrent chains share the engine)."""
    try:
        req = next(steps)
    except StopIteration as stop:  # a chain with no room for a stage ends at once (a StopIteration escaping a
        return stop.value  # coroutine became "RuntimeError: coroutine raised StopIteration": a 503)
    while True:
        res = await run(req)
        try:
            req = steps.send(res)
        except StopIteration as stop:
            return stop.value
