"""The multi-LoRA path (`--path lora`): a trained MoTE model as one folded LoRA adapter per stage.

Each stage is one engine request on `OUT/base` with that stage's adapter (stage expert + shared
expert folded, mote/export.py), re-reading the prompt and the earlier stages with it — where the exact
model (mote/vllm_model.py, mote/reference.py) reads each token with its own expert. It runs on any
engine with LoRA support; how often it agrees with the exact model is measured (benchmarks/serving.py).
The chain rules are mote/chain.py's; mote/engine.py's LoraStageEngine adapts the stage requests.
"""

from __future__ import annotations

from mote_ray.mote.routing import EXPERTS


def load_fast_engine(model_dir, engine: str = "auto", **engine_kwargs):
    """An engine on `model_dir/base` with the per-stage adapters of a `mote-ray train` output loaded."""
    import json
    from pathlib import Path

    from mote_ray.config import EngineConfig
    from mote_ray.engines import create_engine
    from mote_ray.errors import MoteError

    root = Path(model_dir)
    adapters = {s: root / "adapters" / s for s in EXPERTS}
    if missing := [s for s, p in adapters.items() if not (p / "adapter_config.json").is_file()]:
        raise MoteError(f"{root} has no exported adapter for stage(s) {missing}; the fast path needs "
                        f"`mote-ray train --method mote` output (adapters/<stage>/)")
    rank = max(json.loads((p / "adapter_config.json").read_text())["r"] for p in adapters.values())
    cfg = EngineConfig(model=str(root / "base"), engine=engine, enable_lora=True, max_lora_rank=vllm_rank(rank),
                       max_loras=len(EXPERTS), **engine_kwargs)
    eng = create_engine(cfg)
    for stage, path in adapters.items():
        eng.load_adapter(stage, str(path))
    return eng


def vllm_rank(r: int) -> int:
    # vLLM accepts a fixed set of max_lora_rank values; take the smallest that fits.
    return next(v for v in (8, 16, 32, 64, 128, 256, 320, 512) if v >= r)
