import pytest
from pydantic import ValidationError

from mote_ray.config import EngineConfig, PoolConfig, apply_overrides
from mote_ray.errors import MoteError
from mote_ray.records import GenerationRequest, SamplingParams


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
                                         ("max_tokens", 0), ("top_k", -2)])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValidationError) as e:
        SamplingParams(**{field: value})
    assert field in str(e.value)


def test_sampling_unknown_field_is_rejected():
    with pytest.raises(ValidationError, match="temprature"):
        SamplingParams(temprature=1.0)


def test_request_needs_exactly_one_input():
    with pytest.raises(ValidationError, match="exactly one"):
        GenerationRequest(prompt="a", messages=[{"role": "user", "content": "b"}])
    with pytest.raises(ValidationError, match="exactly one"):
        GenerationRequest()
    with pytest.raises(ValidationError, match="empty"):
        GenerationRequest(messages=[])
    assert GenerationRequest(prompt="x").sampling.greedy


def test_engine_config_validates_with_value():
    with pytest.raises(ValidationError, match="engine"):
        EngineConfig(engine="tensorrt")
    with pytest.raises(ValidationError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)
    assert PoolConfig().size is None


def test_overrides_parse_yaml_values():
    out = apply_overrides({"engine": {"model": "a"}}, ["engine.max_model_len=256", "pool.size=2", "x.flag=true"])
    assert out == {"engine": {"model": "a", "max_model_len": 256}, "pool": {"size": 2}, "x": {"flag": True}}
    with pytest.raises(MoteError, match="a.b=value"):
        apply_overrides({}, ["novalue"])
