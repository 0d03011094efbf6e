"""The AlignCoT generation job vs the raw engine on the same prompts, and 1 vs 2 engine actors.

    .venv/bin/python benchmarks/generation.py  ->  benchmarks/results/generation.json

"Raw engine" = the same chain logic (ChainBuilder) calling one engine in this process, engine
start-up included; "job" = `run_generate` end to end (local Ray start, actor + engine start-up,
Ray Data, Parquet writes, stats). Throughput = prompts/s and generated tokens/s.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import SHARED, Timer, model, write_result  # noqa: E402

N_PROMPTS = int(os.environ.get("MOTE_BENCH_PROMPTS", 512))
ENGINE = os.environ.get("MOTE_BENCH_ENGINE", "vllm")


def config(pool_size: int):
    from mote_ray.config import EngineConfig, PoolConfig
    from mote_ray.generation import GenerateConfig

    return GenerateConfig(engine=EngineConfig(model=model(), engine=ENGINE), pool=PoolConfig(size=pool_size, batch_size=48),
                          temperature=0.0)


def prompt_file(tmp: Path) -> str:
    src = SHARED / "datasets" / "advbench" / "harmful_behaviors.csv"
    lines = src.read_text().splitlines(keepends=True)[: N_PROMPTS + 1]
    (tmp / "adv.csv").write_text("".join(lines))
    return str(tmp / "adv.csv")


def raw(prompts: str) -> dict:
    from mote_ray.chains import ChainBuilder
    from mote_ray.engines import create_engine
    from mote_ray.inputs import read_prompts
    from mote_ray.records import SamplingParams

    cfg = config(1)
    rows = [r.model_dump() for r in read_prompts([prompts])[0]]
    with Timer() as t:
        engine = create_engine(cfg.engine)
        builder = ChainBuilder(engine, cfg.templates, cfg.max_tokens, SamplingParams(temperature=0.0),
                               cfg.question_tokens, cfg.history_tokens)
        states = [s for i in range(0, len(rows), 48) for s in builder.run(rows[i:i + 48])]
    engine.close()
    return {"seconds": t.seconds, "prompts": len(states), "tokens": sum(s.completion_tokens for s in states)}


def job(prompts: str, pool_size: int) -> dict:
    import ray

    from mote_ray.generation import run_generate

    out = Path(tempfile.mkdtemp(prefix="mote-bench-gen-"))
    with Timer() as t:
        stats = run_generate(config(pool_size), [prompts], out, progress=False)
    ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": t.seconds, "prompts": stats["total"], "tokens": stats["completion_tokens"], "actors": pool_size}


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mote-bench-"))
    prompts = prompt_file(tmp)
    r = raw(prompts)
    print(f"raw engine: {r}", flush=True)
    j1 = job(prompts, 1)
    print(f"job, 1 actor: {j1}", flush=True)
    time.sleep(2)
    j2 = job(prompts, 2)
    print(f"job, 2 actors: {j2}", flush=True)
    tps = lambda x: x["tokens"] / x["seconds"]  # noqa: E731
    write_result("generation",
                 {"job_vs_raw_engine": tps(j1) / tps(r), "two_vs_one_actor": tps(j2) / tps(j1),
                  "job_prompts_per_s": j1["prompts"] / j1["seconds"], "raw_prompts_per_s": r["prompts"] / r["seconds"]},
                 raw={"raw_engine": r, "job_1_actor": j1, "job_2_actors": j2},
                 config={"engine": ENGINE, "model": model(), "prompts": N_PROMPTS, "greedy": True,
                         "note": "engine start-up is inside every timing"})
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
