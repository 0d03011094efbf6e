"""The engine layer: one small Protocol, real backends chosen by a string through a lazy registry.

`create_engine(EngineConfig(engine="auto"))` picks vLLM when it is importable and supports the
model on this device, else transformers, and records why in `engine.choice_reason`.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

from mote_ray.errors import EngineUnavailableError, UnsupportedModelError

if TYPE_CHECKING:
    from mote_ray.config import EngineConfig
    from mote_ray.models import ResolvedModel
    from mote_ray.records import GenerationRequest, GenerationResult

# name -> "module:Class"; modules import only when that engine is built.
_REGISTRY = {
    "vllm": "mote_ray.engines.vllm_engine:VLLMEngine",
    "transformers": "mote_ray.engines.hf_engine:TransformersEngine",
}
VLLM_CPU_MIN_HEAD_DIM = 32  # vLLM's CPU attention rejects smaller heads


class Engine(Protocol):
    name: str
    model: ResolvedModel
    tokenizer: object
    choice_reason: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    def load_adapter(self, name: str, path: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineChoice:
    name: str
    reason: str
    device: str


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(config: EngineConfig) -> str:
    if config.device != "auto":
        if config.device == "cuda" and not cuda_available():
            raise EngineUnavailableError("device 'cuda' was asked for but torch sees no CUDA device")
        return config.device
    return "cuda" if cuda_available() else "cpu"


def vllm_support(resolved: ResolvedModel, device: str) -> tuple[bool, str]:
    """Whether vLLM can run this model here, and if not, why (one line)."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed (pip install 'mote-ray[cpu]' or 'mote-ray[gpu]')"
    cfg = resolved.hf_config()
    archs = cfg.get("architectures") or []
    if archs and not resolved.gguf_file:
        from vllm.model_executor.models import ModelRegistry

        if not set(archs) & set(ModelRegistry.get_supported_archs()):
            return False, f"vLLM does not support architecture {archs[0]}"
    if device == "cpu":
        head_dim = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // max(cfg.get("num_attention_heads", 1), 1))
        if head_dim and head_dim < VLLM_CPU_MIN_HEAD_DIM:
            return False, (f"vLLM's CPU attention needs head_dim >= {VLLM_CPU_MIN_HEAD_DIM}; "
                           f"this model has head_dim={head_dim}")
    return True, "vllm is importable and supports this model"


def choose_engine(config: EngineConfig, resolved: ResolvedModel) -> EngineChoice:
    device = resolve_device(config)
    if config.engine == "transformers":
        return EngineChoice("transformers", "asked for", device)
    ok, why = vllm_support(resolved, device)
    if config.engine == "vllm":
        if not ok:
            raise UnsupportedModelError(f"engine 'vllm' cannot run {resolved.name}: {why}. "
                                        f"Use --engine transformers" + (
                                            " or a copy with wider heads" if "head_dim" in why else ""))
        return EngineChoice("vllm", "asked for", device)
    if ok:
        return EngineChoice("vllm", f"auto: {why}", device)
    return EngineChoice("transformers", f"auto: {why}; using transformers", device)


def create_engine(config: EngineConfig) -> Engine:
    from mote_ray.models import resolve_model

    resolved = resolve_model(config.model, config.gguf_file)
    choice = choose_engine(config, resolved)
    module, cls = _REGISTRY[choice.name].split(":")
    engine = getattr(importlib.import_module(module), cls)(config, resolved, device=choice.device)
    engine.choice_reason = choice.reason
    return engine
