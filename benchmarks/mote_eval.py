"""Evaluating a MoTE model: the vLLM MoTE engine vs the transformers reference, same 300 prompts.

    .venv/bin/python benchmarks/mote_eval.py  ->  benchmarks/results/mote_eval.json

Trains a tiny MoTE model (as benchmarks/serving.py does), then runs `mote-ray eval` as a user would —
`--model RUN@adaptive --suite harmlessness` on the first 300 AdvBench prompts — once with
`--engine vllm` and once with `--engine transformers`, ROUNDS times each, interleaved (A, B, A, B).
ratios.vllm_vs_reference_eval_speed = median wall time of the reference runs / of the vLLM runs
(whole command: Ray start, engine start, answering, scoring, report). Both sides answer the same
prompts with the same stage budgets; the answers are compared too (greedy: they should agree).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import SHARED, write_result  # noqa: E402

N_PROMPTS, ROUNDS = 300, 2


def run_eval(run: Path, engine: str, out: Path) -> float:
    cmd = [sys.executable, "-m", "mote_ray.cli", "eval", "--model", f"{run}@adaptive", "--suite", "harmlessness",
           "--data", str(SHARED / "datasets/advbench/harmful_behaviors.csv"), "--format", "advbench",
           "--limit", str(N_PROMPTS), "--max-tokens", "64", "--engine", engine, "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"`mote-ray eval --engine {engine}` failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall


def answers(out: Path) -> dict:
    rows = [json.loads(line) for f in sorted((out / "responses").rglob("*.jsonl")) for line in f.open()]
    return {r["id"]: (r.get("response"), r.get("error"), r.get("engine")) for r in rows}


def main() -> int:
    from serving import train

    work = Path(tempfile.mkdtemp(prefix="mote-bench-eval-"))
    run = train(work)
    walls = {"vllm": [], "transformers": []}
    outs = {}
    for i in range(ROUNDS):
        for engine in ("vllm", "transformers"):
            out = work / f"eval-{engine}-{i}"
            walls[engine].append(run_eval(run, engine, out))
            outs[engine] = out
            print(engine, f"round {i}: {walls[engine][-1]:.1f}s")
    a, b = answers(outs["vllm"]), answers(outs["transformers"])
    engines = {k: sorted({e for _, _, e in v.values() if e}) for k, v in (("vllm", a), ("transformers", b))}
    errors = {k: sum(1 for _, err, _ in v.values() if err) for k, v in (("vllm", a), ("transformers", b))}
    same = sum(a[k][0] == b[k][0] for k in a if k in b)
    write_result("mote_eval", {
        "vllm_vs_reference_eval_speed": statistics.median(walls["transformers"]) / statistics.median(walls["vllm"]),
        "identical_answers": same / max(len(a), 1),
    }, prompts=N_PROMPTS, wall_s=walls, engines_used=engines, error_rows=errors, answered=len(a))
    return 0 if len(a) == N_PROMPTS and engines["vllm"] == ["vllm"] else 1


if __name__ == "__main__":
    sys.exit(main())
