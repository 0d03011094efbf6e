"""Connecting to Ray, and sizing actor pools so a small cluster never deadlocks.

A Ray Data actor pool that takes every CPU leaves none for the read/write tasks that feed it,
and the job hangs (seen on a 2-CPU machine). `plan_pool` always leaves headroom.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mote_ray.config import PoolConfig
from mote_ray.errors import MoteError

READ_HEADROOM_CPUS = 1.0  # kept free for Ray Data's read/write tasks on CPU-only clusters


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> dict:
    """Join `address` (or $RAY_ADDRESS), else start a private local instance; returns cluster resources."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # "local" never joins a stale cluster left in /tmp/ray by a killed head.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                     configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = True
    return ray.cluster_resources()


@dataclass(frozen=True)
class PoolPlan:
    size: int
    num_cpus: float
    num_gpus: float
    threads: int  # torch threads per actor (Ray would set OMP_NUM_THREADS=1 for a fractional actor)


def train_worker_cpus(workers: int) -> float:
    """CPUs per Ray Train worker for the small CPU jobs (aligners, DPO): at most 1, never the whole node."""
    import ray

    cpus = ray.available_resources().get("CPU", 1)
    return max(0.5, min(1.0, cpus / workers))


def plan_pool(pool: PoolConfig, resources: dict, *, use_gpu: bool) -> PoolPlan:
    """Actor count and per-actor resources from the cluster, honouring what the config fixes."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if use_gpu:
        if gpus < 1 and not pool.num_gpus:
            raise MoteError(f"a GPU engine was asked for but the Ray cluster has GPU={gpus}")
        num_gpus = pool.num_gpus or 1.0
        size = pool.size or max(1, int(gpus // num_gpus))
        num_cpus = pool.num_cpus or min(1.0, max(cpus - READ_HEADROOM_CPUS, 0.25) / size)
        return PoolPlan(size, num_cpus, num_gpus, threads=max(1, int(num_cpus)))
    usable = cpus - READ_HEADROOM_CPUS if cpus > READ_HEADROOM_CPUS else cpus / 2
    size = pool.size or max(1, int(usable))
    num_cpus = pool.num_cpus or usable / size
    if size * num_cpus > usable + 1e-9:
        raise MoteError(f"{size} actors x {num_cpus} CPUs exceed the {usable:g} CPUs this cluster can give "
                        f"engines (CPU={cpus:g}, {READ_HEADROOM_CPUS:g} kept for reading); the job would hang. "
                        f"Lower the pool size or num_cpus")
    threads = max(1, round(cpus / size)) if cpus else 1
    return PoolPlan(size, num_cpus, 0.0, threads=threads)
