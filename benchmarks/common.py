"""Helpers shared by the benchmark scripts: where the tiny models/data live, and writing results."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MOTE_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "benchmarks" / "results"


def model(name: str = "stories260K-hd32") -> str:
    return os.environ.get("MOTE_BENCH_MODEL") or str(SHARED / "models" / name)


def alpaca_prompts(n: int) -> list[str]:
    path = SHARED / "datasets" / "alpaca_instructions" / "alpaca.json"
    if path.is_file():
        rows = json.loads(path.read_text())
        return [r["instruction"] for r in rows[:n]]
    return [f"Write a short story about a cat named number {i}." for i in range(n)]


def write_result(name: str, ratios: dict, **raw) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {"ratios": {k: round(v, 4) for k, v in ratios.items()}, **raw,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    out.write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload["ratios"], indent=2))
    print(f"wrote {out}")
    return out


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
