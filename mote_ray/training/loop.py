"""The Ray Train loop: FSDP2 from the first byte on every worker (nccl on GPU, gloo on CPU),
the recipe (schedule, clipping, accumulation, validation), sharded checkpoints, tracking.

Checkpoints (`checkpoint_*/` under the run): torch.distributed.checkpoint (DCP) of the trainable
model and optimizer state, each rank writing its own shard (`__<rank>_0.distcp`), no gather on
rank 0; `trainer_state.json` (step, history, scheduler, data position, tracking run id) from rank
0 and `rng_<rank>.json` per rank. Ray Train merges the ranks' directories into one checkpoint in
`storage_path` (local, NFS or cloud). Loading is DCP's (tensors only, `weights_only` for any
serialized item), strict: a missing key is an error.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
HOST_MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept fixed


def return_large_frees_to_os() -> bool:
    """Serve host allocations of 128 KiB and more from their own mmap, so freeing one unmaps it.

    Why: FSDP2 all-gathers each decoder layer's full parameters into fresh buffers and frees them
    after the layer (reshard). glibc's default mmap threshold is dynamic: it rises to the size of
    the first such buffer freed (up to 32 MiB), and from then on these buffers come from the heap,
    where freed space stays resident. Measured on CPU (358M-parameter model, one rank): RSS grew
    ~50 MB per decoder layer through one forward, the size of the whole unsharded model, whatever
    the number of ranks, so sharding saved nothing at the peak. A fixed threshold (mallopt turns the
    dynamic one off) keeps a rank at its shard plus the layers in flight (RSS peak above the pre-model
    baseline: 1 rank 3.1 -> 2.4 GB, and only then does a second rank halve the frozen base). True when
    set (glibc only).
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD) != 1:
        raise OSError("mallopt(M_MMAP_THRESHOLD) failed")
    return True


def resolve_dtype(name: str, device: str) -> torch.dtype:
    from mote_ray.training.sharding import DTYPES

    return DTYPES["bf16" if device == "cuda" else "fp32"] if name == "auto" else DTYPES[name]


def save_checkpoint(d: Path, model, opt, rank: int, state: dict | None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(ignore_frozen_params=True)
    dcp.save({"model": get_model_state_dict(model, options=opts), "optim": get_optimizer_state_dict(model, opt, options=opts)},
             checkpoint_id=str(d))
    rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
    (d / f"rng_{rank}.json").write_text(json.dumps({"torch": rng}))
    if state is not None:
        (d / STATE_FILE).write_text(json.dumps(state))


def load_checkpoint(d: Path, model, opt, rank: int) -> dict:
    import numpy as np
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    opts = StateDictOptions(ignore_frozen_params=True)
    state = {"model": get_model_state_dict(model, options=opts), "optim": get_optimizer_state_dict(model, opt, options=opts)}
    dcp.load(state, checkpoint_id=str(d))  # strict: raises if the checkpoint lacks a trainable key
    # The frozen base is not in the checkpoint (it is reloaded from the base weights), so the setter
    # must not require it; every trainable tensor was required by dcp.load above.
    set_model_state_dict(model, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
    set_optimizer_state_dict(model, opt, state["optim"], options=opts)
    rng = d / f"rng_{rank}.json"
    if rng.is_file():
        raw = base64.b64decode(json.loads(rng.read_text())["torch"])
        torch.set_rng_state(torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()))
    return json.loads((d / STATE_FILE).read_text())


def load_rows(cfg: dict) -> list[dict]:
    """Every worker reads all chains (not a Ray Data split, whose block assignment varies run to
    run) ordered by id, then takes its own slice: a seeded run trains on the same rows in the same
    order every time, and ranks get equal shares."""
    import ray.train

    rows = [r for b in ray.train.get_dataset_shard("train").iter_batches(batch_format="pyarrow", batch_size=1024)
            for r in b.to_pylist()]
    return sorted(rows, key=lambda r: str(r["id"]))


def train_loop(cfg: dict) -> None:
    """Runs on every Ray Train worker; `cfg` is TrainConfig.model_dump() plus `model_path`, `run_name`."""
    import ray.train
    import torch.distributed as dist
    from tqdm import tqdm

    from mote_ray.metrics import record_train_step
    from mote_ray.mote.model import MoTEConfig, build_mote_model
    from mote_ray.mote.routing import EXPERTS, stage_token_ids
    from mote_ray.training.data import batches, drop_reason, example, flag_policy, flag_warning, split_by_prompt
    from mote_ray.training.recipe import accumulate, clip, make_scheduler, val_metrics, validate
    from mote_ray.training.sharding import build_sharded_mote_model
    from mote_ray.training.tracking import Tracker

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # The driver decided (use_gpu): a CPU worker placed on a GPU node still sees CUDA.
    device = "cuda" if cfg["use_gpu"] else "cpu"
    if device == "cuda":
        torch.cuda.set_device(ctx.get_local_rank())
    host_mmap = return_large_frees_to_os()  # before any model buffer exists
    import transformers  # noqa: F401  (imported before the baseline: library code is not the model)
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    import mote_ray.training.sharding  # noqa: F401

    baseline_rss = rss_mb()  # before the model exists: the benchmark's zero
    dist_on = dist.is_available() and dist.is_initialized()
    mote_cfg = MoTEConfig(**cfg["mote"])
    dtype = resolve_dtype(cfg["dtype"], device)
    if dist_on:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device, (world,))
        model, tok = build_sharded_mote_model(cfg["model_path"], mote_cfg, mesh, dtype=dtype, device=device,
                                              seed=cfg["seed"], activation_checkpointing=cfg["activation_checkpointing"],
                                              cpu_offload=cfg["cpu_offload"] and device == "cuda")
    else:  # not launched by Ray Train's torch backend: one unsharded process
        model, tok = build_mote_model(cfg["model_path"], mote_cfg, dtype=dtype, device=device, seed=cfg["seed"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])

    # Data: the same filtered, prompt-split, id-ordered rows on every rank; rank r takes r::world.
    token_ids = stage_token_ids(tok)
    dropped = {"error": 0, "no_answer": 0, "not_kept": 0, "flagged": 0}
    usable = []
    rows = load_rows(cfg)
    flagged = flag_policy(rows, cfg["include_flagged"])
    if rank == 0 and flag_warning(flagged):
        print(f"[train] {flag_warning(flagged)}", flush=True)
    for r in rows:
        reason = drop_reason(r, cfg["include_flagged"], flagged["train_unparseable"])
        if reason:
            dropped[reason] += 1
        else:
            usable.append(r)
    train_rows, val_rows = split_by_prompt(usable, cfg["val_share"], cfg["seed"])

    def encode(rows):
        out = [example(r, tok, token_ids, cfg["method"], cfg["max_len"]) for r in rows]
        return [e for e in out if e is not None], sum(e is None for e in out)

    examples, long_train = encode(train_rows[rank::world])
    val_examples, long_val = encode(val_rows[rank::world])
    micro_per_step = cfg["grad_accum"]
    counts = torch.tensor([len(examples) // cfg["batch_size"] or min(len(examples), 1),
                           -(-len(val_examples) // cfg["batch_size"]), long_train + long_val], dtype=torch.long)
    if dist_on:  # every rank runs the same number of steps and forwards (FSDP collectives)
        lo = counts[:1].clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        hi = counts[1:2].clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        n_long = counts[2:].clone()
        dist.all_reduce(n_long)
        counts = torch.cat([lo, hi, n_long])
    dropped[f"over_max_len_{cfg['max_len']}"] = int(counts[2])
    per_epoch = int(counts[0]) // micro_per_step or int(counts[0] > 0)
    n_val_batches = int(counts[1])
    if per_epoch == 0:
        raise ValueError(f"rank {rank} has no training examples (max_len={cfg['max_len']}, dropped: {dropped}; "
                         f"{len(train_rows)} training chains for {world} workers)")
    total = cfg["max_steps"] or cfg["epochs"] * per_epoch
    sched = make_scheduler(opt, cfg["schedule"], total, cfg["warmup_ratio"])
    if rank == 0:
        print(f"[train] {len(usable)} usable chains ({len(train_rows)} train / {len(val_rows)} val, split by prompt); "
              f"not trained on: {dropped}", flush=True)

    step, history, val_history, run_id = 0, [], [], None
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # resume: model, optimizer, scheduler, RNG, data position (= step), history, tracking run
        with ckpt.as_directory() as d:
            state = load_checkpoint(Path(d), model, opt, rank)
        sched.load_state_dict(state["scheduler"])
        step, history, val_history, run_id = state["step"], state["history"], state["val_history"], state["run_id"]
    tracker = Tracker(cfg["tracking"], rank == 0, cfg["run_name"], run_id,
                      params={k: cfg[k] for k in ("method", "lr", "batch_size", "grad_accum", "workers", "dtype",
                                                  "schedule", "warmup_ratio", "max_grad_norm", "max_len")})
    sync = (lambda last: model.set_requires_gradient_sync(last)) if hasattr(model, "set_requires_gradient_sync") else None
    filler = examples[:cfg["batch_size"]]
    epoch_batches: dict[int, list] = {}
    gen = torch.Generator()
    bar = tqdm(total=total, initial=step, desc="train", disable=rank != 0)
    model.train()
    while step < total:
        epoch, i = divmod(step, per_epoch)
        if epoch not in epoch_batches:  # built once per epoch, the same after a resume
            epoch_batches = {epoch: batches(examples, cfg["batch_size"], seed=cfg["seed"] + epoch)}
        eb = epoch_batches[epoch]
        micro = [eb[(i * micro_per_step + k) % len(eb)] for k in range(micro_per_step)]
        gen.manual_seed(cfg["seed"] * 100_003 + step * 101 + rank)  # reproducible after a resume
        lr = sched.get_last_lr()[0]
        t0 = time.perf_counter()
        acc = accumulate(model, micro, tok.pad_token_id, mote_cfg, mote_cfg.p_skip if cfg["method"] != "sft" else 0.0,
                         gen, device, sync)
        grad_norm = clip(params, cfg["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        stats = torch.tensor([acc["loss_sum"], acc["count"], acc["tokens"], time.perf_counter() - t0]
                             + [float(v) for s in EXPERTS for v in acc[s]], dtype=torch.float64)
        rss = torch.tensor([peak_rss_mb() - baseline_rss])  # this rank's peak above its pre-model baseline
        if dist_on:
            dist.all_reduce(stats)
            dist.all_reduce(rss, op=dist.ReduceOp.MAX)
        step += 1
        metrics = {"step": step, "epoch": epoch, "loss": float(stats[0]) / max(float(stats[1]), 1.0), "lr": lr,
                   "grad_norm": grad_norm, "tokens_per_s": float(stats[2]) / (float(stats[3]) / world),
                   "peak_rss_above_baseline_mb": float(rss)}  # the largest over ranks
        if device == "cuda":
            metrics["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        for k, name in enumerate(EXPERTS):
            s, c = float(stats[4 + 2 * k]), float(stats[5 + 2 * k])
            if c:
                metrics[f"loss_{name}"] = s / c
        if n_val_batches and (step % cfg["eval_every"] == 0 or step == total):
            vstats = validate(model, val_examples, n_val_batches, cfg["batch_size"], tok.pad_token_id, mote_cfg,
                              device, filler)
            if dist_on:
                dist.all_reduce(vstats)
            metrics.update(val_metrics(vstats))
            val_history.append({"step": step, **val_metrics(vstats)})
        history.append(metrics)
        if rank == 0:  # Ray metrics: tokens and step time as in tokens_per_s above (summed over ranks)
            record_train_step(metrics, float(stats[2]), float(stats[3]) / world)
        tracker.log(metrics, step)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if step % cfg["checkpoint_every"] == 0 or step == total:
            state = {"step": step, "history": history, "val_history": val_history, "scheduler": sched.state_dict(),
                     "run_id": tracker.run_id, "dropped": dropped, "workers": world, "dtype": str(dtype),
                     "flagged": {k: flagged[k] for k in ("unsafe", "unparseable", "policy")},
                     "host_mmap_threshold": HOST_MMAP_THRESHOLD if host_mmap else None,
                     "sharding": "FSDP2 fully_shard per decoder layer + root; meta-device init, per-rank sharded load"
                                 if dist_on else "none",
                     "split": {"train": len(train_rows), "val": len(val_rows)}}
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(Path(d), model, opt, rank, state if rank == 0 else None)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        elif step % cfg["log_every"] == 0:
            ray.train.report(metrics)
        if os.environ.get("MOTE_TRAIN_STEP_SLEEP"):  # lets fault-tolerance tests kill a worker mid-run
            time.sleep(float(os.environ["MOTE_TRAIN_STEP_SLEEP"]))
    bar.close()
    tracker.finish()
