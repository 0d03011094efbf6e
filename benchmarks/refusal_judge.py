"""The offline refusal judge vs the string rules alone, on held-out human-labelled refusals.

    .venv/bin/python benchmarks/refusal_judge.py  ->  benchmarks/results/refusal_judge.json

Data: ../shared/datasets/refusal_labels/refusal*.csv (169 rows after de-duplication; 1 = refusal,
off-topic answers included). Each of SPLITS stratified 70/30 splits fits the judge on its 70% and
scores the 30% it never saw; the ratios are means over splits (min/max beside them), the rules need
no fitting and are scored on the same held-out rows.
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import SHARED, write_result  # noqa: E402

SPLITS, HELD_OUT = 5, 0.3


def main() -> int:
    from mote_ray.eval.refusal import RefusalJudge, read_labels, rule_refusal, scores, split

    rows, _ = read_labels(sorted((SHARED / "datasets" / "refusal_labels").glob("refusal*.csv")))
    judge_runs, rule_runs = [], []
    for seed in range(SPLITS):
        train, test = split(rows, HELD_OUT, seed)
        judge = RefusalJudge().fit([r["objective"] for r in train], [r["response"] for r in train],
                                   [r["label"] for r in train], seed=seed)
        labels = [r["label"] for r in test]
        judge_runs.append(scores(labels, judge.refused([r["objective"] for r in test], [r["response"] for r in test])))
        rule_runs.append(scores(labels, [rule_refusal(r["response"]) for r in test]))
        print(f"split {seed}: judge acc {judge_runs[-1]['accuracy']:.3f} f1 {judge_runs[-1]['f1']:.3f} | "
              f"rules acc {rule_runs[-1]['accuracy']:.3f} f1 {rule_runs[-1]['f1']:.3f}  (n={len(test)})")

    def mean(runs, k):
        return statistics.mean(r[k] for r in runs)

    write_result("refusal_judge", {
        "accuracy": mean(judge_runs, "accuracy"), "f1": mean(judge_runs, "f1"),
        "rules_accuracy": mean(rule_runs, "accuracy"), "rules_f1": mean(rule_runs, "f1"),
        "accuracy_vs_rules": mean(judge_runs, "accuracy") / mean(rule_runs, "accuracy"),
    }, rows=len(rows), splits=SPLITS, held_out=HELD_OUT, held_out_rows=judge_runs[0]["n"],
        judge={"per_split": judge_runs, "accuracy_min": min(r["accuracy"] for r in judge_runs),
               "accuracy_max": max(r["accuracy"] for r in judge_runs)},
        rules={"per_split": rule_runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
