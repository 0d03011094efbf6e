"""Aligners: inspector accuracy on held-out questions, and what the squad proxy costs per request.

    .venv/bin/python benchmarks/aligners.py  ->  benchmarks/results/aligners.json

1. `aligners data` on 24 AdvBench questions x 3 criteria with the tiny real model, then `aligners
   train` (aligners + inspectors). inspector_accuracy: held-out accuracy over all criteria, weighted
   by held-out rows (the tiny model writes story text for y and y', so expect chance, ~0.5).
2. An upstream (a tiny MoTE model served by `mote-ray serve`) and the squad proxy in front of it,
   each in its own process; the same 20 prompts sequentially to each over loopback HTTP with the
   `openai` client. squad_latency_vs_upstream: median latency through the proxy / direct.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import SHARED, model, write_result  # noqa: E402

N_QUESTIONS, N_REQUESTS = 24, 20


def main() -> int:
    import csv

    from mote_ray.aligners.data import AlignerDataConfig, run_aligner_data
    from mote_ray.aligners.train import AlignerTrainConfig, run_aligner_train
    from mote_ray.generation import write_chains
    from mote_ray.serving.local import LocalServer
    from mote_ray.training.run import TrainConfig, run_train

    work = Path(tempfile.mkdtemp(prefix="mote-bench-aligners-"))
    rows = list(csv.DictReader(open(SHARED / "datasets/advbench/harmful_behaviors.csv")))
    qfile = work / "questions.jsonl"
    import json

    qfile.write_text("".join(json.dumps({"prompt": r["goal"]}) + "\n" for r in rows[:N_QUESTIONS]))
    t0 = time.perf_counter()
    stats = run_aligner_data(AlignerDataConfig(engine={"model": model()}, max_tokens={"draft": 48, "critique": 32,
                                                                                       "corrected": 48}),
                             [str(qfile)], work / "data")
    squad = run_aligner_train(AlignerTrainConfig(model=model(), max_steps=12), work / "data", work / "squad")
    build_s = time.perf_counter() - t0
    inspectors = [m["inspector"] for m in squad["metrics"].values() if m["inspector"].get("held_out_rows")]
    held = sum(i["held_out_rows"] for i in inspectors)
    accuracy = sum(i["accuracy"] * i["held_out_rows"] for i in inspectors) / max(held, 1)

    # The upstream: a tiny MoTE model on chains with real text (AdvBench goal / target, Alpaca answer-ish).
    write_chains([{"question": r["goal"], "analysis": r["target"], "answer": "I can't help with that."}
                  for r in rows[100:132]], work / "chains")
    run_train(TrainConfig(model=model(), max_steps=10, batch_size=8, checkpoint_every=10, mote={"r": 8}),
              work / "chains", work / "mote")
    import ray

    ray.shutdown()
    prompts = [r["goal"] for r in rows[300:300 + N_REQUESTS]]

    def latencies(url):
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        name = client.models.list().data[0].id
        out = []
        for p in prompts:
            t = time.perf_counter()
            client.chat.completions.create(model=name, max_tokens=32, messages=[{"role": "user", "content": p}],
                                           extra_body={"mote": {"stage_max_tokens": {"analysis": 16, "guidance": 16}}})
            out.append(time.perf_counter() - t)
        return out

    with LocalServer(["--model", str(work / "mote"), "--replicas", "1"]) as up:
        direct = latencies(up.base_url)
        with LocalServer(["--squad", str(work / "squad"), "--upstream", up.base_url + "/v1"],
                         command=("aligners", "serve")) as proxy:
            proxied = latencies(proxy.base_url)
    write_result("aligners", {
        "inspector_accuracy": accuracy,
        "squad_latency_vs_upstream": statistics.median(proxied) / statistics.median(direct),
    }, data=stats, squad_metrics=squad["metrics"], build_seconds=build_s, requests=N_REQUESTS,
        upstream_median_s=statistics.median(direct), proxy_median_s=statistics.median(proxied),
        held_out_rows=held)
    return 0


if __name__ == "__main__":
    sys.exit(main())
