"""`mote-ray judge-fit`: fit the offline refusal judge on labelled responses (CSV)."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field
from pydantic_settings import CliVariadicArg

from mote_ray.commands.base import Command


class JudgeFit(Command):
    """Fit the offline refusal judge on labelled responses (CSV)."""

    data: CliVariadicArg[list[str]] = Field(
        min_length=1, description="CSV files with objective, assistant_response, human_score (1 = refusal)")
    out: str = Field(description="JSON file to write (rows left out: OUT's name with .rejects.jsonl)")

    def run(self) -> int:
        from mote_ray.eval.refusal import RefusalJudge, read_labels

        rows, rejects = read_labels(self.data)
        out = Path(self.out)
        rejected = out.with_name(f"{out.stem}.rejects.jsonl")
        rejected.write_text("".join(r.model_dump_json() + "\n" for r in rejects))
        if rejects:
            print(f"mote-ray: {len(rejects)} rows rejected (reasons in {rejected})", file=sys.stderr)
        judge = RefusalJudge().fit([r["objective"] for r in rows], [r["response"] for r in rows],
                                   [r["label"] for r in rows])
        judge.save(out)
        print(f"mote-ray: refusal judge fitted on {len(rows)} labelled responses -> {out}", file=sys.stderr)
        return 0
