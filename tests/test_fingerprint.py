"""Resume fingerprints: equal resumes, different is refused naming the change, restart clears."""

import json

import pytest

from mote_ray import fingerprint
from mote_ray.errors import MoteError


def test_same_fingerprint_resumes_changed_one_is_refused_restart_clears(tmp_path):
    out = tmp_path / "out"
    fp = {"model": {"path": "/m", "weights": {"model.safetensors": 10}}, "sampling": {"temperature": 0.7}}
    fingerprint.check(out, fp, has_output=False, restart=False, what="chains")
    (out / "chains").mkdir()
    (out / "chains" / "part-1.parquet").write_text("x")
    fingerprint.check(out, fp, has_output=True, restart=False, what="chains")  # equal: resume
    changed = {"model": {"path": "/m", "weights": {"model.safetensors": 11}}, "sampling": {"temperature": 0.7}}
    with pytest.raises(MoteError, match=r"model\.weights\.model\.safetensors: 10 -> 11.*--restart"):
        fingerprint.check(out, changed, has_output=True, restart=False, what="chains")
    assert (out / "chains" / "part-1.parquet").exists()
    fingerprint.check(out, changed, has_output=True, restart=True, what="chains", clear=[out / "chains"])
    assert not (out / "chains").exists()
    assert json.loads((out / "fingerprint.json").read_text()) == changed


def test_output_without_a_fingerprint_is_not_resumed_blindly(tmp_path):
    with pytest.raises(MoteError, match="no fingerprint.json"):
        fingerprint.check(tmp_path, {"a": 1}, has_output=True, restart=False, what="chains")


def test_generate_fingerprint_covers_what_determines_output(tiny_model):
    from mote_ray.config import EngineConfig, PoolConfig
    from mote_ray.generation import GenerateConfig, output_fingerprint

    base = GenerateConfig(engine=EngineConfig(model=tiny_model, engine="transformers"))
    fp = output_fingerprint(base)
    assert fp["engine"]["name"] == "transformers" and fp["model"]["weights"]
    # Pool and batch sizes change speed, not output: same fingerprint.
    assert output_fingerprint(base.model_copy(update={"pool": PoolConfig(size=3, batch_size=5)})) == fp
    for change in ({"policy": "drop"}, {"seed": 1}, {"max_tokens": {"analysis": 1, "guidance": 1, "answer": 1, "check": 1}}, {"question_tokens": 64}):
        assert fingerprint.changes(fp, output_fingerprint(base.model_copy(update=change))), change
