"""Export a trained MoTE model as plain PEFT adapters, and save/load the exact MoTE state.

Per stage e, the stage expert and the shared expert fold into one LoRA of rank 2r:
    A' = [A_e; A_sh],  B' = s·[α·B_e, (1−α)·B_sh],  lora_alpha' = r'  (so PEFT's scaling is 1)
which PEFT and vLLM load without our code, on `OUT/base/` (the base with the stage-token rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mote_ray.mote.layer import MoTELinear
from mote_ray.mote.model import MoTEConfig, MoTEModel, build_mote_model
from mote_ray.mote.routing import EXPERTS

STATE_FILE, CONFIG_FILE = "mote_state.safetensors", "mote_config.json"


def save_base(model: MoTEModel, tokenizer, out: Path) -> Path:
    """The base LM with resized embeddings and the trained stage-token rows merged in."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_config(model.lm.config)
    state = {}
    for name, tensor in model.lm.state_dict().items():
        clean = name.replace(".base.", ".").replace("embed_tokens.emb.", "embed_tokens.").replace("lm_head.head.", "lm_head.")
        if "lora_" not in clean and "new_rows" not in clean:
            state[clean] = tensor
    emb, head = model.lm.get_input_embeddings(), model.lm.lm_head
    state[_key(state, "embed_tokens.weight")] = _merge_rows(emb.emb.weight, emb.new_rows, model.first_new)
    if "lm_head.weight" in state:
        state["lm_head.weight"] = _merge_rows(head.head.weight, head.new_rows, model.first_new)
    lm.load_state_dict(state, strict=True)  # every tensor accounted for (a tied head appears under both names)
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _key(state, suffix):
    return next(k for k in state if k.endswith(suffix))


def _merge_rows(weight, new_rows, first_new):
    w = weight.detach().clone()
    w[first_new:] = new_rows.detach()
    return w


def export_adapters(model: MoTEModel, tokenizer, out: Path, base_dir: Path) -> dict[str, Path]:
    """One PEFT adapter directory per stage (or one `default` for a plain-LoRA baseline)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    c = model.config
    layers = {name: m for name, m in _named_mote_layers(model)}
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    names = list(EXPERTS) if c.n_experts else ["default"]
    rank = 2 * c.r if c.n_experts else c.r
    written = {}
    for e, stage in enumerate(names):
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0))
        for pname, module in peft_model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
                continue
            src = next(m for n, m in layers.items() if pname.endswith(n))
            a, b = _folded(src, e)
            module.lora_A["default"].weight.data.copy_(a)
            module.lora_B["default"].weight.data.copy_(b)
        path = out / stage
        peft_model.save_pretrained(path)
        cfg_path = path / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(base_dir.resolve())
        cfg_path.write_text(json.dumps(cfg, indent=2))
        written[stage] = path
    return written


def _folded(layer: MoTELinear, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of the rank-2r LoRA equal to expert e + shared on this layer."""
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    if layer.n_experts == 0:
        return A[-1], B[:, -1] * s
    a = torch.cat([A[e], A[-1]], dim=0)
    b = torch.cat([B[:, e] * layer.alpha, B[:, -1] * (1 - layer.alpha)], dim=1) * s
    return a, b


def _named_mote_layers(model: MoTEModel):
    for name, module in model.named_modules():
        if isinstance(module, MoTELinear):
            yield name.removeprefix("lm."), module


def save_mote(model: MoTEModel, out: Path, base_dir: Path) -> None:
    """The exact token-routed model: trainable tensors + config, loaded by `load_mote`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.trainable_state_dict().items()}, out / STATE_FILE)
    (out / CONFIG_FILE).write_text(json.dumps({"mote": model.config.model_dump(), "base": str(base_dir.resolve()),
                                               "first_new": model.first_new}, indent=2))


def load_mote(path: str | Path, device: str = "cpu") -> tuple[MoTEModel, object]:
    """A MoTE model saved by `save_mote` (a training output dir, or its `mote/` subdir)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and (path / "mote" / CONFIG_FILE).is_file():
        path = path / "mote"
    meta = json.loads((path / CONFIG_FILE).read_text())
    model, tok = build_mote_model(meta["base"], MoTEConfig(**meta["mote"]), device=device)
    model.load_trainable_state_dict(load_file(path / STATE_FILE))
    return model.eval(), tok
