"""`mote-ray serve`: a trained MoTE model behind an OpenAI-compatible API on Ray Serve (blocks)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import CliImplicitFlag

from mote_ray.commands.base import ADDRESS_HELP, Command, EngineChoice
from mote_ray.commands.shared import bind_policy, run_app


class Serve(Command):
    """Serve a trained MoTE model: OpenAI-compatible API on Ray Serve (blocks)."""

    model: str = Field(description="a `mote-ray train` output directory")
    path: Literal["exact", "lora"] = Field(
        "exact", description="exact: the token-routed MoTE model (vLLM where it loads, else the transformers "
                             "reference); lora: per-stage folded LoRA adapters, each stage re-reads the prefix "
                             "(inexact, for comparison)")
    engine: EngineChoice = Field("auto", description="auto: vLLM where it can load the model, else transformers")
    compile: CliImplicitFlag[bool] = Field(True, description="vLLM engine on CPU: torch.compile the MoTE model "
                                                             "(faster decode steps, ~30 s more start-up the first "
                                                             "time; --no-compile: eager)")
    replicas: int | None = Field(None, ge=1, description="fixed expert replica count (default: autoscaling)")
    expert_cpus: float | None = Field(None, gt=0, description="CPUs per expert replica (default: 1)")
    port: int = 8000
    host: str = "127.0.0.1"
    api_key_env: str | None = Field(None, description="require 'Authorization: Bearer <key>' with the key from "
                                                      "this env var")
    api_keys_file: str | None = Field(None, description="accepted bearer keys, one per line (re-read when it "
                                                        "changes: rotation)")
    insecure: CliImplicitFlag[bool] = Field(False, description="serve without a key on --host beyond loopback "
                                                               "(without a key, default: loopback only)")
    max_prompt_tokens: int = Field(384, ge=1)
    timeout: float = Field(120.0, gt=0, description="per-request and per-stream timeout, seconds")
    max_inflight: int = Field(64, ge=1, description="concurrent requests per router replica (then 429)")
    address: str | None = Field(None, description=ADDRESS_HELP)

    def run(self) -> int:
        from mote_ray.serving.deployments import build

        app = build({"model": self.model, "path": self.path, "engine": self.engine, "compile": self.compile, "replicas": self.replicas,
                     "expert_cpus": self.expert_cpus,
                     "api_key_env": self.api_key_env, "api_keys_file": self.api_keys_file,
                     **bind_policy(self), "max_inflight": self.max_inflight,
                     "max_prompt_tokens": self.max_prompt_tokens, "timeout_s": self.timeout})
        return run_app(app, self, f"serving {self.model}")
