"""Engine throughput, side by side in one run on the same model and prompts.

    .venv/bin/python benchmarks/engines.py  ->  benchmarks/results/engines.json

tokens/s for vLLM, transformers batched, transformers one by one, and the vLLM engine inside a
Ray Data stage vs the same engine called directly. Ray Data's overhead is measured from the
moment its engine actor is ready (engine start-up is the same cost either way and is reported
on its own), over the whole dataset: scheduling, batching, serialisation, collecting results.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import Timer, alpaca_prompts, model, write_result  # noqa: E402

N_PROMPTS, N_HF_BATCHED, N_HF_SINGLE, MAX_TOKENS = 512, 128, 16, 128


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


def bench_engine(name: str, prompts: list[str], one_by_one: bool = False) -> dict:
    from mote_ray.config import EngineConfig
    from mote_ray.engines import create_engine

    with Timer() as start:
        engine = create_engine(EngineConfig(model=model(), engine=name))
    engine.generate(requests(prompts[:4]))  # warm-up
    reqs = requests(prompts)
    with Timer() as t:
        results = [engine.generate([r])[0] for r in reqs] if one_by_one else engine.generate(reqs)
    engine.close()
    n = tokens(results)
    return {"prompts": len(reqs), "tokens": n, "seconds": t.seconds, "tokens_per_s": n / t.seconds,
            "startup_s": start.seconds}


def bench_ray_data(prompts: list[str]) -> dict:
    import ray

    from mote_ray.cluster import init_ray
    from mote_ray.config import EngineConfig, PoolConfig
    from mote_ray.engine_stage import map_engine
    from mote_ray.records import SamplingParams

    init_ray(num_cpus=os.cpu_count())
    rows = [{"id": str(i), "messages": messages(p)} for i, p in enumerate(prompts)]
    ds = map_engine(ray.data.from_items(rows), EngineConfig(model=model(), engine="vllm"),
                    PoolConfig(batch_size=128), sampling=SamplingParams(max_tokens=MAX_TOKENS))
    # The first batch pays engine start-up; `ready` is when the first result batch appears.
    t0, ready, out, first_tokens = time.perf_counter(), None, [], 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        out.extend(batch.column("completion_tokens").to_pylist())
        if ready is None:
            ready, first_tokens = time.perf_counter(), sum(out)
    end = time.perf_counter()
    ray.shutdown()
    return {"prompts": len(out), "tokens": sum(out), "wall_s": end - t0, "first_batch_s": ready - t0,
            "tokens_after_first_batch": sum(out) - first_tokens}


def main() -> None:
    prompts = alpaca_prompts(N_PROMPTS)
    vllm = bench_engine("vllm", prompts)
    print(f"vllm: {vllm}")
    hf_batched = bench_engine("transformers", prompts[:N_HF_BATCHED])
    print(f"transformers batched: {hf_batched}")
    hf_single = bench_engine("transformers", prompts[:N_HF_SINGLE], one_by_one=True)
    print(f"transformers one by one: {hf_single}")
    # Ray Data vs raw: the raw engine's time for the rows after the first batch, against the time
    # Ray Data took after its first batch came back (its start-up included engine loading).
    ray_data = bench_ray_data(prompts)
    print(f"ray data: {ray_data}")
    raw_tokens_per_s = vllm["tokens_per_s"]
    steady = ray_data["wall_s"] - ray_data["first_batch_s"]
    raw_equiv = ray_data["tokens_after_first_batch"] / raw_tokens_per_s
    write_result(
        "engines",
        {"vllm_vs_transformers_batched": vllm["tokens_per_s"] / hf_batched["tokens_per_s"],
         "transformers_batched_vs_one_by_one": hf_batched["tokens_per_s"] / hf_single["tokens_per_s"],
         "ray_data_overhead": steady / raw_equiv,
         "ray_data_overhead_with_startup": ray_data["wall_s"] / (vllm["seconds"] + vllm["startup_s"])},
        raw={"vllm": vllm, "transformers_batched": hf_batched, "transformers_one_by_one": hf_single,
             "ray_data_vllm": ray_data},
        config={"model": model(), "max_tokens": MAX_TOKENS, "prompts": N_PROMPTS, "greedy": True},
    )


if __name__ == "__main__":
    main()
