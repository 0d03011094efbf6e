"""The fast path: a MoTE chain run on any engine with one exported LoRA adapter per stage.

Each stage is one engine call on `OUT/base` with that stage's adapter (stage expert + shared expert
folded, mote/export.py), re-prefilling the prompt and the earlier stages. That is what makes it fast
(vLLM batches and schedules it, many requests share one engine) and what makes it approximate: the
whole prefix is read by the current stage's expert, where the exact path (mote/generate.py) reads
each token with its own expert. How often both agree is measured (benchmarks/serving.py).

A chain is a generator that yields `GenerationRequest`s and receives their results, so one chain
logic serves both drivers: `run_chains` (lock-step batches, offline) and the Serve deployment
(one awaited, server-batched call per step).
"""

from __future__ import annotations

import time
from typing import Generator, Sequence

from mote_ray.mote.generate import DEFAULT_LIMITS, FORCED, Mode, MoTEOutput
from mote_ray.mote.routing import EXPERTS
from mote_ray.records import GenerationRequest, GenerationResult, SamplingParams

Chain = Generator[GenerationRequest, GenerationResult, MoTEOutput]


def chain(prompt_ids: list[int], stage_ids: dict[str, tuple[int, int]], eos: int | None, *,
          mode: Mode = "adaptive", limits: dict[str, int] | None = None, temperature: float = 0.0,
          seed: int | None = None, prompt_expert: str = "answer") -> Chain:
    """Same stage rules as MoTEGenerator: forced plans, adaptive choice of the next start token,
    per-stage token limits (then the end token is forced), EOS ends the chain, stop after the answer."""
    limits = {**DEFAULT_LIMITS, **(limits or {})}
    plan = list(FORCED.get(mode, []))
    specials = [t for pair in stage_ids.values() for t in pair]
    out = MoTEOutput(stages={}, token_ids=[])
    ids, last_expert, step = list(prompt_ids), prompt_expert, 0

    def sampling(**kw) -> SamplingParams:
        return SamplingParams(temperature=temperature, seed=None if seed is None else seed + step, **kw)

    while "answer" not in out.stages:
        if plan:
            stage = plan.pop(0)
        elif mode != "adaptive":
            break
        else:  # the expert that read the last token picks the next stage among the later ones
            done = [EXPERTS.index(s) for s in out.stages]
            later = [s for i, s in enumerate(EXPERTS) if i > max(done, default=-1)]
            res = yield GenerationRequest(prompt_ids=ids, adapter=last_expert, sampling=sampling(
                max_tokens=1, allowed_token_ids=tuple(stage_ids[s][0] for s in later)))
            step += 1
            stage = next(s for s in later if res.token_ids and stage_ids[s][0] == res.token_ids[0])
        start, end = stage_ids[stage]
        ids.append(start)
        out.token_ids.append(start)
        t0 = time.perf_counter()
        res = yield GenerationRequest(prompt_ids=ids, adapter=stage, sampling=sampling(
            max_tokens=limits[stage], stop_token_ids=(end,), banned_token_ids=tuple(t for t in specials if t != end)))
        out.stage_seconds[stage] = time.perf_counter() - t0  # includes waiting for the batch it joined
        step += 1
        ids += res.token_ids
        out.token_ids += res.token_ids
        out.stages[stage] = res.text
        if res.token_ids:
            out.stage_tokens[stage] = len(res.token_ids)
        if res.stop_token_id is not None and res.stop_token_id == eos:
            out.token_ids.append(eos)  # EOS inside a stage closes the chain, as on the exact path
            break
        if res.finish_reason == "length" and stage == "answer":
            out.finish_reason = "length"
        ids.append(end)
        out.token_ids.append(end)
        last_expert = stage
    return out


def run_chains(engine, chains: Sequence[Chain]) -> list[MoTEOutput]:
    """Drive many chains in lock-step: each round sends every live chain's next request in one batch."""
    outputs: list[MoTEOutput | None] = [None] * len(chains)
    pending: dict[int, GenerationRequest] = {}
    for i, c in enumerate(chains):
        pending[i] = next(c)
    while pending:
        order = list(pending)
        results = engine.generate([pending[i].model_copy(update={"id": str(i)}) for i in order])
        pending = {}
        for i, res in zip(order, results):
            try:
                pending[i] = chains[i].send(res)
            except StopIteration as stop:
                outputs[i] = stop.value
    return outputs  # type: ignore[return-value]


def load_fast_engine(model_dir, engine: str = "auto", **engine_kwargs):
    """An engine on `model_dir/base` with the per-stage adapters of a `mote-ray train` output loaded."""
    import json
    from pathlib import Path

    from mote_ray.config import EngineConfig
    from mote_ray.engines import create_engine
    from mote_ray.errors import MoteError

    root = Path(model_dir)
    adapters = {s: root / "adapters" / s for s in EXPERTS}
    if missing := [s for s, p in adapters.items() if not (p / "adapter_config.json").is_file()]:
        raise MoteError(f"{root} has no exported adapter for stage(s) {missing}; the fast path needs "
                        f"`mote-ray train --method mote` output (adapters/<stage>/)")
    rank = max(json.loads((p / "adapter_config.json").read_text())["r"] for p in adapters.values())
    cfg = EngineConfig(model=str(root / "base"), engine=engine, enable_lora=True, max_lora_rank=vllm_rank(rank),
                       max_loras=len(EXPERTS), **engine_kwargs)
    eng = create_engine(cfg)
    for stage, path in adapters.items():
        eng.load_adapter(stage, str(path))
    return eng


def vllm_rank(r: int) -> int:
    # vLLM accepts a fixed set of max_lora_rank values; take the smallest that fits.
    return next(v for v in (8, 16, 32, 64, 128, 256, 320, 512) if v >= r)
