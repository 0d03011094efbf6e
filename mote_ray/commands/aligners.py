"""`mote-ray aligners data | train | apply | serve`: aligners + inspectors, and the squad as a proxy."""

from __future__ import annotations

import json
import sys
from typing import ClassVar

from pydantic import Field
from pydantic_settings import CliImplicitFlag, CliSubCommand, CliVariadicArg

from mote_ray.aligners.data import AlignerDataConfig
from mote_ray.aligners.train import AlignerTrainConfig
from mote_ray.commands.base import (ADDRESS_HELP, ENGINE_HELP, RESTART_HELP, Command, EngineChoice, app_flags,
                                    config_flags, engine_flags, extend, set_field, with_config_flags)
from mote_ray.commands.shared import bind_policy, run_app
from mote_ray.errors import MoteError
from mote_ray.serving.config import ProxyConfig

_ONE_ENGINE = ("engine of every aligner (default transformers: one vLLM engine per aligner would each reserve "
               "memory)")


class _Data(Command):
    """Synthetic (draft, critique, corrected) rows per criterion (Ray Data)."""

    prompts: CliVariadicArg[list[str]] = Field(default_factory=list,
                                               description="question files (any `generate` input format)")
    topics: str | None = Field(None, description="comma-separated seed topics the model writes questions about")
    criteria: str | None = Field(None, description="comma-separated criteria (default: ethical,factual,helpful)")
    limit: int | None = Field(None, ge=1, description="first N questions")
    set: list[str] = set_field("AlignerDataConfig", "max_tokens.draft=64", has_config=False)
    out: str
    restart: CliImplicitFlag[bool] = Field(False, description=RESTART_HELP)

    def run(self) -> int:
        from mote_ray.aligners.data import run_aligner_data

        if not self.prompts and not self.topics:
            raise MoteError("give --prompts FILE... and/or --topics a,b,c")
        lists = {}
        if self.criteria is not None:
            lists["criteria"] = [c.strip() for c in self.criteria.split(",") if c.strip()]
        if self.topics is not None:
            lists["topics"] = [t.strip() for t in self.topics.split(",") if t.strip()]
        stats = run_aligner_data(self.layers(AlignerDataConfig, **lists), self.prompts, self.out, self.limit,
                                 restart=self.restart)
        print(json.dumps(stats, indent=2))
        print(f"mote-ray: rows in {self.out}/data, rejects in {self.out}/rejects.jsonl", file=sys.stderr)
        return 0


Data = extend(_Data, {**config_flags(AlignerDataConfig, engine_flags("engine."), help=ENGINE_HELP),
                      **config_flags(AlignerDataConfig)})


class _Train(Command):
    """One aligner model and one inspector per criterion -> a squad directory."""

    data: str = Field(description="an `aligners data` output directory")
    set: list[str] = set_field("AlignerTrainConfig", "lora_r=8", has_config=False)
    out: str

    def run(self) -> int:
        from mote_ray.aligners.train import run_aligner_train

        squad = run_aligner_train(self.layers(AlignerTrainConfig), self.data, self.out)
        print(json.dumps(squad["metrics"], indent=2))
        print(f"mote-ray: squad in {self.out} (squad.json)", file=sys.stderr)
        return 0


Train = with_config_flags(_Train, AlignerTrainConfig, help={
    "model": "the aligners' base LM (default: $MOTE_MODEL, else the offline tiny model)"})


class Apply(Command):
    """Align a file of (prompt, answer) rows with a squad (Ray Data)."""

    squad: str
    input: str = Field(description="JSONL/CSV/JSON/Parquet rows with `prompt` and `answer`")
    engine: EngineChoice = Field("transformers", description=_ONE_ENGINE)
    out: str

    def run(self) -> int:
        from mote_ray.aligners.squad import run_apply

        print(json.dumps(run_apply(self.squad, self.input, self.out, self.engine), indent=2))
        print(f"mote-ray: aligned rows in {self.out}/aligned.jsonl", file=sys.stderr)
        return 0


class _AlignersServe(Command):
    """An OpenAI-compatible proxy: upstream answers, aligned by the squad."""

    port: int = 8100
    host: str = "127.0.0.1"
    address: str | None = Field(None, description=ADDRESS_HELP)

    def run(self) -> int:
        from mote_ray.aligners.proxy import build_proxy

        app = build_proxy(self.layers(ProxyConfig, **bind_policy(self)))
        return run_app(app, self, f"squad proxy in front of {self.upstream}")


AlignersServe = extend(_AlignersServe, app_flags(ProxyConfig))


class Aligners(Command):
    """Aligners + inspectors: synthetic data, training, apply, serve as a proxy."""

    subcommands: ClassVar[tuple[str, ...]] = ("data", "train", "apply", "serve")
    data: CliSubCommand[Data] = Field(description=_Data.__doc__.rstrip("."))
    train: CliSubCommand[Train] = Field(description=_Train.__doc__.rstrip("."))
    apply: CliSubCommand[Apply] = Field(description=Apply.__doc__.rstrip("."))
    serve: CliSubCommand[AlignersServe] = Field(description=_AlignersServe.__doc__.rstrip("."))
