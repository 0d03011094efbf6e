"""The AlignCoT generation job vs the raw engine on the same prompts, and 1 vs 2 engine actors.

    .venv/bin/python benchmarks/generation.py  ->  benchmarks/results/generation.json

"Raw engine" = the same chain logic (ChainBuilder) calling one engine in one process; "job" =
`run_generate` end to end (local Ray start, actor + engine start-up, Ray Data, Parquet writes,
stats). Every side is a whole job in a fresh process (Python start, imports and engine start-up
inside every timing, as a user runs it), timed from here; throughput = generated tokens/s and
prompts/s. The raw side runs with one thread, as Ray runs an engine actor given one CPU. Each
side first runs once on WARMUP_PROMPTS prompts (disk caches, vLLM's compile cache),
then the sides take turns (raw, job with 1 actor, job with 2 actors, raw, ...) for ROUNDS rounds
(common.interleave); each ratio is taken per round, `ratios` holds its median and `spread` every
round's value. ROUNDS is 2 by default: a round is ~7 minutes of N_PROMPTS prompts on 3 sides here,
so 2 rounds keep a run near 15 minutes; MOTE_BENCH_ROUNDS=5 for a tighter median.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import SHARED, interleave, model, per_round, summary, write_result  # noqa: E402

N_PROMPTS = int(os.environ.get("MOTE_BENCH_PROMPTS", 512))
ENGINE = os.environ.get("MOTE_BENCH_ENGINE", "vllm")
ROUNDS = int(os.environ.get("MOTE_BENCH_ROUNDS", 2))
WARMUP_PROMPTS = 16


def config(pool_size: int):
    from mote_ray.config import EngineConfig, PoolConfig
    from mote_ray.generation import GenerateConfig

    return GenerateConfig(engine=EngineConfig(model=model(), engine=ENGINE), pool=PoolConfig(size=pool_size, batch_size=48),
                          temperature=0.0)


def prompt_file(tmp: Path, n: int) -> str:
    src = SHARED / "datasets" / "advbench" / "harmful_behaviors.csv"
    lines = src.read_text().splitlines(keepends=True)[: n + 1]
    (tmp / f"adv{n}.csv").write_text("".join(lines))
    return str(tmp / f"adv{n}.csv")


def raw(prompts: str) -> dict:
    """Child process: the chains of every prompt on one engine in this process."""
    from mote_ray.chains import ChainBuilder
    from mote_ray.engines import create_engine
    from mote_ray.inputs import read_prompts
    from mote_ray.records import SamplingParams

    cfg = config(1)
    rows = [r.model_dump() for r in read_prompts([prompts])[0]]
    engine = create_engine(cfg.engine)
    builder = ChainBuilder(engine, cfg.templates, cfg.max_tokens, SamplingParams(temperature=0.0),
                           cfg.question_tokens, cfg.history_tokens)
    states = [s for i in range(0, len(rows), 48) for s in builder.run(rows[i:i + 48])]
    engine.close()
    return {"prompts": len(states), "tokens": sum(s.completion_tokens for s in states)}


def job(prompts: str, pool_size: int) -> dict:
    """Child process: the generate job on a private local Ray instance."""
    from mote_ray.generation import run_generate

    out = Path(tempfile.mkdtemp(prefix="mote-bench-gen-"))
    stats = run_generate(config(pool_size), [prompts], out, progress=False)
    shutil.rmtree(out, ignore_errors=True)
    return {"prompts": stats["total"], "tokens": stats["completion_tokens"], "actors": pool_size}


def side(*args: str):
    """A side: this script as a fresh process (`--child ARGS`), timed from here, with its RESULT line."""
    def run() -> dict:
        t0 = time.perf_counter()
        # The raw side gets the one thread Ray gives an engine actor with 1 CPU (OMP_NUM_THREADS=1),
        # so the ratio is the job's overhead, not a thread count.
        threads = {"OMP_NUM_THREADS": "1"} if args[0] == "raw" else {}
        p = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                           env={**os.environ, "RAY_ADDRESS": "", **threads}, timeout=3600)
        seconds = time.perf_counter() - t0
        if p.returncode:
            sys.exit(f"{' '.join(args)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
        line = next(ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("RESULT "))
        return {"seconds": seconds, **json.loads(line.removeprefix("RESULT "))}
    return run


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mote-bench-"))
    names = ("raw_engine", "job_1_actor", "job_2_actors")

    def sides(prompts: str) -> dict:
        return dict(zip(names, (side("raw", prompts), side("job", prompts, "1"), side("job", prompts, "2"))))

    interleave(sides(prompt_file(tmp, WARMUP_PROMPTS)), 1, warmup=False)  # the warm-up, on fewer prompts
    runs = interleave(sides(prompt_file(tmp, N_PROMPTS)), ROUNDS, warmup=False)
    for r in (r for rs in runs.values() for r in rs):
        assert r["prompts"] == N_PROMPTS, f"every side must answer the same {N_PROMPTS} prompts: {r}"
    tps = {k: [r["tokens"] / r["seconds"] for r in v] for k, v in runs.items()}
    pps = {k: [r["prompts"] / r["seconds"] for r in v] for k, v in runs.items()}
    spread = {"job_vs_raw_engine": summary(per_round(tps["job_1_actor"], tps["raw_engine"])),
              "two_vs_one_actor": summary(per_round(tps["job_2_actors"], tps["job_1_actor"]))}
    write_result("generation",
                 {**{k: v["median"] for k, v in spread.items()},
                  "job_prompts_per_s": summary(pps["job_1_actor"])["median"],
                  "raw_prompts_per_s": summary(pps["raw_engine"])["median"]},
                 spread=spread, raw=runs,
                 config={"engine": ENGINE, "model": model(), "prompts": N_PROMPTS, "greedy": True, "rounds": ROUNDS,
                         "max_tokens": config(1).max_tokens, "raw_side_threads": 1,
                         "warmup_prompts": WARMUP_PROMPTS,
                         "order": "each side once on the warm-up prompts, then raw, job 1 actor, job 2 actors in "
                                  "turn for each round; ratios = median over rounds of the per-round ratio",
                         "note": "every side is a whole job in a fresh process, timed from the parent: Python "
                                 "start, imports and engine start-up inside every timing"})
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        kind, prompts, *rest = sys.argv[2:]
        print("RESULT " + json.dumps(raw(prompts) if kind == "raw" else job(prompts, int(rest[0]))), flush=True)
    else:
        main()
