"""FSDP2 from the first byte: meta-device build + per-rank sharded load vs a plain load (2 gloo ranks)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model_path: str, out: str, dtype: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mote_ray.mote.model import MoTEConfig
    from mote_ray.training.sharding import DTYPES, build_sharded_mote_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model, tok = build_sharded_mote_model(model_path, MoTEConfig(r=4), mesh, dtype=DTYPES[dtype], seed=3)
        # Before any forward: FSDP2 keeps the root's parameters unsharded from forward to backward.
        local = {n: (p.to_local() if hasattr(p, "to_local") else p).numel() for n, p in model.named_parameters()}
        ids = torch.tensor([tok("Hello there, how are you?")["input_ids"] + [tok.convert_tokens_to_ids("<|analysis|>")]])
        experts = torch.zeros_like(ids)
        with torch.no_grad():
            logits = model(ids, experts).logits
        if rank == 0:
            torch.save({"logits": logits.float(), "local": local}, out)
    finally:
        dist.destroy_process_group()


def _run_sharded(model_path, tmp_path, dtype="fp32"):
    out = str(tmp_path / f"sharded-{dtype}.pt")
    mp.spawn(_worker, args=(2, _free_port(), model_path, out, dtype), nprocs=2, join=True)
    return torch.load(out)


def _tied_qwen2(tokenizer_path, out):
    """A tiny Qwen2-architecture model with tied embeddings (the stories model's are untied)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("arch", ["llama-untied", "qwen2-tied"])
def test_meta_init_sharded_load_gives_the_plain_logits(arch, tiny_model, tmp_path):
    from mote_ray.mote.model import MoTEConfig, build_mote_model

    path = tiny_model if arch == "llama-untied" else _tied_qwen2(tiny_model, tmp_path / "qwen2")
    res = _run_sharded(path, tmp_path)
    plain, tok = build_mote_model(path, MoTEConfig(r=4), seed=3)
    ids = torch.tensor([tok("Hello there, how are you?")["input_ids"] + [tok.convert_tokens_to_ids("<|analysis|>")]])
    with torch.no_grad():
        ref = plain(ids, torch.zeros_like(ids)).logits
    torch.testing.assert_close(res["logits"], ref, rtol=1e-4, atol=1e-4)  # partial-sum order
    # Each rank holds about half of every sharded tensor, not the whole model.
    full = {n: p.numel() for n, p in plain.named_parameters()}
    assert sum(res["local"].values()) <= 0.55 * sum(full.values())
