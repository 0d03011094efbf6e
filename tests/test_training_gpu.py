"""GPU paths of the trainer (skipped without CUDA): FSDP2 over NCCL, bf16 mixed precision."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model_path: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mote_ray.mote.model import MoTEConfig
    from mote_ray.mote.routing import expert_index
    from mote_ray.training.sharding import build_sharded_mote_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cuda", (world,))
        model, tok = build_sharded_mote_model(model_path, MoTEConfig(r=4), mesh, dtype=torch.bfloat16, device="cuda")
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        trainable = {p.dtype for p in model.parameters() if p.requires_grad}
        ids = torch.tensor([tok("Hello there")["input_ids"] * 4], device="cuda")
        logits = model(ids, expert_index(torch.zeros_like(ids), "answer")).logits
        logits.float().mean().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        if rank == 0:
            torch.save({"frozen": [str(d) for d in frozen], "trainable": [str(d) for d in trainable],
                        "logits_dtype": str(logits.dtype), "grads": all(g is not None for g in grads)}, out)
    finally:
        dist.destroy_process_group()


def test_fsdp2_over_nccl_in_bf16_keeps_fp32_experts(tiny_model, tmp_path):
    world = min(torch.cuda.device_count(), 2)
    out = str(tmp_path / "res.pt")
    mp.spawn(_worker, args=(world, _port(), tiny_model, out), nprocs=world, join=True)
    res = torch.load(out)
    assert res["frozen"] == ["torch.bfloat16"] and res["trainable"] == ["torch.float32"]
    assert res["logits_dtype"] == "torch.bfloat16" and res["grads"]
