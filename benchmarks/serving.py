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
3. Throughput, same load on both sides: N_LOAD adaptive requests, 32 at a time, against the vLLM server
   and the reference server (`--engine transformers`), both up at once, rounds interleaved (A, B, A, B),
   each round on prompts no earlier phase sent (so vLLM's prefix cache carries nothing over);
   exact_vs_reference_throughput = median requests/s ratio; prefix_cache_hit_rate from those rounds. p50/p95 latency of the vLLM
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

N_TRAIN, N_EVAL, N_LOAD, ROUNDS = 64, 50, 64, 2
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


def advbench(start: int, n: int) -> list[str]:
    import csv

    rows = list(csv.DictReader(open(SHARED / "datasets/advbench/harmful_behaviors.csv")))
    return [r["goal"] for r in rows[start:start + n]]


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


def load(client, prompts: list[str], concurrency: int) -> dict:
    """One adaptive request per prompt, `concurrency` in flight: latency percentiles, throughput, errors,
    and the prefix cache's share of the stage requests' prompt tokens (vLLM)."""
    work, lat, errors, cache = prompts, [], [], [0, 0]

    def one(p):
        try:
            m, t = ask(client, p)
            lat.append(t)
            cache[0] += m["prompt_cache"]["cached_tokens"]
            cache[1] += m["prompt_cache"]["requested_tokens"]
        except Exception as e:  # counted, and the benchmark fails below
            errors.append(f"{type(e).__name__}: {e}"[:200])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, work))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=20) if len(lat) > 1 else [float("nan")] * 19
    return {"requests": len(work), "concurrency": concurrency, "errors": len(errors), "error_samples": errors[:3],
            "p50_s": statistics.median(lat) if lat else None, "p95_s": q[18], "requests_per_s": len(lat) / wall,
            "wall_s": wall, "cached_tokens": cache[0], "requested_tokens": cache[1]}


def main() -> int:
    from mote_ray.serving.local import LocalServer

    work = Path(tempfile.mkdtemp(prefix="mote-bench-serve-"))
    t = time.perf_counter()
    run = train(work)
    print(f"trained in {time.perf_counter() - t:.0f}s -> {run}")
    # Every phase gets prompts no earlier phase sent: vLLM's prefix cache must not carry one phase's
    # work into the next (the reference has no such cache).
    prompts = advbench(200, N_EVAL)
    rounds_prompts = [advbench(250 + i * N_LOAD, N_LOAD) for i in range(ROUNDS)]
    lat_prompts = advbench(250 + ROUNDS * N_LOAD, 72)
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
        engines = {g.get("engine") for m in MODES for g in got[m]}
        if engines != {"vllm"}:
            raise SystemExit(f"the exact path ran on {engines}, not the vLLM MoTE engine")
        raw["exact"]["engine"] = "vllm"
        print("exact:", {k: v for k, v in raw["exact"].items() if k != "divergences"})
        rounds = {"vllm": [], "reference": []}
        for batch in rounds_prompts:  # interleaved, so both sides see the same machine; fresh prompts each round
            rounds["vllm"].append(load(cv, batch, 32))
            rounds["reference"].append(load(cr, batch, 32))
            print("round:", rounds["vllm"][-1]["requests_per_s"], rounds["reference"][-1]["requests_per_s"])
        raw["throughput_c32"] = rounds
        # Within a chain, each stage request reuses the earlier stages' KV (prompts new to the server).
        cached = sum(r["cached_tokens"] for r in rounds["vllm"])
        requested = sum(r["requested_tokens"] for r in rounds["vllm"])
        raw["prefix_cache"] = {"cached_tokens": cached, "requested_tokens": requested, "phase": "throughput rounds"}
        raw["latency_vllm"] = {f"c{c}": load(cv, lat_prompts[i:i + n], c)
                               for c, i, n in ((1, 0, 16), (8, 16, 16), (32, 32, 40))}
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
