"""Anchored categories and preference pairs (design.md, "Anchored preference pairs"). Pure functions.

Per prompt, over its valid judged samples:
  consistently incorrect  every sample wrong (checked first: the paper's pseudo-code checks it last
                          and so never reaches it) -> consultant explanation of the gold answer vs a
                          sampled one
  consistently correct    every sample right -> best vs worst explanation (no pair if all tie)
  variable                some right, some wrong -> best correct vs a wrong one scoring lower
The `rank` baseline: best explanation vs a random other sample, regardless of correctness.
Ties and random picks use a per-prompt generator seeded from (seed, prompt id): reproducible.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    task_id: str
    index: int
    text: str  # the whole formatted output, as it would be trained on
    correct: bool
    score: float | None  # explanation judge, 0-5; None when the judge's reply did not parse


@dataclass(frozen=True)
class Pair:
    task_id: str
    kind: str  # "anchor" | "rank"
    category: str  # correct | incorrect | variable (rank: "rank")
    chosen: str
    rejected: str
    chosen_score: float | None
    rejected_score: float | None


def category(samples: list[Sample]) -> str:
    if all(not s.correct for s in samples):
        return "incorrect"
    if all(s.correct for s in samples):
        return "correct"
    return "variable"


def _rng(seed: int, task_id: str) -> random.Random:
    return random.Random(seed * 1_000_003 + zlib.crc32(task_id.encode()))


def _best(samples: list[Sample], rng: random.Random, worst: bool = False) -> Sample:
    target = (min if worst else max)(s.score for s in samples)
    return rng.choice([s for s in samples if s.score == target])


def anchored_pair(samples: list[Sample], consultant: str | None, seed: int = 0) -> tuple[Pair | None, str]:
    """(pair, category) or (None, reason). `samples` are one prompt's valid samples."""
    if not samples:
        return None, "no valid samples"
    scored = [s for s in samples if s.score is not None]
    tid, cat = samples[0].task_id, category(samples)
    rng = _rng(seed, tid)
    if cat == "incorrect":
        if not consultant:
            return None, "incorrect: no valid consultant explanation"
        loser = rng.choice(samples)
        return Pair(tid, "anchor", cat, consultant, loser.text, None, loser.score), cat
    if cat == "correct":
        if len(scored) < 2:
            return None, "correct: fewer than two judged samples"
        best, worst = _best(scored, rng), _best(scored, rng, worst=True)
        if best.score == worst.score:
            return None, "correct: all explanations tied"
        return Pair(tid, "anchor", cat, best.text, worst.text, best.score, worst.score), cat
    right = [s for s in scored if s.correct]
    if not right:
        return None, "variable: no judged correct sample"
    best = _best(right, rng)
    losers = [s for s in scored if not s.correct and s.score < best.score]
    if not losers:
        return None, "variable: no wrong sample scores lower than the best correct one"
    loser = rng.choice(losers)
    return Pair(tid, "anchor", cat, best.text, loser.text, best.score, loser.score), cat


def rank_pair(samples: list[Sample], seed: int = 0) -> tuple[Pair | None, str]:
    scored = [s for s in samples if s.score is not None]
    if len(scored) < 2:
        return None, "rank: fewer than two judged samples"
    rng = _rng(seed + 1, samples[0].task_id)
    best = _best(scored, rng)
    other = rng.choice([s for s in scored if s is not best])
    return Pair(best.task_id, "rank", "rank", best.text, other.text, best.score, other.score), "rank"


def build_pairs(samples: list[Sample], consultants: dict[str, str], seed: int = 0) -> tuple[list[Pair], dict]:
    """Every prompt's anchored and rank pairs, plus counts per category and per no-pair reason."""
    by_task: dict[str, list[Sample]] = {}
    for s in samples:
        by_task.setdefault(s.task_id, []).append(s)
    pairs, stats = [], {"categories": Counter(), "no_pair": Counter(), "pairs": Counter()}
    for tid, group in sorted(by_task.items()):
        stats["categories"][category(group)] += 1
        for kind, (pair, why) in (("anchor", anchored_pair(group, consultants.get(tid), seed)),
                                  ("rank", rank_pair(group, seed))):
            if pair:
                pairs.append(pair)
                stats["pairs"][kind] += 1
            else:
                stats["no_pair"][why] += 1
    return pairs, {k: dict(v) for k, v in stats.items()}
