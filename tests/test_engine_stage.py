"""The Ray Data engine stage: called directly (unit) and on a 2-CPU local Ray with each engine."""

import pyarrow as pa
import pytest

from mote_ray.config import EngineConfig, PoolConfig
from mote_ray.engine_stage import RESULT_COLUMNS, EngineStage, map_engine
from mote_ray.errors import MoteError
from mote_ray.records import SamplingParams

from .conftest import requires_vllm


def test_stage_called_directly_keeps_columns(tiny_model):
    stage = EngineStage(EngineConfig(model=tiny_model, engine="transformers").model_dump(),
                        sampling={"max_tokens": 5})
    out = stage(pa.Table.from_pylist([
        {"id": "a", "prompt": "Once upon a time", "messages": None, "extra": 1},
        {"id": "b", "prompt": None, "messages": [{"role": "user", "content": "Hi"}], "extra": 2},
    ]))
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == ["a", "b"] and [r["extra"] for r in rows] == [1, 2]
    assert all(set(RESULT_COLUMNS) <= set(r) for r in rows) and rows[0]["completion_tokens"] == 5
    with pytest.raises(MoteError, match="need `id`"):
        stage(pa.Table.from_pylist([{"text": "x"}]))


def _run(ray, model, engine, n=20):
    rows = [{"id": f"r{i}", "prompt": f"Once upon a time {i}"} for i in range(n)]
    ds = map_engine(ray.data.from_items(rows), EngineConfig(model=model, engine=engine), PoolConfig(batch_size=8),
                    sampling=SamplingParams(max_tokens=8))
    return ds.take_all()


@pytest.mark.ray
def test_twenty_rows_on_local_ray_transformers(ray_local, tiny_model):
    out = _run(ray_local, tiny_model, "transformers")
    assert sorted(r["id"] for r in out) == sorted(f"r{i}" for i in range(20))
    assert all(r["engine"] == "transformers" and r["completion_tokens"] == 8 for r in out)


@pytest.mark.ray
@requires_vllm
def test_twenty_rows_on_local_ray_vllm(ray_local, tiny_model_hd32):
    out = _run(ray_local, tiny_model_hd32, "vllm")
    assert sorted(r["id"] for r in out) == sorted(f"r{i}" for i in range(20))
    assert all(r["engine"] == "vllm" and r["text"] for r in out)
