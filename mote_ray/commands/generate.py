"""`mote-ray generate`: self-generate AlignCoT chains for prompt files (a Ray Data job)."""

from __future__ import annotations

import json
import sys
from typing import Literal

from pydantic import Field
from pydantic_settings import CliImplicitFlag, CliVariadicArg

from mote_ray.commands.base import (ADDRESS_HELP, ENGINE_HELP, RESTART_HELP, Command, config_flags, engine_flags,
                                    extend, set_field)
from mote_ray.commands.shared import announce_model
from mote_ray.generation import GenerateConfig


class _Generate(Command):
    """Self-generate AlignCoT chains for prompt files (Ray Data job)."""

    prompts: CliVariadicArg[list[str]] = Field(
        min_length=1, description="JSONL/JSON/CSV/Parquet/HH-RLHF files (.gz ok) or hf:NAME[:SPLIT]")
    out: str = Field(description="output directory (rerun with the same one to resume)")
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "hh-rlhf", "hf"] = "auto"
    column: str | None = Field(None, description="the prompt column (default: first of prompt, question, "
                                                 "instruction, goal, ...)")
    limit: int | None = Field(None, ge=1, description="only the first N accepted prompts")
    config: str | None = Field(None, description="YAML GenerateConfig (see jobs/configs/generate.yaml)")
    templates: str | None = Field(None, description="YAML overriding stage prompt templates")
    set: list[str] = set_field("GenerateConfig", "policy=drop")
    address: str | None = Field(None, description=ADDRESS_HELP)
    restart: CliImplicitFlag[bool] = Field(False, description=RESTART_HELP)

    def run(self) -> int:
        from mote_ray.generation import run_generate
        from mote_ray.stages import Templates

        extra = {"templates": Templates.from_file(self.templates).model_dump()} if self.templates else {}
        config = self.layers(GenerateConfig, **extra)
        announce_model(config.engine)
        stats = run_generate(config, self.prompts, self.out, fmt=self.format, column=self.column, limit=self.limit,
                             address=self.address, restart=self.restart)
        print(json.dumps(stats, indent=2))
        print(f"mote-ray: chains in {self.out}/chains, stats in {self.out}/stats.json", file=sys.stderr)
        return 0


Generate = extend(_Generate, {
    **config_flags(GenerateConfig, engine_flags("engine."), help=ENGINE_HELP),
    **config_flags(GenerateConfig, {"workers": "pool.size", "batch_size": "pool.batch_size"},
                   help={"workers": "engine actors (default: sized from the cluster)",
                         "batch_size": "prompts per engine batch"}),
    **config_flags(GenerateConfig),  # temperature, top_p, seed, policy, ... (every scalar field)
})
