"""`mote-ray anchored pairs | dpo | eval`: anchored preference pairs and DPO."""

from __future__ import annotations

import json
import sys
from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import CliSubCommand

from mote_ray.anchored.dpo import DPOJobConfig
from mote_ray.anchored.job import PairsConfig
from mote_ray.commands.base import (ENGINE_HELP, Command, EngineChoice, config_flags, engine_flags, extend, set_field,
                                    with_config_flags)
from mote_ray.errors import MoteError


class _Tasks(Command):
    data: str = Field(description="a gold-labelled task file")
    format: Literal["arc", "openbookqa", "aqua", "logiqa", "safety"]
    gold: Literal["refuse", "answer"] | None = Field(None, description="safety tasks: what every prompt in --data "
                                                                        "should get")
    limit: int | None = Field(None, ge=1)

    def tasks(self):
        from mote_ray.anchored.data import load_tasks

        return load_tasks(self.data, self.format, self.gold, self.limit)


class _Pairs(_Tasks):
    """Sample N explained answers per task, judge them, build anchored + rank pairs."""

    set: list[str] = set_field("PairsConfig", "explanation_tokens=24", has_config=False)
    out: str

    def run(self) -> int:
        from mote_ray.anchored.job import run_pairs

        tasks, rejects = self.tasks()
        if not tasks:
            raise MoteError(f"no usable tasks in {self.data} ({len(rejects)} rejected)")
        stats = run_pairs(self.layers(PairsConfig), tasks, self.out, rejects)
        print(json.dumps(stats, indent=2))
        print(f"mote-ray: pairs in {self.out}/pairs.jsonl, samples in {self.out}/samples.jsonl", file=sys.stderr)
        return 0


Pairs = extend(_Pairs, {
    **config_flags(PairsConfig, engine_flags("engine."), help=ENGINE_HELP),
    **config_flags(PairsConfig, help={"n": "samples per prompt",
                                      "judge_model": "explanation judge and consultant (default: --model)"}),
})


class _DPO(Command):
    """DPO (TRL) on Ray Train; the reference is --model, a fresh LoRA is trained."""

    pairs: str = Field(description="an `anchored pairs` output directory")
    set: list[str] = set_field("DPOJobConfig", "epochs=3", has_config=False)
    out: str

    def run(self) -> int:
        from mote_ray.anchored.dpo import run_dpo

        m = run_dpo(self.layers(DPOJobConfig), self.pairs, self.out)
        print(json.dumps({k: v for k, v in m.items() if k != "history"}, indent=2))
        print(f"mote-ray: DPO adapter in {self.out}/adapter (reference: {m['reference']})", file=sys.stderr)
        return 0


DPO = with_config_flags(_DPO, DPOJobConfig, help={"model": "the fine-tuned model the pairs were sampled from"})


class AnchoredEval(_Tasks):
    """Base vs rank vs anchor: accuracy, judge score, win/tie/loss (Table 1)."""

    model: list[str] = Field(min_length=1, description="label=MODEL_OR_DPO_DIR; the first is the base the others "
                                                       "are compared with")
    engine: EngineChoice = "auto"
    judge_model: str | None = Field(None, description="explanation judge (default: the base)")
    out: str

    def run(self) -> int:
        from mote_ray.anchored.evaluate import evaluate

        models = {}
        for spec in self.model:
            label, sep, target = spec.partition("=")
            if not sep:
                raise MoteError(f"--model {spec!r}: write label=MODEL_OR_DPO_DIR")
            models[label] = target
        tasks, _ = self.tasks()
        evaluate(models, tasks, self.out, self.engine, self.judge_model)
        print(open(f"{self.out}/anchored_eval.md").read())
        return 0


class Anchored(Command):
    """Anchored preference pairs and DPO."""

    subcommands: ClassVar[tuple[str, ...]] = ("pairs", "dpo", "eval")
    pairs: CliSubCommand[Pairs] = Field(description=_Pairs.__doc__.rstrip("."))
    dpo: CliSubCommand[DPO] = Field(description=_DPO.__doc__.rstrip("."))
    eval: CliSubCommand[AnchoredEval] = Field(description=AnchoredEval.__doc__.rstrip("."))
