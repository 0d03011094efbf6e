"""`mote-ray train`: chains Parquet -> Ray Train (TorchTrainer, FSDP2) -> PEFT adapters per stage.

OUT/checkpoint/   Ray Train run (resumable: rerun with the same OUT, or let FailureConfig restart)
OUT/base/         base model with the stage tokens (resized embeddings, trained rows) + tokenizer
OUT/tokenizer/    the tokenizer with the stage tokens
OUT/adapters/     {analysis,guidance,answer}/ (mote) or default/ (baselines): PEFT LoRA directories
OUT/mote/         the exact token-routed MoTE state (reference generator, exact serving path)
OUT/train_metrics.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mote_ray.errors import MoteError
from mote_ray.mote.model import MoTEConfig

Method = Literal["mote", "sft", "lora-chain"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    method: Method = "mote"
    mote: MoTEConfig = MoTEConfig()
    workers: int = Field(1, ge=1)
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    cpus_per_worker: float | None = Field(None, gt=0)  # None: sized so Ray Data keeps a CPU (see cluster.py)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)
    epochs: int = Field(3, ge=1)  # paper: 3
    max_steps: int | None = Field(None, ge=1)
    max_len: int = Field(512, ge=16)
    checkpoint_every: int = Field(10, ge=1)
    # Where Ray Train keeps checkpoints: a local path or a cloud URI (s3://, gs://, ...); None = OUT/.
    storage_path: str | None = None
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    log_every: int = Field(1, ge=1)
    include_flagged: bool = True  # train on chains flagged unsafe-after-all if the policy kept them
    seed: int = 0


def run_train(config: TrainConfig, chains: str | Path, out: str | Path, address: str | None = None) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mote_ray.cluster import init_ray
    from mote_ray.models import resolve_model
    from mote_ray.training.loop import train_loop

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    files = sorted((Path(chains) / "chains").glob("part-*.parquet")) or sorted(Path(chains).glob("*.parquet"))
    if not files:
        raise MoteError(f"no chain files in {chains} (expected {chains}/chains/part-*.parquet from `mote-ray generate`)")
    model_path = resolve_model(config.model).path
    if config.method != "mote":  # baselines: one plain LoRA (the shared expert alone)
        config = config.model_copy(update={"mote": config.mote.model_copy(update={"n_experts": 0})})
    resources = init_ray(address)
    use_gpu = config.use_gpu if config.use_gpu is not None else resources.get("GPU", 0) >= config.workers
    cols = ["history", "question", "analysis", "guidance", "answer", "kept", "flagged", "error"]
    ds = ray.data.read_parquet([str(f) for f in files], columns=cols)
    ds = ds.filter(lambda r: r["error"] is None and r["answer"] is not None and r["kept"]
                   and (config.include_flagged or not r["flagged"]))
    ds = ds.materialize()  # read before the workers take their CPUs
    n_rows = ds.count()
    if n_rows < config.workers:
        raise MoteError(f"{n_rows} usable chains in {chains} for {config.workers} workers")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={**config.model_dump(), "model_path": model_path},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker or _cpus_per_worker(
                                         resources, config.workers, use_gpu)}),
        run_config=RunConfig(name="checkpoint", storage_path=config.storage_path or str(out),
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints)),
        datasets={"train": ds},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise MoteError(f"training finished without a checkpoint ({result.error})")
    return export_run(config, model_path, result.checkpoint, out, n_rows)


def _cpus_per_worker(resources: dict, workers: int, use_gpu: bool) -> float:
    """A GPU worker needs one CPU; CPU workers split the cluster's CPUs minus the one kept for Ray Data."""
    from mote_ray.cluster import READ_HEADROOM_CPUS

    cpus = float(resources.get("CPU", 1))
    usable = cpus - READ_HEADROOM_CPUS if cpus > READ_HEADROOM_CPUS else cpus / 2
    if use_gpu:
        return min(1.0, usable / workers)
    if usable / workers < 0.1:
        raise MoteError(f"{workers} training workers do not fit a cluster with CPU={cpus:g}")
    return min(usable / workers, 8.0)


def export_run(config: TrainConfig, model_path: str, checkpoint, out: Path, n_rows: int) -> dict:
    import torch

    from mote_ray.mote.export import export_adapters, save_base, save_mote
    from mote_ray.mote.model import build_mote_model
    from mote_ray.training.loop import CKPT_FILE

    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CKPT_FILE, weights_only=False)
    model, tok = build_mote_model(model_path, config.mote, seed=config.seed)
    model.load_trainable_state_dict(state["model"])
    base = save_base(model, tok, out / "base")
    tok.save_pretrained(out / "tokenizer")
    adapters = export_adapters(model, tok, out / "adapters", base)
    save_mote(model, out / "mote", base)
    history = state["history"]
    first, last = history[0], history[-1]
    metrics = {"method": config.method, "steps": state["step"], "chains": n_rows, "workers": config.workers,
               "first": first, "last": last, "history": history,
               "adapters": {k: str(v) for k, v in adapters.items()}, "base": str(base)}
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
