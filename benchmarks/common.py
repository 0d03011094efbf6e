"""Helpers shared by the benchmark scripts: where the tiny models/data live, running the sides of a
ratio interleaved over rounds, and writing results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

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


def cpu_flags() -> list[str]:
    """The CPU's vector flags that decide fp32/bf16 speed (bf16 is emulated without avx512_bf16/amx)."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in set(flags) if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))


def commit() -> str | None:
    """The checkout's commit, "+dirty" when it has uncommitted changes: which code wrote a result."""
    import subprocess

    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+dirty" if dirty else "")


def write_result(name: str, ratios: dict, **raw) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {"ratios": {k: round(v, 4) for k, v in ratios.items()}, **raw,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_flags": cpu_flags(),
                           "commit": commit(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
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


def timed(fn: Callable[[], Any]) -> Callable[[], float]:
    """`fn` as a side that returns its own wall time in seconds."""
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def interleave(sides: dict[str, Callable[[], Any]], rounds: int, *, warmup: bool = True) -> dict[str, list]:
    """Each side's results over `rounds` rounds, the sides run in turn (A, B, A, B, ...), so a slow
    spell of a shared machine lands on every side alike instead of on whichever ran then. With
    `warmup`, every side first runs once and its result is dropped (caches, allocator, lazy imports
    and first-shape work are paid before any round)."""
    if warmup:
        for name, fn in sides.items():
            print(f"warm-up {name}: {fn()}", flush=True)
    out: dict[str, list] = {name: [] for name in sides}
    for i in range(rounds):
        for name, fn in sides.items():
            out[name].append(fn())
            print(f"round {i + 1}/{rounds} {name}: {out[name][-1]}", flush=True)
    return out


def summary(xs: list[float]) -> dict:
    """A ratio over rounds: the median (what `ratios` reports), min, max, spread = (max - min) / median,
    and every round's value in order."""
    med = statistics.median(xs)
    return {"median": med, "min": min(xs), "max": max(xs), "spread": (max(xs) - min(xs)) / med, "runs": list(xs)}


def per_round(num: list[float], den: list[float]) -> list[float]:
    """num[i] / den[i] for each round i (the two sides of a ratio measured in the same round)."""
    assert len(num) == len(den), "both sides of a ratio need the same rounds"
    return [a / b for a, b in zip(num, den)]
