"""Engine throughput and Ray Data's overhead, side by side in one run on the same model and prompts.

    .venv/bin/python benchmarks/engines.py  ->  benchmarks/results/engines.json

Every side does the same work: the same N_PROMPTS AlignCoT analysis-stage prompts, MAX_TOKENS new
tokens each, greedy (so every side generates the same tokens).

1. Throughput (tokens/s, engines started once, warm): vLLM batched, transformers batched,
   transformers one request at a time. Sides run interleaved (vLLM, hf batched, hf single, vLLM, ...)
   for REPEATS rounds; each ratio is computed per round and reported as the median with its spread.
2. Ray Data overhead: the whole job through a Ray Data engine stage (actor start, engine start,
   scheduling, batching, serialisation, collecting results) against the raw engine doing the same
   job in a fresh process (Python start, imports, engine start, generate). Both include start-up, so
   Ray Data cannot come out faster than the engine it wraps by construction. Ray itself is started
   once beforehand (a cluster is up before jobs arrive). Sides alternate raw, Ray Data, raw, ...
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import Timer, alpaca_prompts, interleave, model, per_round, summary, write_result  # noqa: E402

N_PROMPTS, MAX_TOKENS, REPEATS, OVERHEAD_REPEATS = 256, 128, 3, 3


def messages(prompt: str) -> list[dict]:
    """The product's workload: an AlignCoT stage prompt (the analysis stage's template + the question)."""
    from mote_ray.stages import Stage, Templates

    return Templates().messages(Stage.ANALYSIS, [], prompt)


def requests(prompts):
    from mote_ray.records import GenerationRequest, SamplingParams

    sp = SamplingParams(max_tokens=MAX_TOKENS)
    return [GenerationRequest(id=str(i), messages=messages(p), sampling=sp) for i, p in enumerate(prompts)]


def tokens(results) -> int:
    return sum(r.completion_tokens for r in results)


def throughput(prompts: list[str]) -> dict:
    from mote_ray.config import EngineConfig
    from mote_ray.engines import create_engine

    engines = {"vllm": create_engine(EngineConfig(model=model(), engine="vllm")),
               "transformers": create_engine(EngineConfig(model=model(), engine="transformers"))}
    for e in engines.values():
        e.generate(requests(prompts[:64]))  # warm-up: one full transformers micro-batch (64 rows)
    reqs = requests(prompts)

    def side(fn):
        def run() -> dict:
            with Timer() as t:
                results = fn()
            return {"prompts": len(results), "tokens": tokens(results), "seconds": t.seconds,
                    "tokens_per_s": tokens(results) / t.seconds}
        return run

    runs = interleave({"vllm": side(lambda: engines["vllm"].generate(reqs)),
                       "transformers_batched": side(lambda: engines["transformers"].generate(reqs)),
                       "transformers_one_by_one": side(lambda: [engines["transformers"].generate([r])[0]
                                                                for r in reqs])},
                      REPEATS, warmup=False)  # warmed up above, on a shorter batch
    for e in engines.values():
        e.close()
    return runs


def raw_job(prompts: list[str]) -> dict:
    """The whole job on the raw engine in this (fresh) process: imports, engine start, generate."""
    t0 = time.perf_counter()
    from mote_ray.config import EngineConfig
    from mote_ray.engines import create_engine

    engine = create_engine(EngineConfig(model=model(), engine="vllm"))
    results = engine.generate(requests(prompts))
    return {"prompts": len(results), "tokens": tokens(results), "seconds": time.perf_counter() - t0}


def ray_data_job(prompts: list[str]) -> dict:
    import ray

    from mote_ray.config import EngineConfig, PoolConfig
    from mote_ray.engine_stage import map_engine
    from mote_ray.records import SamplingParams

    t0 = time.perf_counter()
    rows = [{"id": str(i), "messages": messages(p)} for i, p in enumerate(prompts)]
    ds = map_engine(ray.data.from_items(rows), EngineConfig(model=model(), engine="vllm"),
                    PoolConfig(size=1, batch_size=N_PROMPTS), sampling=SamplingParams(max_tokens=MAX_TOKENS))
    out = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        out.extend(batch.column("completion_tokens").to_pylist())
    return {"prompts": len(out), "tokens": sum(out), "seconds": time.perf_counter() - t0}


def overhead(prompts: list[str]) -> dict:
    from mote_ray.cluster import init_ray

    init_ray(num_cpus=os.cpu_count())

    def raw_engine_job() -> dict:
        p = subprocess.run([sys.executable, __file__, "--raw-job"], capture_output=True, text=True, check=True, timeout=3600,
                           env={**os.environ, "RAY_ADDRESS": ""})
        line = next(ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("RESULT "))
        return json.loads(line.removeprefix("RESULT "))

    runs = interleave({"raw_engine_job": raw_engine_job, "ray_data_job": lambda: ray_data_job(prompts)},
                      OVERHEAD_REPEATS, warmup=False)
    import ray

    ray.shutdown()
    return runs


def main() -> None:
    prompts = alpaca_prompts(N_PROMPTS)
    tp = throughput(prompts)
    ov = overhead(prompts)
    for side in (*tp.values(), *ov.values()):
        assert all(r["prompts"] == N_PROMPTS for r in side), "every side must answer the same prompts"
    tps = {k: [r["tokens_per_s"] for r in v] for k, v in tp.items()}
    v_hf = per_round(tps["vllm"], tps["transformers_batched"])
    b_s = per_round(tps["transformers_batched"], tps["transformers_one_by_one"])
    over = per_round([r["seconds"] for r in ov["ray_data_job"]], [r["seconds"] for r in ov["raw_engine_job"]])
    spread = {"vllm_vs_transformers_batched": summary(v_hf), "transformers_batched_vs_one_by_one": summary(b_s),
              "ray_data_overhead": summary(over)}
    def side(runs: list[dict], key: str) -> dict:  # one entry per side: its prompt count, median, every run
        return {"prompts": runs[0]["prompts"], "tokens": runs[0]["tokens"],
                key: statistics.median(r[key] for r in runs), "runs": runs}

    write_result(
        "engines", {k: v["median"] for k, v in spread.items()},
        spread=spread,
        raw={**{k: side(v, "tokens_per_s") for k, v in tp.items()}, **{k: side(v, "seconds") for k, v in ov.items()}},
        config={"model": model(), "max_tokens": MAX_TOKENS, "prompts": N_PROMPTS, "greedy": True,
                "repeats": REPEATS, "overhead_repeats": OVERHEAD_REPEATS,
                "same_prompts_every_side": True,
                "ray_data_overhead": "whole job (actor + engine start, all rows) / raw engine whole job in a fresh "
                                     "process (imports + engine start + generate); Ray started beforehand"},
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--raw-job"]:
        print("RESULT " + json.dumps(raw_job(alpaca_prompts(N_PROMPTS))), flush=True)
    else:
        main()
