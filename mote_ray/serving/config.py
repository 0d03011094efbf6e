"""What the two Serve apps are built from: `ServeConfig` (the MoTE app, `serving.deployments.build`) and
`ProxyConfig` (the squad proxy, `aligners.proxy.build_proxy`).

One typed config per app, so `serve/config.yaml`'s `args:`, the `mote-ray serve` flags (generated from
these fields) and a caller's dict reach the same validated object: an unknown key or a bad value is
refused at build, naming the field. Light: no Ray or FastAPI import (the command line reads these).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mote_ray.config import EngineName

_API_KEY_ENV = "require 'Authorization: Bearer <key>', the key from this environment variable"
_INSECURE = "serve without a key beyond loopback (without a key and without this, loopback only)"
_LOOPBACK = ("the app listens on loopback only, so no key is needed (`mote-ray serve` sets it from --host; in a "
             "Serve config only with a loopback http_options.host)")
_TIMEOUT = "per-request and per-stream timeout, seconds; the generation is aborted after it"


class ServeConfig(BaseModel):
    """The MoTE Serve app: `serve/config.yaml`'s `args:`, or the `mote-ray serve` flags."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(description="a `mote-ray train` output directory")
    path: Literal["exact", "lora"] = Field(
        "exact", description="exact: the token-routed MoTE model (vLLM where it loads, else the transformers "
                             "reference); lora: per-stage folded LoRA adapters, each stage re-reads the prefix "
                             "(inexact, for comparison)")
    engine: EngineName = Field("auto", description="auto: vLLM where it can load the model, else transformers")
    compile: bool = Field(True, description="vLLM engine on CPU: torch.compile the MoTE model (faster decode "
                                            "steps, ~30 s more start-up the first time; off: eager)")
    replicas: int | None = Field(None, ge=1, description="fixed expert replica count (default: autoscaling)")
    expert_cpus: float | None = Field(None, gt=0, description="CPUs per expert replica (default: 1)")
    api_key_env: str | None = Field(None, description=_API_KEY_ENV)
    api_keys_file: str | None = Field(None, description="accepted bearer keys, one per line (re-read when it "
                                                        "changes: rotation)")
    insecure: bool = Field(False, description=_INSECURE)
    loopback_only: bool = Field(False, description=_LOOPBACK)
    max_prompt_tokens: int = Field(384, ge=1, description="longest prompt accepted, tokens (then 400)")
    timeout_s: float = Field(120.0, gt=0, description=_TIMEOUT)
    max_inflight: int = Field(64, ge=1, description="concurrent requests per router replica (then 429)")
    name: str | None = Field(None, description="the model id clients send (default: the model directory's name)")

    @field_validator("path", mode="before")
    @classmethod
    def _renamed_path(cls, value):
        if value == "fast":
            raise ValueError("the multi-LoRA path is now `lora`; `exact` is the fast one")
        return value


class ProxyConfig(BaseModel):
    """The squad proxy app: the `mote-ray aligners serve` flags."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    squad: str = Field(description="an `aligners train` output directory (squad.json)")
    upstream: str = Field(description="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    upstream_key_env: str | None = Field(None, description="env var with the upstream's bearer key (sent only "
                                                           "upstream; a caller's key is never forwarded)")
    api_key_env: str | None = Field(None, description=_API_KEY_ENV)
    insecure: bool = Field(False, description=_INSECURE)
    loopback_only: bool = Field(False, description=_LOOPBACK)
    engine: EngineName = Field("transformers", description="engine of every aligner (transformers: one vLLM "
                                                           "engine per aligner would each reserve memory)")
    timeout_s: float = Field(120.0, gt=0, description="upstream request timeout, seconds")
