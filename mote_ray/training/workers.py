"""One rule for sizing Ray Train workers of the smaller trainers (aligners, DPO): GPU workers when
the cluster has a GPU for each, else CPU workers that never take the whole node."""

from __future__ import annotations


def scaling_config(workers: int, use_gpu: bool | None = None):
    import ray
    from ray.train import ScalingConfig

    from mote_ray.cluster import train_worker_cpus

    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    if use_gpu:
        return ScalingConfig(num_workers=workers, use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 1})
    return ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": train_worker_cpus(workers)})


def equal_shard(rows: list, rank: int, world: int) -> list:
    """This rank's rows, every rank the same count (DDP/FSDP collectives need equal step counts):
    the remainder of len(rows) / world is left out (at most world - 1 rows)."""
    n = len(rows) // world if len(rows) >= world else len(rows)
    return rows[rank::world][:n] if len(rows) >= world else rows
