import pytest

from mote_ray.cluster import plan_pool
from mote_ray.config import PoolConfig
from mote_ray.errors import MoteError


def test_two_cpu_cluster_keeps_a_cpu_for_reading():
    plan = plan_pool(PoolConfig(), {"CPU": 2.0}, use_gpu=False)
    assert (plan.size, plan.num_cpus, plan.threads) == (1, 1.0, 2)


def test_two_actors_on_two_cpus_get_fractions():
    plan = plan_pool(PoolConfig(size=2), {"CPU": 2.0}, use_gpu=False)
    assert plan.size == 2 and plan.num_cpus == pytest.approx(0.5) and plan.threads == 1


def test_oversized_pool_is_refused_before_it_hangs():
    with pytest.raises(MoteError, match="would hang"):
        plan_pool(PoolConfig(size=2, num_cpus=1), {"CPU": 2.0}, use_gpu=False)


def test_big_cpu_cluster_and_gpu_cluster():
    assert plan_pool(PoolConfig(), {"CPU": 16.0}, use_gpu=False).size == 15
    plan = plan_pool(PoolConfig(), {"CPU": 32.0, "GPU": 4.0}, use_gpu=True)
    assert (plan.size, plan.num_gpus) == (4, 1.0) and plan.num_cpus <= 1.0
    with pytest.raises(MoteError, match="GPU"):
        plan_pool(PoolConfig(), {"CPU": 4.0}, use_gpu=True)
