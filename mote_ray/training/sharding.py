"""FSDP2 from the first byte: build on the meta device, shard, then load each rank's rows only.

Choice (issue 15): each rank reads its own dim-0 slice of every frozen tensor straight from the
base's safetensors files (plain reads at computed offsets, no mmap), so no rank ever holds the full base, not
even rank 0 (rank-0 load + broadcast would need the whole model in one process). FSDP2 shards
each parameter on dim 0 in `world` chunks of ceil(n / world) rows, which is what `_rows` computes
(and checks against the local shard's shape). Trainable tensors (experts, stage-token rows) are
small: every rank computes their full seeded initial value (`MoTEModel.trainable_init`, the same
as the plain build) and keeps its slice, so a sharded build equals a plain `build_mote_model`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mote_ray.mote.model import MoTEConfig, MoTEModel, NewRowsHead, add_stage_tokens

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def decoder_layers(model) -> list:
    """The transformer blocks: transformers' `_no_split_modules` classes (else *DecoderLayer)."""
    lm = model.lm if isinstance(model, MoTEModel) else model
    names = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names] or \
        [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise RuntimeError("shard_model: no decoder layer modules found to shard")
    return layers


def shard_model(model, mesh, dtype: torch.dtype = torch.float32, cpu_offload: bool = False):
    """FSDP2: `fully_shard` each decoder layer, then the root.

    bf16: parameters are cast to bf16 for compute, gradients reduced in fp32 (the fp32 master
    experts stay fp32 in the optimizer). cpu_offload keeps sharded parameters on the host (GPU only).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dtype if dtype != torch.float32 else None, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    return model


def _rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """FSDP2's dim-0 shard of an n-row tensor on `rank`: [start, stop)."""
    chunk = math.ceil(n / world) if n else 0
    start = min(rank * chunk, n)
    return start, min(start + chunk, n)


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


class _RowReader:
    """Reads row ranges of tensors from one safetensors file with plain reads (no mmap), so a rank's
    memory holds only the rows it asked for, not the page-cache of the whole file."""

    def __init__(self, path: Path):
        import struct

        self.f = open(path, "rb")
        (n,) = struct.unpack("<Q", self.f.read(8))
        self.header = {k: v for k, v in json.loads(self.f.read(n)).items() if k != "__metadata__"}
        self.base = 8 + n

    def rows(self, key: str) -> int:
        return self.header[key]["shape"][0] if self.header[key]["shape"] else 1

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        meta = self.header[key]
        dtype, shape = _ST_DTYPES[meta["dtype"]], meta["shape"] or [1]
        row = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        buf = bytearray((stop - start) * row)
        self.f.seek(self.base + meta["data_offsets"][0] + start * row)
        self.f.readinto(buf)
        return torch.frombuffer(buf, dtype=dtype).reshape(stop - start, *shape[1:]) if buf else \
            torch.empty(0, *shape[1:], dtype=dtype)

    def close(self) -> None:
        self.f.close()


def _tensor_files(path: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} for a model directory (single file or sharded index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"sharded load needs safetensors weights in {path} (model.safetensors[.index.json])")
    reader = _RowReader(single)
    reader.close()
    return {k: single for k in reader.header}


def build_sharded_mote_model(model_path: str, config: MoTEConfig, mesh, *, dtype: torch.dtype = torch.float32,
                             device: str = "cpu", seed: int = 0, activation_checkpointing: bool = False,
                             cpu_offload: bool = False):
    """Meta-device MoTE model, FSDP2-sharded over `mesh`, each rank loading only its shard."""
    import torch.distributed as dist
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from mote_ray.chat import load_tokenizer
    from mote_ray.models import resolve_model

    resolved = resolve_model(model_path)
    tok = load_tokenizer(resolved)
    tok.padding_side = "right"
    lm_config = AutoConfig.from_pretrained(resolved.path)
    # Parameters on meta; buffers (rotary frequencies) real, since nothing in the checkpoint restores them.
    with init_empty_weights(include_buffers=False):
        lm = AutoModelForCausalLM.from_config(lm_config, dtype=dtype, attn_implementation="sdpa")
    # Outside the context: its patched register_parameter re-creates every assigned parameter,
    # which would untie shared ones. New tensors here are created on their base's (meta) device.
    first_new = add_stage_tokens(lm, tok)
    if getattr(lm.config, "tie_word_embeddings", False):  # transformers skips tying meta tensors
        lm.get_output_embeddings().weight = lm.get_input_embeddings().weight
    model = MoTEModel(lm, config, first_new)
    if any(p.device.type != "meta" for p in model.parameters()):
        raise RuntimeError("meta-device build materialised a parameter")
    if activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    shard_model(model, mesh, dtype, cpu_offload)
    model.to_empty(device=device)
    with torch.no_grad():
        for k, v in model.named_buffers():
            if k in buffers:
                v.copy_(buffers[k])

    rank, world = mesh.get_local_rank(), mesh.size()
    files = _tensor_files(Path(resolved.path))
    handles: dict[Path, object] = {}
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    sums: dict[str, torch.Tensor] = {}
    emb_w = model.lm.get_input_embeddings().emb.weight
    head = model.lm.get_output_embeddings()
    head_w = head.head.weight if isinstance(head, NewRowsHead) and not tied else None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                continue
            local = p.to_local() if hasattr(p, "to_local") else p
            start, stop = _rows(p.shape[0], rank, world)
            if local.shape[0] != stop - start:
                raise RuntimeError(f"{name}: local shard has {local.shape[0]} rows, expected {stop - start}")
            key = model.base_param_name(name)
            if key not in files:
                raise KeyError(f"base checkpoint {resolved.path} lacks {key} (for {name})")
            f = files[key]
            if f not in handles:
                handles[f] = _RowReader(f)
            reader = handles[f]
            n_file = reader.rows(key)
            local.zero_()  # rows past the file's (the added stage tokens) are never read
            if start < min(stop, n_file):
                local[:min(stop, n_file) - start].copy_(reader.read(key, start, min(stop, n_file)).reshape(
                    local[:min(stop, n_file) - start].shape))
            if p is emb_w or p is head_w:  # stage-token rows start at the mean of the existing rows
                keep = local[:max(0, min(stop, first_new) - start)].float()
                sums["emb" if p is emb_w else "head"] = torch.cat([keep.sum(0), torch.tensor([float(len(keep))])])
        for k in sorted(sums):
            if dist.is_initialized():
                dist.all_reduce(sums[k])
        for reader in handles.values():
            reader.close()
        means = {k: v[:-1] / v[-1] for k, v in sums.items()}
        params = dict(model.named_parameters())
        for name, value in model.iter_trainable_init(seed, means):  # one full tensor at a time
            p = params[name]
            local = p.to_local() if hasattr(p, "to_local") else p
            start, stop = _rows(p.shape[0], rank, world)
            local.copy_(value[start:stop].to(local.dtype))
    return model, tok
