"""Evaluating a MoTE model: the vLLM MoTE engine vs the transformers reference, same 300 prompts.

    .venv/bin/python benchmarks/mote_eval.py  ->  benchmarks/results/mote_eval.json

Trains a tiny MoTE model (as benchmarks/serving.py does), then runs `mote-ray eval` as a user would —
`--model RUN@adaptive --suite harmlessness` on the first 300 AdvBench prompts, the eval's default
stage budgets — once with `--engine vllm` and once with `--engine transformers`, ROUNDS times each,
interleaved (A, B, A, B). Both sides answer the same prompts with the same budgets; the answers are
compared too (greedy: they must agree).

  ratios.vllm_vs_reference_eval_speed  the answering: seconds the responder actors spent answering
      the 300 prompts (each batch's wall time, from the eval's own rows), reference / vLLM, medians.
  ratios.vllm_vs_reference_eval_wall   the whole command (Ray start, engine start, answering,
      scoring, report), reference / vLLM. On this 293K model the fixed costs dominate it (vLLM's
      engine start-up is tens of seconds on CPU); on a real model the answering does.
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
           "--limit", str(N_PROMPTS), "--engine", engine, "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"`mote-ray eval --engine {engine}` failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "responses").rglob("*.jsonl")) for line in f.open()]


def answering_seconds(out: Path) -> float:
    """Seconds the responders spent answering: each row carries its batch's wall time / batch size."""
    return sum(r.get("seconds") or 0.0 for r in rows(out))


def answers(out: Path) -> dict:
    return {r["id"]: (r.get("response"), r.get("error"), r.get("engine")) for r in rows(out)}


def main() -> int:
    from serving import train

    work = Path(tempfile.mkdtemp(prefix="mote-bench-eval-"))
    run = train(work)
    walls = {"vllm": [], "transformers": []}
    answering = {"vllm": [], "transformers": []}
    outs = {}
    for i in range(ROUNDS):
        for engine in ("vllm", "transformers"):
            out = work / f"eval-{engine}-{i}"
            walls[engine].append(run_eval(run, engine, out))
            answering[engine].append(answering_seconds(out))
            outs[engine] = out
            print(engine, f"round {i}: {walls[engine][-1]:.1f}s, answering {answering[engine][-1]:.1f}s")
    a, b = answers(outs["vllm"]), answers(outs["transformers"])
    engines = {k: sorted({e for _, _, e in v.values() if e}) for k, v in (("vllm", a), ("transformers", b))}
    errors = {k: sum(1 for _, err, _ in v.values() if err) for k, v in (("vllm", a), ("transformers", b))}
    same = sum(a[k][0] == b[k][0] for k in a if k in b)
    write_result("mote_eval", {
        "vllm_vs_reference_eval_speed": statistics.median(answering["transformers"]) / statistics.median(answering["vllm"]),
        "vllm_vs_reference_eval_wall": statistics.median(walls["transformers"]) / statistics.median(walls["vllm"]),
        "identical_answers": same / max(len(a), 1),
    }, prompts=N_PROMPTS, wall_s=walls, answering_s=answering, engines_used=engines, error_rows=errors,
        answered=len(a), tokens={k: sum(r.get("completion_tokens") or 0 for r in rows(outs[k])) for k in outs})
    return 0 if len(a) == N_PROMPTS and engines["vllm"] == ["vllm"] and same >= 0.98 * len(a) else 1


if __name__ == "__main__":
    sys.exit(main())
