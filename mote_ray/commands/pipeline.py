"""`mote-ray pipeline`: generate -> train -> evaluate (base vs MoTE) in one resumable job."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import CliImplicitFlag

from mote_ray.commands.base import RESTART_HELP, Command, set_field, with_config_flags
from mote_ray.pipeline import PipelineConfig


class _Pipeline(Command):
    """Generate -> train -> evaluate (base vs MoTE) in one resumable job."""

    out: str
    config: str | None = Field(None, description="YAML PipelineConfig (jobs/configs/pipeline.yaml)")
    set: list[str] = set_field("PipelineConfig", "train.max_steps=5")
    restart: CliImplicitFlag[bool] = Field(False, description=RESTART_HELP)

    def run(self) -> int:
        from mote_ray.pipeline import run_pipeline

        run_pipeline(self.layers(PipelineConfig), self.out, restart=self.restart)
        return 0


Pipeline = with_config_flags(_Pipeline, PipelineConfig, help={
    "model": "base model (default: $MOTE_MODEL, else the offline tiny model)"})
