"""Typed configs, one per component, validated on construction (the bad value is in the error).

YAML files in `jobs/configs/` fill these; `resolve` layers a YAML file, command-line flags and
`a.b=value` overrides into one validated config (the only way the CLI builds one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

M = TypeVar("M", bound=BaseModel)
EngineName = Literal["auto", "vllm", "transformers"]


class EngineConfig(BaseModel):
    """How to build one engine. `model=None` resolves to $MOTE_MODEL, then the offline default."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str | None = None
    engine: EngineName = "auto"
    gguf_file: str | None = None  # a .gguf file name inside `model` (or a path to one)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(512, ge=16)
    seed: int = 0
    # LoRA: vLLM must reserve adapter slots at start-up; transformers ignores these.
    enable_lora: bool = False
    max_lora_rank: int = Field(16, ge=1)
    max_loras: int = Field(4, ge=1)
    # vLLM: share of GPU memory (default 0.9), or of host memory on CPU. None on CPU: KV memory sized to
    # the model (engines/vllm_engine.cpu_kv_cache_bytes) rather than a fifth of the host per engine.
    gpu_memory_utilization: float | None = Field(None, gt=0.0, le=1.0)
    batch_size: int = Field(64, ge=1)  # transformers micro-batch
    threads: int | None = Field(None, ge=1)  # torch CPU threads; None = leave as is


class PoolConfig(BaseModel):
    """Actor pool for a Ray Data engine stage; `None` fields are sized from the cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    size: int | None = Field(None, ge=1)
    num_cpus: float | None = Field(None, gt=0)
    num_gpus: float | None = Field(None, ge=0)
    batch_size: int = Field(64, ge=1)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        from mote_ray.errors import MoteError

        raise MoteError(f"config file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        from mote_ray.errors import MoteError

        raise MoteError(f"config {p} must hold a mapping at top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings (value parsed as YAML, so `3`, `true`, `[1,2]` work)."""
    import yaml

    from mote_ray.errors import MoteError

    out = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MoteError(f"override must look like a.b=value, got {item!r}")
        out = put(out, key, yaml.safe_load(raw))
    return out


def put(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `data` with the dotted `path` set to `value` (the dicts on the way are copied, not mutated)."""
    from mote_ray.errors import MoteError

    out = dict(data)
    node = out
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        below = node.get(part)
        if below is not None and not isinstance(below, dict):  # e.g. `engine: vllm`, then engine.model=...
            raise MoteError(f"{path}: {'.'.join(parts[:i + 1])} holds {type(below).__name__} {below!r}, "
                            "not a mapping of fields")
        node[part] = dict(below or {})
        node = node[part]
    node[parts[-1]] = value
    return out


def layered(file: str | os.PathLike | None, flags: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """One merge for every command. Precedence, lowest first: the config class's defaults, the YAML
    file (`--config`), flags (keyed by dotted path), `--set a.b=value` overrides."""
    data = load_yaml(file) if file else {}
    for path, value in flags.items():
        data = put(data, path, value)
    return apply_overrides(data, overrides)


def resolve(cls: type[M], file: str | os.PathLike | None = None, flags: dict[str, Any] | None = None,
            overrides: list[str] | None = None) -> M:
    """`cls` validated from the layers (see `layered`): the one path from YAML and flags to a config."""
    return cls(**layered(file, flags or {}, overrides or []))
