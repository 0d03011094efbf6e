"""`mote-ray judge-fit`: fit the offline refusal judge on labelled responses (CSV)."""

from __future__ import annotations

import sys

from pydantic import Field
from pydantic_settings import CliVariadicArg

from mote_ray.commands.base import Command


class JudgeFit(Command):
    """Fit the offline refusal judge on labelled responses (CSV)."""

    data: CliVariadicArg[list[str]] = Field(
        min_length=1, description="CSV files with objective, assistant_response, human_score (1 = refusal)")
    out: str = Field(description="JSON file to write")

    def run(self) -> int:
        from mote_ray.eval.refusal import RefusalJudge, read_labels

        rows = read_labels(self.data)
        judge = RefusalJudge().fit([r["objective"] for r in rows], [r["response"] for r in rows],
                                   [r["label"] for r in rows])
        judge.save(self.out)
        print(f"mote-ray: refusal judge fitted on {len(rows)} labelled responses -> {self.out}", file=sys.stderr)
        return 0
