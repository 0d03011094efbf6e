"""The Ray Train loop: FSDP2 on every worker (nccl on GPU, gloo on CPU), checkpoints, metrics."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

CKPT_FILE = "trainable.pt"


def shard_model(model, world_size: int, device: str):
    """FSDP2: shard each decoder layer, then the root. Raises if nothing was sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (world_size,))
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise RuntimeError("shard_model: no *DecoderLayer modules found to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train_loop(cfg: dict) -> None:
    """Runs on every Ray Train worker; `cfg` is TrainConfig.model_dump() plus `model_path`."""
    import ray.train
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from tqdm import tqdm

    from mote_ray.mote.model import MoTEConfig, build_mote_model
    from mote_ray.mote.routing import EXPERTS, expert_index, skip_mask, stage_token_ids
    from mote_ray.training.data import batches, collate, example
    from mote_ray.training.losses import stage_nll

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(ctx.get_local_rank())
    dist_on = dist.is_available() and dist.is_initialized()
    mote_cfg = MoTEConfig(**cfg["mote"])
    model, tok = build_mote_model(cfg["model_path"], mote_cfg, device=device, seed=cfg["seed"])
    if dist_on and world > 1:
        shard_model(model, world, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)

    step, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # resume: every rank loads the full trainable state; FSDP re-shards it
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / CKPT_FILE, weights_only=False)
        set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(model, opt, state["optim"], options=StateDictOptions(full_state_dict=True))
        step, history = state["step"], state["history"]

    # Every rank must run the same number of steps (FSDP collectives): agree on the smallest shard.
    token_ids = stage_token_ids(tok)
    rows = [r for b in ray.train.get_dataset_shard("train").iter_batches(batch_format="pyarrow", batch_size=256)
            for r in b.to_pylist()]
    examples = [e for r in rows if (e := example(r, tok, token_ids, cfg["method"], cfg["max_len"])) is not None]
    n_batches = torch.tensor(len(examples) // cfg["batch_size"] or min(len(examples), 1))
    if dist_on:
        dist.all_reduce(n_batches, op=dist.ReduceOp.MIN)
    per_epoch = int(n_batches)
    if per_epoch == 0:
        raise ValueError(f"rank {rank} has no training examples that fit max_len={cfg['max_len']} "
                         f"({len(rows)} rows in its shard)")
    total = cfg["max_steps"] or cfg["epochs"] * per_epoch
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
    bar = tqdm(total=total, initial=step, desc="train", disable=rank != 0)
    model.train()
    while step < total:
        epoch, i = divmod(step, per_epoch)
        batch = collate(batches(examples, cfg["batch_size"], seed=cfg["seed"] + epoch)[i], tok.pad_token_id)
        gen.manual_seed(cfg["seed"] * 100_003 + step * 101 + rank)  # reproducible after a resume
        t0 = time.perf_counter()
        ids, stages = batch["input_ids"].to(device), batch["stages"].to(device)
        experts = expert_index(stages, mote_cfg.prompt_expert, gen).to(device)
        mask = skip_mask(stages, batch["attention_mask"], mote_cfg.p_skip if cfg["method"] != "sft" else 0.0, gen).to(device)
        logits = model(ids, experts, attention_mask=mask).logits
        loss, per_stage = stage_nll(logits, ids, stages)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats = torch.tensor([loss.item(), float(batch["attention_mask"].sum()), time.perf_counter() - t0]
                             + [float(v) for s, c in per_stage.values() for v in (s, c)])
        if dist_on:
            dist.all_reduce(stats)
        step += 1
        metrics = {"step": step, "epoch": epoch, "loss": float(stats[0]) / world,
                   "tokens_per_s": float(stats[1]) / (float(stats[2]) / world)}
        for k, name in enumerate(EXPERTS):
            s, c = float(stats[3 + 2 * k]), float(stats[4 + 2 * k])
            if c:
                metrics[f"loss_{name}"] = s / c
        history.append(metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if step % cfg["checkpoint_every"] == 0 or step == total:
            model_state = get_model_state_dict(model, options=full)
            optim_state = get_optimizer_state_dict(model, opt, options=full)
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": model_state, "optim": optim_state, "step": step, "history": history},
                               Path(d) / CKPT_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
        elif step % cfg["log_every"] == 0:
            ray.train.report(metrics)
        if os.environ.get("MOTE_TRAIN_STEP_SLEEP"):  # lets fault-tolerance tests kill a worker mid-run
            time.sleep(float(os.environ["MOTE_TRAIN_STEP_SLEEP"]))
    bar.close()
