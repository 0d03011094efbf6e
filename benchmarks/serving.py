"""Serving: exactness of both paths and their latency under load, measured in one run (CPU).

    .venv/bin/python benchmarks/serving.py  ->  benchmarks/results/serving.json

1. Trains a tiny MoTE model with the real training job on chains built from real data (AdvBench goal
   as question and target as analysis, an Alpaca instruction as guidance, an HH-RLHF answer).
2. Starts `mote-ray serve` (a separate process, its own Ray) and talks to it over loopback HTTP
   with the official `openai` client, greedy, adaptive mode, 50 held-out AdvBench prompts:
   - exact_path_agreement: share of prompts whose served tokens (all stages) equal the reference
     generator's (mote/generate.py, run here in-process) token for token; must be 1.
   - fast_path_agreement: share of identical answers on the fast path (vLLM multi-LoRA when it can
     load the model, else transformers); fast_path_token_agreement: share of identical tokens.
   - router_overhead_per_hop: (client latency - expert call time) / expert call time, median over
     sequential requests; the router makes one hop per request (all stages run inside the expert).
3. A bounded load (N_LOAD requests, CONCURRENCY at a time) per path: p50/p95 latency, requests/s,
   errors (must be 0); the exact path with 1 and 2 expert replicas -> two_vs_one_replica.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import SHARED, model, write_result  # noqa: E402

N_TRAIN, N_EVAL, N_LOAD, CONCURRENCY = 64, 50, 48, 6
LIMITS = {"analysis": 24, "guidance": 24, "answer": 32}


def train(workdir: Path) -> Path:
    from training import real_chains

    from mote_ray.generation import write_chains
    from mote_ray.training.run import TrainConfig, run_train

    write_chains(real_chains(N_TRAIN), workdir / "gen", source="bench")
    run_train(TrainConfig(model=model(), max_steps=40, batch_size=8, lr=1e-2, checkpoint_every=40, max_len=256,
                          mote={"r": 8, "p_skip": 0.2}), workdir / "gen", workdir / "mote")
    import ray

    ray.shutdown()  # the servers start their own
    return workdir / "mote"


def eval_prompts() -> list[str]:
    import csv

    rows = list(csv.DictReader(open(SHARED / "datasets/advbench/harmful_behaviors.csv")))
    return [r["goal"] for r in rows[200:200 + N_EVAL]]


def reference(run: Path, prompts: list[str]) -> list[dict]:
    from mote_ray.chat import encode
    from mote_ray.mote.export import load_mote
    from mote_ray.mote.generate import MoTEGenerator
    from mote_ray.records import GenerationRequest

    m, tok = load_mote(run)
    gen = MoTEGenerator(m, tok)
    outs = [gen.generate(encode(tok, GenerationRequest(messages=[{"role": "user", "content": p}])), limits=LIMITS)
            for p in prompts]
    return [{"token_ids": o.token_ids, "answer": o.answer} for o in outs]


def ask(client, prompt: str) -> tuple[dict, float]:
    client, name = client
    t0 = time.perf_counter()
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                       max_tokens=LIMITS["answer"],
                                       extra_body={"mote": {"return_stages": True, "stage_max_tokens": LIMITS}})
    return r.model_dump()["mote"] | {"answer": r.choices[0].message.content}, time.perf_counter() - t0


def client_for(url: str):
    """(openai client, served model name); no retries, so every failure is counted."""
    from openai import OpenAI

    c = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    return c, c.models.list().data[0].id


def load(client, prompts: list[str]) -> dict:
    """N_LOAD requests, CONCURRENCY in flight: latency percentiles, throughput, errors."""
    work = [prompts[i % len(prompts)] for i in range(N_LOAD)]
    lat, errors = [], []

    def one(p):
        try:
            lat.append(ask(client, p)[1])
        except Exception as e:  # counted, and the benchmark fails below
            errors.append(f"{type(e).__name__}: {e}"[:200])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, work))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=20) if len(lat) > 1 else [float("nan")] * 19
    return {"requests": N_LOAD, "concurrency": CONCURRENCY, "errors": len(errors), "error_samples": errors[:3],
            "p50_s": statistics.median(lat) if lat else None, "p95_s": q[18], "requests_per_s": len(lat) / wall,
            "wall_s": wall}


def main() -> int:
    from mote_ray.engines import vllm_support
    from mote_ray.models import resolve_model
    from mote_ray.serving.local import LocalServer

    work = Path(tempfile.mkdtemp(prefix="mote-bench-serve-"))
    t = time.perf_counter()
    run = train(work)
    print(f"trained in {time.perf_counter() - t:.0f}s -> {run}")
    prompts = eval_prompts()
    ref = reference(run, prompts)
    raw: dict = {"prompts": N_EVAL, "limits": LIMITS}

    with LocalServer(["--model", str(run), "--replicas", "1", "--expert-cpus", "0.5"]) as srv:
        client = client_for(srv.base_url)
        served, overhead = [], []
        for p in prompts:
            m, latency = ask(client, p)
            served.append(m)
            overhead.append((latency - m["expert_seconds"]) / m["expert_seconds"])
        exact_same = sum(s["token_ids"] == r["token_ids"] for s, r in zip(served, ref))
        raw["exact"] = {"identical_token_sequences": exact_same, "load_1_replica": load(client, prompts),
                        "median_expert_seconds": statistics.median(m["expert_seconds"] for m in served)}
    print("exact, 1 replica:", raw["exact"]["load_1_replica"])
    with LocalServer(["--model", str(run), "--replicas", "2", "--expert-cpus", "0.5"]) as srv:
        raw["exact"]["load_2_replicas"] = load(client_for(srv.base_url), prompts)
    print("exact, 2 replicas:", raw["exact"]["load_2_replicas"])

    ok, why = vllm_support(resolve_model(str(run / "base")), "cpu")
    engine = "vllm" if ok else "transformers"
    with LocalServer(["--model", str(run), "--path", "fast", "--engine", engine, "--replicas", "1"]) as srv:
        client = client_for(srv.base_url)
        fast = [ask(client, p)[0] for p in prompts]
        raw["fast"] = {"engine": engine, "engine_reason": why, "load_1_replica": load(client, prompts)}
    print("fast:", raw["fast"]["load_1_replica"])
    same_answers = sum(f["answer"] == r["answer"] for f, r in zip(fast, ref))
    tokens_same = sum(sum(a == b for a, b in zip(f["token_ids"], r["token_ids"])) for f, r in zip(fast, ref))
    tokens_all = sum(max(len(f["token_ids"]), len(r["token_ids"])) for f, r in zip(fast, ref))
    raw["fast"].update(identical_answers=same_answers, identical_tokens=tokens_same, tokens=tokens_all)

    e1, e2 = raw["exact"]["load_1_replica"], raw["exact"]["load_2_replicas"]
    f1 = raw["fast"]["load_1_replica"]
    write_result("serving", {
        "exact_path_agreement": exact_same / N_EVAL,
        "fast_path_agreement": same_answers / N_EVAL,
        "fast_path_token_agreement": tokens_same / max(tokens_all, 1),
        "router_overhead_per_hop": statistics.median(overhead),
        "two_vs_one_replica": e2["requests_per_s"] / e1["requests_per_s"],
        "fast_vs_exact_throughput": f1["requests_per_s"] / e1["requests_per_s"],
    }, **raw)
    errors = e1["errors"] + e2["errors"] + f1["errors"]
    if errors:
        print(f"{errors} request(s) failed under load", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
