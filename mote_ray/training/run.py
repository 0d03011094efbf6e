"""`mote-ray train`: chains Parquet -> Ray Train (TorchTrainer, FSDP2) -> PEFT adapters per stage.

OUT/checkpoint/   Ray Train run (resumable: rerun with the same OUT, or let FailureConfig restart);
                  sharded DCP checkpoints, see training/loop.py. With storage_path: there, as
                  checkpoint-<hash of OUT>
OUT/fingerprint.json  what determines the trained weights (train_fingerprint); a rerun under another
                  is refused, naming what changed, unless `restart` (`--restart`) discards the run
OUT/mlruns/       MLflow file store (tracking.mlflow: default), `mlflow ui --backend-store-uri OUT/mlruns`
OUT/base/         base model with the stage tokens (resized embeddings, trained rows) + tokenizer
OUT/tokenizer/    the tokenizer with the stage tokens
OUT/adapters/     {analysis,guidance,answer}/ (mote) or default/ (baselines): PEFT LoRA directories
OUT/mote/         the exact token-routed MoTE state (reference generator, exact serving path)
OUT/train_metrics.json
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mote_ray.errors import MoteError
from mote_ray.mote.model import MoTEConfig
from mote_ray.training.tracking import TrackingConfig

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
    # Precision: auto = bf16 on GPU (FSDP2 MixedPrecisionPolicy, fp32 reductions), fp32 on CPU, where
    # bf16 speed depends on the host's matmul support (bf16_vs_fp32_step_time in
    # benchmarks/results/training.json measures this one); bf16 on CPU allowed.
    # The frozen base is stored in this dtype; experts and stage-token rows stay fp32 master weights.
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: bool = False  # per decoder layer: less activation memory, ~1/3 more compute
    cpu_offload: bool = False  # GPU only: keep the sharded frozen base on the host
    grad_accum: int = Field(1, ge=1)  # micro-batches of batch_size per optimizer step
    max_grad_norm: float | None = Field(1.0, gt=0)  # clip the total norm (reported as grad_norm); None = no clip
    warmup_ratio: float = Field(0.05, ge=0, lt=1)  # share of steps with linear warm-up
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after the warm-up (torchtune/OpenRLHF default)
    val_share: float = Field(0.1, ge=0, lt=0.5)  # prompts held out (all their chains) for validation loss
    eval_every: int = Field(20, ge=1)  # validation loss per stage every K steps and at the end
    tracking: TrackingConfig = TrackingConfig()  # MLflow (default: OUT/mlruns) and W&B when configured
    checkpoint_every: int = Field(10, ge=1)
    # Where Ray Train keeps checkpoints: a local path or a cloud URI (s3://, gs://, ...); None = OUT/.
    storage_path: str | None = None
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    log_every: int = Field(1, ge=1)
    # Chains whose own safety check flagged the answer (or could not be parsed) stay on disk but out
    # of training: the method learns from chains that passed the model's own check. No weighting.
    include_flagged: bool = False
    seed: int = 0


# TrainConfig fields that change how a run goes, not the weights it trains: they may change on a
# resume. Every other field, a new one too, is in the fingerprint. `model` and `use_gpu` enter it
# resolved (the model's content, the device actually used).
RUN_ONLY = frozenset({"model", "use_gpu", "cpus_per_worker", "activation_checkpointing", "cpu_offload", "eval_every",
                      "tracking", "checkpoint_every", "storage_path", "keep_checkpoints", "max_failures", "log_every"})
# What a run writes into OUT, removed by `restart` with the Ray Train run (mlruns/ keeps its history).
_OUTPUTS = ("base", "tokenizer", "adapters", "mote", "vllm", "train_metrics.json")


def run_train(config: TrainConfig, chains: str | Path, out: str | Path, address: str | None = None,
              restart: bool = False) -> dict:
    """Train on the chains in `chains` into `out`, resuming its run if one is there (same fingerprint)."""
    from mote_ray.cluster import init_ray
    from mote_ray.models import resolve_model
    from mote_ray.training.data import flag_warning

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
    guard_resume(config, out, train_fingerprint(config, model_path, files, use_gpu), restart)
    usable, dropped, flagged = count_usable(files, config.include_flagged)
    if warning := flag_warning(flagged):
        print(f"\n{'!' * 100}\nmote-ray train: {warning}\n{'!' * 100}\n", flush=True)
    if usable < config.workers:
        hint = (" Flagged chains (the model's own check found the answer unsafe or could not parse its verdict) "
                "are not trained on by default; --set include_flagged=true trains on them anyway."
                if dropped.get("flagged") else "")
        raise MoteError(f"{usable} usable chains in {chains} for {config.workers} workers "
                        f"(not usable: {dropped}).{hint}")
    result = fit(config, files, out, model_path, use_gpu, resources)
    if result.checkpoint is None:
        raise MoteError(f"training finished without a checkpoint ({result.error})")
    return export_run(config, model_path, result.checkpoint, out, usable)


def train_fingerprint(config: TrainConfig, model_path: str, files: list[Path], use_gpu: bool) -> dict:
    """What determines the trained weights: the base model's and the chains' content, the device,
    and every TrainConfig field but RUN_ONLY."""
    from mote_ray.fingerprint import content_identity, model_identity

    fields = config.model_dump(mode="json", exclude=set(RUN_ONLY))
    if config.schedule == "constant" and config.warmup_ratio == 0:
        # No step's lr depends on the run's length then, so a stopped run may go on for longer.
        del fields["max_steps"], fields["epochs"]
    return {"model": model_identity(model_path), "chains": content_identity(files), "use_gpu": use_gpu,
            "config": fields}


def guard_resume(config: TrainConfig, out: Path, fp: dict, restart: bool) -> None:
    """fingerprint.check on OUT, where the Ray Train run (local or remote) counts as output and
    `restart` removes it."""
    import pyarrow.fs as pafs

    from mote_ray import fingerprint

    storage, name = run_location(config, out)
    fs, root = (pafs.FileSystem.from_uri(storage) if "://" in storage
                else (pafs.LocalFileSystem(), str(Path(storage).resolve())))
    run = f"{root.rstrip('/')}/{name}"
    started = fs.get_file_info(run).type != pafs.FileType.NotFound
    if restart and started:
        fs.delete_dir(run)
    fingerprint.check(out, fp, has_output=started or (out / "train_metrics.json").is_file(), restart=restart,
                      what="the training run", clear=[out / n for n in _OUTPUTS])


def run_location(config: TrainConfig, out: Path, name: str = "checkpoint") -> tuple[str, str]:
    """(storage_path, run name) of the Ray Train run: OUT/<name>, or <name>-<hash of OUT> in a
    storage_path, which runs into other OUTs may share (they would restore each other's checkpoints)."""
    if not config.storage_path:
        return str(out), name
    return config.storage_path, f"{name}-{hashlib.sha1(str(out).encode()).hexdigest()[:8]}"


def count_usable(files: list[Path], include_flagged: bool) -> tuple[int, dict, dict]:
    """Usable chains, the others per reason, and the flagged-chain policy (data.flag_policy): the
    same rule the workers apply to the same rows."""
    import pyarrow.parquet as pq

    from mote_ray.training.data import drop_reason, flag_policy

    rows = []
    for f in files:
        cols = [c for c in ("answer", "kept", "flagged", "error", "verdict", "attempts") if c in pq.read_schema(f).names]
        rows += pq.read_table(f, columns=cols).to_pylist()
    policy = flag_policy(rows, include_flagged)
    dropped: dict[str, int] = {}
    usable = 0
    for row in rows:
        reason = drop_reason(row, include_flagged, policy["train_unparseable"])
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            usable += 1
    return usable, dropped, policy


def fit(config: TrainConfig, files: list[Path], out: Path, model_path: str, use_gpu: bool, resources: dict,
        name: str = "checkpoint"):
    """The Ray Train run (OUT/<name>); every worker reads all chains and takes its own slice (loop.load_rows)."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mote_ray.training.loop import train_loop
    from mote_ray.training.tracking import resolve_mlflow_uri

    import pyarrow.parquet as pq

    cols = ["id", "history", "question", "analysis", "guidance", "answer", "kept", "flagged", "error", "verdict",
            "attempts"]
    names = set(pq.read_schema(files[0]).names)
    # read before workers take CPUs
    ds = ray.data.read_parquet([str(f) for f in files], columns=[c for c in cols if c in names]).materialize()
    tracking = {**config.tracking.model_dump(), "mlflow": resolve_mlflow_uri(config.tracking.mlflow, out)}
    storage, run_name = run_location(config, out, name)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={**config.model_dump(), "tracking": tracking, "model_path": model_path,
                           "run_name": f"{out.name}-{name}", "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker or _cpus_per_worker(
                                         resources, config.workers, use_gpu)}),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints)),
        datasets={"train": ds},
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    from mote_ray.training.conventions import report_polling

    with report_polling():  # a report per step would otherwise wait up to 2 s for Ray's poll
        return trainer.fit()


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


def load_trained(config: TrainConfig, model_path: str, checkpoint_dir: Path):
    """The MoTE model with a sharded DCP checkpoint's trainable state (strict), and its trainer state."""
    import torch.distributed.checkpoint as dcp

    from mote_ray.mote.model import build_mote_model
    from mote_ray.training.loop import STATE_FILE

    model, tok = build_mote_model(model_path, config.mote, seed=config.seed)
    state = model.trainable_state_dict()
    dcp.load({"model": state}, checkpoint_id=str(checkpoint_dir), no_dist=True)
    model.load_trainable_state_dict(state)
    return model, tok, json.loads((checkpoint_dir / STATE_FILE).read_text())


def export_run(config: TrainConfig, model_path: str, checkpoint, out: Path, n_rows: int) -> dict:
    from mote_ray.mote.export import export_adapters, save_base, save_mote

    with checkpoint.as_directory() as d:
        model, tok, state = load_trained(config, model_path, Path(d))
    base = save_base(model, tok, out / "base")
    tok.save_pretrained(out / "tokenizer")
    adapters = export_adapters(model, tok, out / "adapters", base)
    save_mote(model, out / "mote", base)
    if config.method == "mote":  # the directory vLLM serves the exact model from (mote/vllm_dir.py)
        from mote_ray.mote.vllm_dir import ensure_vllm_dir

        ensure_vllm_dir(out)
    history = state["history"]
    first, last = history[0], history[-1]
    val = state["val_history"][-1] if state["val_history"] else {}
    metrics = {"method": config.method, "steps": state["step"], "chains": n_rows, "workers": state["workers"],
               "sharding": state["sharding"], "dtype": state["dtype"], "split": state["split"],
               "not_trained_on": state["dropped"], "flagged": state.get("flagged"), "lr": last["lr"],
               "grad_norm": last["grad_norm"],
               **{k: v for k, v in val.items() if k != "step"}, "val_history": state["val_history"],
               "mlflow": {"tracking_uri": config.tracking.mlflow and _uri(config, out), "run_id": state["run_id"]},
               "config": config.model_dump(mode="json"),
               "first": first, "last": last, "history": history,
               "adapters": {k: str(v) for k, v in adapters.items()}, "base": str(base)}
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"[train] {state['step']} steps on {state['workers']} worker(s), {state['sharding']}; "
          f"val loss {val.get('val_loss', 'n/a')}; not trained on: {state['dropped']}", flush=True)
    return metrics


def _uri(config: TrainConfig, out: Path) -> str | None:
    from mote_ray.training.tracking import resolve_mlflow_uri

    return resolve_mlflow_uri(config.tracking.mlflow, out)
