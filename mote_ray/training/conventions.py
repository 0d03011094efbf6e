"""The Ray Train conventions of the HF/TRL trainers (aligners: TRL SFT, anchored: TRL DPO), the same
as MoTE training's (training/run.py):

- workers: GPU workers when the cluster has a GPU for each, else CPU workers that never take the
  whole node (`scaling_config`); mixed bf16 on GPU, fp32 on CPU (`precision_args`);
- storage: the Ray Train run lives in `storage_path` (a local path, NFS or a cloud URI; None =
  OUT/ray). Workers never write to the driver's OUT: rank 0 writes its outputs into a temporary
  directory and reports it as the run's Checkpoint (`report_outputs`); the driver copies
  `result.checkpoint` into OUT (`fit_and_collect`). On a multi-node cluster storage_path and a
  `file:` MLflow store must be shared (NFS) or URIs: checked on every node before training
  (`check_shared_storage`);
- tracking: MLflow (a file store at OUT/mlruns by default) and W&B when configured, from rank 0
  (`start_tracker`, `tracking_callback`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from mote_ray.errors import MoteError
from mote_ray.training.tracking import Tracker, TrackingConfig, resolve_mlflow_uri


# Ray Train's controller takes a worker's `ray.train.report` off a one-slot queue only when it polls
# the workers, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s), so a report per step held
# each step after the first for up to 2 s: 22 tiny-model steps took 63 s, 22 s at 0.1 s. The poll is
# one small actor call per worker.
REPORT_POLL_S = "0.1"


@contextmanager
def report_polling():
    """Around `TorchTrainer.fit()`: Ray hands this variable to the controller it starts; a value the
    user set is kept."""
    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    if key in os.environ:
        yield
        return
    os.environ[key] = REPORT_POLL_S
    try:
        yield
    finally:
        os.environ.pop(key, None)


def absolute_storage_path(value: str | None) -> str | None:
    """A config validator: a local storage_path made absolute (Ray Train's pyarrow filesystem rejects
    a relative one with a traceback); a URI (`s3://`, `gs://`, `file://`...) is kept as it is."""
    if value is None or "://" in value:
        return value
    return str(Path(value).expanduser().resolve())


def scaling_config(workers: int, use_gpu: bool | None = None):
    import ray
    from ray.train import ScalingConfig

    from mote_ray.cluster import train_worker_cpus

    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    if use_gpu:
        return ScalingConfig(num_workers=workers, use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 1})
    return ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": train_worker_cpus(workers)})


def precision_args(use_gpu: bool) -> dict:
    """TrainingArguments for the device the driver chose (`fit_and_collect`), not for what the worker
    happens to see (a CPU worker on a GPU node still sees CUDA): TRL's configs default to bf16 even
    on CPU; we keep fp32 there (as MoTE training does) and mixed bf16 on a GPU that supports it."""
    import torch

    gpu = bool(use_gpu)
    return {"use_cpu": not gpu, "bf16": gpu and torch.cuda.is_bf16_supported(), "fp16": False}


def check_shared_storage(paths: dict[str, str]) -> None:
    """On a multi-node cluster, refuse before training when a local path the workers must write
    (Ray Train's storage, a `file:` MLflow store) is not visible on every node: rank 0 may run on
    any of them, and Ray would only fail at the final upload, after all the compute. A marker file
    written here must be readable from a task on each alive node (NFS passes, a node's own disk
    does not)."""
    import uuid

    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    local = {k: v.removeprefix("file://").removeprefix("file:") for k, v in paths.items()
             if v and ("://" not in v or v.startswith("file:"))}
    if len(nodes) < 2 or not local:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    markers = {}
    for what, path in local.items():
        Path(path).mkdir(parents=True, exist_ok=True)
        markers[what] = Path(path) / f".mote-shared-{uuid.uuid4().hex}"
        markers[what].write_text("")

    @ray.remote(num_cpus=0)
    def visible(files: list[str]) -> list[bool]:
        return [os.path.exists(f) for f in files]

    try:
        names = list(markers)
        seen = ray.get([visible.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote([str(markers[k]) for k in names]) for n in nodes])
    finally:
        for m in markers.values():
            m.unlink(missing_ok=True)
    missing = sorted({names[i] for row in seen for i, ok in enumerate(row) if not ok})
    if missing:
        raise MoteError(f"{', '.join(f'{k} {local[k]}' for k in missing)}: a local path on this node only, but the "
                        f"cluster has {len(nodes)} nodes and rank 0 may run on any of them; use shared storage "
                        "(NFS mounted on every node) or a URI (--set storage_path=s3://..., tracking.mlflow=http://...)")


def fit_and_collect(train_fn: Callable[[dict], None], loop_config: dict, *, workers: int, name: str,
                    storage_path: str | None, tracking: TrackingConfig, root: Path, out: Path | None = None,
                    use_gpu: bool | None = None):
    """Run `train_fn` on `workers` Ray Train workers and copy the outputs rank 0 reported into `out`
    (default: `root`). `root` is the job's OUT: the run goes to `storage_path` or root/ray, the
    default MLflow store is root/mlruns. The loop gets `loop_config` plus `tracking` (the MLflow URI
    resolved), `run_name` and `use_gpu` (decided here: GPU workers when the cluster has a GPU for
    each, unless the config says). Returns the Ray Train Result."""
    import ray
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    root = Path(root).resolve()
    out = Path(out).resolve() if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    print(f"mote-ray: {name}: {workers} {'GPU' if use_gpu else 'CPU'} worker(s), "
          f"{'bf16 mixed precision' if use_gpu else 'fp32'}", flush=True)
    mlflow = resolve_mlflow_uri(tracking.mlflow, root)
    check_shared_storage({"storage_path": storage_path or str(root / "ray"), "tracking.mlflow": mlflow or ""})
    cfg = {**loop_config, "run_name": name, "use_gpu": use_gpu, "tracking": {**tracking.model_dump(), "mlflow": mlflow}}
    # The Ray Train run's name carries a hash of OUT: jobs sharing a storage_path with the same `name`
    # would otherwise restore each other's snapshot. MLflow keeps the plain name.
    run_dir = f"{name}-{hashlib.sha1(str(out).encode()).hexdigest()[:8]}"
    trainer = TorchTrainer(train_fn, train_loop_config=cfg, scaling_config=scaling_config(workers, use_gpu),
                           run_config=RunConfig(name=run_dir, storage_path=storage_path or str(root / "ray"),
                                                checkpoint_config=CheckpointConfig(num_to_keep=1)))
    with report_polling():
        result = trainer.fit()
    if result.checkpoint is None:
        raise MoteError(f"{name}: training finished without reporting its outputs ({result.error})")
    with result.checkpoint.as_directory() as d:  # downloads first when the storage is remote
        shutil.copytree(d, out, dirs_exist_ok=True)
    return result


def report_outputs(metrics: dict, write: Callable[[Path], None]) -> None:
    """Every rank calls this once at the end (Ray Train's report is collective): rank 0 runs
    `write(dir)` into a temporary directory, which becomes the run's Checkpoint in storage_path."""
    import tempfile

    import ray.train
    from ray.train import Checkpoint

    nums = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(nums, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        ray.train.report(nums, checkpoint=Checkpoint.from_directory(tmp))


def start_tracker(cfg: dict, params: dict) -> Tracker:
    """The run's tracker: live on rank 0, a no-op elsewhere."""
    import ray.train

    return Tracker(cfg["tracking"], ray.train.get_context().get_world_rank() == 0, cfg["run_name"], params=params)


def tracking_callback(tracker: Tracker):
    """A transformers TrainerCallback that sends every log (loss, lr, grad norm, eval) to `tracker`."""
    from transformers import TrainerCallback

    class _Track(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            tracker.log(logs or {}, state.global_step)

    return _Track()


def mlflow_info(tracker: Tracker, cfg: dict) -> dict:
    return {"tracking_uri": cfg["tracking"].get("mlflow"), "run_id": tracker.run_id}
