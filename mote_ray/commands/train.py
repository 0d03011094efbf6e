"""`mote-ray train`: fine-tune MoTE experts (or a baseline) on generated chains with Ray Train."""

from __future__ import annotations

import json

from pydantic import Field
from pydantic_settings import CliImplicitFlag

from mote_ray.commands.base import ADDRESS_HELP, RESTART_HELP, Command, set_field, with_config_flags
from mote_ray.training.run import TrainConfig


class _Train(Command):
    """Fine-tune MoTE experts (or a baseline) on generated chains with Ray Train.

    Every scalar TrainConfig field is a flag (--lr, --batch-size, ...); nested ones via --set (mote.r=8)."""

    chains: str = Field(description="a `mote-ray generate` output directory")
    out: str = Field(description="output directory (rerun with the same one to resume)")
    config: str | None = Field(None, description="YAML TrainConfig (see jobs/configs/train.yaml)")
    set: list[str] = set_field("TrainConfig", "mote.r=8")
    address: str | None = Field(None, description=ADDRESS_HELP)
    restart: CliImplicitFlag[bool] = Field(False, description=RESTART_HELP)

    def run(self) -> int:
        from mote_ray.training.run import run_train

        config = self.layers(TrainConfig)
        metrics = run_train(config, self.chains, self.out, address=self.address, restart=self.restart)
        print(json.dumps({k: metrics[k] for k in ("method", "steps", "chains", "first", "last", "adapters")}, indent=2))
        return 0


Train = with_config_flags(_Train, TrainConfig, help={
    "model": "base model (default: $MOTE_MODEL, else the offline tiny model)", "workers": "Ray Train workers"})
