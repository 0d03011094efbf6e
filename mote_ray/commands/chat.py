"""`mote-ray chat`: answer one prompt with a trained MoTE model and print the stages."""

from __future__ import annotations

import json
import sys
from typing import Literal

from pydantic import Field
from pydantic_settings import CliImplicitFlag, CliPositionalArg

from mote_ray.commands.base import Command, EngineChoice


class Chat(Command):
    """Answer one prompt with a trained MoTE model and print the stages."""

    prompt: CliPositionalArg[str]
    model: str = Field(description="a `mote-ray train` output directory")
    engine: EngineChoice = Field("auto", description="auto: the vLLM MoTE engine where vLLM can load the model, "
                                                     "else the transformers reference")
    mode: Literal["adaptive", "direct", "analysis", "full"] = "adaptive"
    max_tokens: int = Field(64, ge=1, description="per stage")
    temperature: float = Field(0.0, ge=0)
    as_json: CliImplicitFlag[bool] = Field(False, alias="json",
                                           description="print one JSON object (answer, stages, engine) last")

    def run(self) -> int:
        from pathlib import Path

        from mote_ray.errors import MoteError
        from mote_ray.mote.offline import OfflineMoTE

        if not Path(self.model).is_dir():
            raise MoteError(f"no trained model at {self.model} (expected a `mote-ray train` output directory)")
        mote = OfflineMoTE(self.model, self.engine)
        print(f"mote-ray: engine {mote.name} ({mote.why})", file=sys.stderr)
        limits = {s: self.max_tokens for s in ("analysis", "guidance", "answer")}
        out = mote.generate_many([mote.encode_chat(self.prompt)], mode=self.mode, limits=limits,
                                 temperature=self.temperature)[0]
        mote.close()
        if self.as_json:
            print(json.dumps({"answer": out.answer, "stages": out.stages, "engine": mote.name,
                              "finish_reason": out.finish_reason, "completion_tokens": len(out.token_ids)}))
        else:
            for stage, text in out.stages.items():
                print(f"[{stage}] {text}")
        return 0
