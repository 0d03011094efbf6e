"""Serving: the exact MoTE model on vLLM vs the transformers reference — agreement and speed, one run.

    .venv/bin/python benchmarks/serving.py  ->  benchmarks/results/serving.json

1. Trains a tiny MoTE model (stories260K-hd32, fp32, CPU) with the real training job on chains built
   from real data.
2. Agreement over real HTTP (`mote-ray serve`, the official `openai` client, greedy): 50 held-out
   AdvBench prompts x the four modes, stage budgets LIMITS. The served token sequences (all stages)
   of the vLLM MoTE engine (`--path exact --engine vllm`) vs the reference generator run here
   in-process (mote/reference.py, the oracle):
   - exact_path_agreement: share of identical sequences; exact_token_agreement: share of identical
     tokens (position by position, over the longer sequence); every divergence is listed with its
     first differing position and the reference's logit margin (top-1 minus top-2) there.
   - lora_path_agreement / lora_path_token_agreement: the same for `--path lora` (multi-LoRA, inexact).
   - prefix_cache_hit_rate: share of the stage requests' prompt tokens served from vLLM's prefix cache.
3. Throughput, same load on both sides: N_LOAD adaptive requests, CONCURRENCY at a time, against the
   vLLM server and the reference server (`--engine transformers`), both up at once, rounds interleaved
   (A, B, A, B); exact_vs_reference_throughput = median requests/s ratio. p50/p95 latency of the vLLM
   path at concurrency 1, 8 and 32. Errors must be 0.
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

N_TRAIN, N_EVAL, N_LOAD, ROUNDS = 64, 50, 96, 2
MODES = ("adaptive", "direct", "analysis", "full")
LIMITS = {"analysis": 96, "guidance": 96, "answer": 128}


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


def reference(run: Path, prompts: list[str]) -> dict:
    """{mode: [token ids]} from the reference engine, and the engine (for logit margins)."""
    from mote_ray.mote.offline import OfflineMoTE

    ref = OfflineMoTE(run, "transformers")
    ids = [ref.encode_chat(p) for p in prompts]
    return ref, ids, {m: [o.token_ids for o in ref.generate_many(ids, mode=m, limits=LIMITS)] for m in MODES}


def margin_at(ref, prompt_ids: list[int], seq: list[int], pos: int) -> float:
    """The reference's top-1 minus top-2 logit where the next token is seq[pos]."""
    from mote_ray.mote.routing import EXPERTS, NO_STAGE, stage_ids

    tokens = list(prompt_ids) + seq[:pos]
    prompt_expert = EXPERTS.index(ref.spec.prompt_expert)
    experts = [prompt_expert if s == NO_STAGE else s for s in stage_ids(tokens, ref.spec.stage_ids)]
    logits = ref.engine.logits(tokens, experts)[-1]
    top = logits.topk(2).values
    return float(top[0] - top[1])


def ask(client, prompt: str, mode: str = "adaptive") -> tuple[dict, float]:
    client, name = client
    t0 = time.perf_counter()
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                       extra_body={"mote": {"mode": mode, "return_stages": True,
                                                            "stage_max_tokens": LIMITS}})
    return r.model_dump()["mote"] | {"answer": r.choices[0].message.content}, time.perf_counter() - t0


def client_for(url: str):
    """(openai client, served model name); no retries, so every failure is counted."""
    from openai import OpenAI

    c = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    return c, c.models.list().data[0].id


def served(client, prompts: list[str]) -> dict:
    """{mode: [served mote fields]} — requests 16 at a time, as a server sees them."""
    out = {}
    with ThreadPoolExecutor(16) as pool:
        for m in MODES:
            out[m] = list(pool.map(lambda p: ask(client, p, m)[0], prompts))
    return out


def agreement(ref, prompt_ids, ref_seqs: dict, got: dict, margins: bool) -> dict:
    same = tok_same = tok_all = 0
    divergences = []
    for m in MODES:
        for i, (a, g) in enumerate(zip(ref_seqs[m], got[m])):
            b = g["token_ids"]
            same += a == b
            tok_same += sum(x == y for x, y in zip(a, b))
            tok_all += max(len(a), len(b))
            if a != b:
                pos = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                d = {"mode": m, "prompt": i, "first_difference": pos, "reference_len": len(a), "served_len": len(b)}
                if margins:
                    d["reference_logit_margin"] = round(margin_at(ref, prompt_ids[i], a, pos), 6) if pos < len(a) else None
                divergences.append(d)
    n = len(MODES) * len(prompt_ids)
    return {"sequences": n, "identical_sequences": same, "tokens": tok_all, "identical_tokens": tok_same,
            "agreement": same / n, "token_agreement": tok_same / max(tok_all, 1), "divergences": divergences}


def load(client, prompts: list[str], concurrency: int, n: int) -> dict:
    """n adaptive requests, `concurrency` in flight: latency percentiles, throughput, errors."""
    work = [prompts[i % len(prompts)] for i in range(n)]
    lat, errors = [], []

    def one(p):
        try:
            lat.append(ask(client, p)[1])
        except Exception as e:  # counted, and the benchmark fails below
            errors.append(f"{type(e).__name__}: {e}"[:200])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, work))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=20) if len(lat) > 1 else [float("nan")] * 19
    return {"requests": n, "concurrency": concurrency, "errors": len(errors), "error_samples": errors[:3],
            "p50_s": statistics.median(lat) if lat else None, "p95_s": q[18], "requests_per_s": len(lat) / wall,
            "wall_s": wall}


def main() -> int:
    from mote_ray.serving.local import LocalServer

    work = Path(tempfile.mkdtemp(prefix="mote-bench-serve-"))
    t = time.perf_counter()
    run = train(work)
    print(f"trained in {time.perf_counter() - t:.0f}s -> {run}")
    prompts = eval_prompts()
    t = time.perf_counter()
    ref, prompt_ids, ref_seqs = reference(run, prompts)
    print(f"reference: {len(MODES) * N_EVAL} chains in {time.perf_counter() - t:.0f}s")
    raw: dict = {"prompts": N_EVAL, "modes": MODES, "limits": LIMITS}
    common = ["--model", str(run), "--replicas", "1", "--expert-cpus", "0.5"]
    errors = 0
    with LocalServer(common + ["--engine", "vllm"], ready_timeout=600) as fast, \
            LocalServer(common + ["--engine", "transformers"], ready_timeout=600) as slow:
        cv, cr = client_for(fast.base_url), client_for(slow.base_url)
        got = served(cv, prompts)
        raw["exact"] = agreement(ref, prompt_ids, ref_seqs, got, margins=True)
        raw["exact"]["engine"] = {g.get("engine") for m in MODES for g in got[m]}.pop()
        cached = sum(g["prompt_cache"]["cached_tokens"] for m in MODES for g in got[m])
        requested = sum(g["prompt_cache"]["requested_tokens"] for m in MODES for g in got[m])
        raw["prefix_cache"] = {"cached_tokens": cached, "requested_tokens": requested}
        print("exact:", {k: v for k, v in raw["exact"].items() if k != "divergences"})
        rounds = {"vllm": [], "reference": []}
        for _ in range(ROUNDS):  # interleaved, so both sides see the same machine
            rounds["vllm"].append(load(cv, prompts, 32, N_LOAD))
            rounds["reference"].append(load(cr, prompts, 32, N_LOAD))
            print("round:", rounds["vllm"][-1]["requests_per_s"], rounds["reference"][-1]["requests_per_s"])
        raw["throughput_c32"] = rounds
        raw["latency_vllm"] = {f"c{c}": load(cv, prompts, c, max(2 * c, 16)) for c in (1, 8, 32)}
        errors += sum(r["errors"] for side in rounds.values() for r in side)
        errors += sum(r["errors"] for r in raw["latency_vllm"].values())
    ratio = [v["requests_per_s"] / r["requests_per_s"] for v, r in zip(rounds["vllm"], rounds["reference"])]
    with LocalServer(["--model", str(run), "--path", "lora", "--engine", "vllm", "--replicas", "1"],
                     ready_timeout=600) as srv:
        raw["lora"] = agreement(ref, prompt_ids, ref_seqs, served(client_for(srv.base_url), prompts), margins=False)
        raw["lora"].pop("divergences")
    lat = raw["latency_vllm"]
    write_result("serving", {
        "exact_path_agreement": raw["exact"]["agreement"],
        "exact_token_agreement": raw["exact"]["token_agreement"],
        "exact_vs_reference_throughput": statistics.median(ratio),
        "exact_vs_reference_throughput_spread": max(ratio) - min(ratio),
        "prefix_cache_hit_rate": cached / max(requested, 1),
        "lora_path_agreement": raw["lora"]["agreement"],
        "lora_path_token_agreement": raw["lora"]["token_agreement"],
        **{f"p50_s_c{c}": lat[f"c{c}"]["p50_s"] for c in (1, 8, 32)},
        **{f"p95_s_c{c}": lat[f"c{c}"]["p95_s"] for c in (1, 8, 32)},
        "errors": errors,
    }, **raw)
    if errors:
        print(f"{errors} request(s) failed under load", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
