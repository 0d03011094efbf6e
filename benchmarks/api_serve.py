"""What the API benchmarks (api_fuzz.py, soak.py) serve: a tiny trained MoTE model and a squad.

Both are built once per work directory (MOTE_API_BENCH_WORK to reuse one between runs while
developing) with the real training jobs, then served by `mote-ray serve` / `mote-ray aligners serve`
in child processes (LocalServer), each with its own Ray under a short RAY_TMPDIR so every log file of
the run can be searched for the keys afterwards.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from common import SHARED, model


def work_dir(name: str) -> Path:
    return Path(os.environ.get("MOTE_API_BENCH_WORK") or tempfile.mkdtemp(prefix=f"mote-{name}-"))


def trained_mote(work: Path) -> Path:
    """A tiny MoTE model trained on format chains (the serving tests' recipe), built once per `work`."""
    out = work / "mote"
    if (out / "mote").is_dir() and (out / "base").is_dir():
        return out
    from mote_ray.generation import write_chains
    from mote_ray.training.run import TrainConfig, run_train

    rows = [{"id": f"f{i}", "question": f"Question {i}?", "analysis": "Low risk.", "guidance": "Be brief.",
             "answer": "Here you go."} for i in range(16)]
    write_chains(rows, work / "chains", source="bench")
    run_train(TrainConfig(model=model(), max_steps=30, batch_size=8, lr=1e-2, checkpoint_every=30,
                          mote={"r": 8, "p_skip": 0.0}), work / "chains", out)
    import ray

    ray.shutdown()  # the servers start their own
    return out


def trained_squad(work: Path) -> Path:
    """Aligners + inspectors for two criteria from the tiny model (the aligner tests' recipe)."""
    out = work / "squad"
    if (out / "squad.json").is_file():
        return out
    import csv

    from mote_ray.aligners.data import AlignerDataConfig, run_aligner_data
    from mote_ray.aligners.train import AlignerTrainConfig, run_aligner_train

    rows = list(csv.DictReader(open(SHARED / "datasets/advbench/harmful_behaviors.csv")))[:12]
    q = work / "questions.jsonl"
    q.write_text("".join(json.dumps({"prompt": r["goal"]}) + "\n" for r in rows))
    run_aligner_data(AlignerDataConfig(engine={"model": model(), "engine": "transformers"},
                                       criteria=["ethical", "helpful"], topics=["cooking"], questions_per_topic=2,
                                       max_tokens={"draft": 32, "critique": 24, "corrected": 32}), [str(q)],
                     work / "aligner-data")
    run_aligner_train(AlignerTrainConfig(model=model(), max_steps=8, lr=1e-3, batch_size=8), work / "aligner-data", out)
    import ray

    ray.shutdown()
    return out


def ray_tmp() -> str:
    return tempfile.mkdtemp(prefix="mr-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes


def key_leaks(keys: list[str], dirs: list[str], outputs: list[str]) -> list[str]:
    """Every file under `dirs` (Ray session logs included) and server output that contains a key."""
    found = [f"server output #{i}" for i, text in enumerate(outputs) if any(k in text for k in keys)]
    for d in dirs:
        for path in Path(d).rglob("*"):
            try:
                if path.is_file() and not path.is_symlink():
                    data = path.read_bytes()
                    found += [str(path) for k in keys if k.encode() in data]
            except OSError:  # a socket or a file Ray removed meanwhile
                continue
    return found


def rss_of(pids: list[int]) -> int:
    """Resident set size in bytes, summed over `pids` (from /proc)."""
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total
