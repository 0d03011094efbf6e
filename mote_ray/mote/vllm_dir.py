"""`OUT/vllm/`: a `mote-ray train` output as a directory vLLM loads with the MoTE model class.

Written at export time (training/run.py) and on first use for outputs trained before it existed.
It holds a config.json (the base config with `architectures: [MoTEForCausalLM]`, the virtual
vocabulary K·V and a `mote` block: experts, rank, α, scaling, targets), links to the base weights
(`OUT/base/*.safetensors`, so a 70B base is not copied) and `mote_experts.safetensors` with the
trained A/B of every expert under `mote_expert.<HF layer name>.lora_{A,B}`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from mote_ray.errors import MoteError

VLLM_DIR, EXPERTS_FILE = "vllm", "mote_experts.safetensors"


def ensure_vllm_dir(model_dir: str | Path) -> Path:
    """The vLLM view of a MoTE output, written if missing or older than the trained state."""
    from mote_ray.mote.export import CONFIG_FILE, STATE_FILE

    root = Path(model_dir).resolve()
    mote, base, out = root / "mote", root / "base", root / VLLM_DIR
    if not (mote / STATE_FILE).is_file() or not (base / "config.json").is_file():
        raise MoteError(f"{root} is not a `mote-ray train --method mote` output (needs mote/{STATE_FILE} and base/)")
    done = out / "config.json"
    if done.is_file() and done.stat().st_mtime >= (mote / STATE_FILE).stat().st_mtime:
        return out
    # Written aside and renamed into place: Ray Data actors or Serve replicas converting an older
    # output at the same time never see (or load) a half-written directory.
    tmp = Path(tempfile.mkdtemp(prefix=".vllm-", dir=root))
    write_vllm_dir(json.loads((mote / CONFIG_FILE).read_text()), mote / STATE_FILE, base, tmp)
    if out.exists():
        stale = Path(tempfile.mkdtemp(prefix=".vllm-old-", dir=root))
        try:
            os.rename(out, stale / "vllm")
        except OSError:
            pass  # another process replaced it first
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, out)
    except OSError:  # another process put a complete one there first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_vllm_dir(meta: dict, state_file: Path, base: Path, out: Path) -> Path:
    from safetensors.torch import load_file, save_file

    from mote_ray.mote.routing import EXPERTS
    from mote_ray.mote.vllm_model import ARCH, EXPERT_PREFIX

    cfg = json.loads((base / "config.json").read_text())
    mote = meta["mote"]
    if mote.get("n_experts", len(EXPERTS)) != len(EXPERTS):
        raise MoteError(f"the vLLM MoTE model needs {len(EXPERTS)} stage experts, this output has {mote.get('n_experts')}")
    state = load_file(state_file)
    experts = {f"{EXPERT_PREFIX}{k.removeprefix('lm.')}": v.contiguous() for k, v in state.items()
               if k.endswith((".lora_A", ".lora_B"))}
    if not experts:
        raise MoteError(f"{state_file} holds no expert tensors")
    V = int(cfg["vocab_size"])
    cfg["mote"] = {"base_vocab_size": V, "n_experts": len(EXPERTS), "r": mote["r"], "lora_alpha": mote["lora_alpha"],
                   "alpha": mote["alpha"], "architecture": cfg["architectures"][0],
                   "targets": sorted({k.rsplit(".", 2)[-2] for k in experts}),
                   "inference_prompt_expert": mote.get("inference_prompt_expert", "answer")}
    cfg.update(architectures=[ARCH], vocab_size=len(EXPERTS) * V)
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():  # weights by link (a 70B base is not copied); no generation config (EOS ids untagged)
        if f.suffix == ".safetensors":
            link = out / f.name
            if link.is_symlink() or link.exists():
                link.unlink()
            os.symlink(os.path.relpath(f, out), link)
    save_file(experts, out / EXPERTS_FILE)
    index = base / "model.safetensors.index.json"
    if index.is_file():  # vLLM loads only the files a sharded checkpoint's index names
        idx = json.loads(index.read_text())
        idx["weight_map"].update({k: EXPERTS_FILE for k in experts})
        (out / index.name).write_text(json.dumps(idx, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))  # last: its presence marks a complete dir
    return out
