"""Resume fingerprints: equal resumes, different is refused naming the change, restart clears."""

import json
import time

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
    assert json.loads((out / "fingerprint.json").read_text()) == {"format": fingerprint.FORMAT, **changed}


def test_a_fingerprint_of_another_format_is_named_as_such_not_diffed(tmp_path):
    """An output fingerprinted by an older mote-ray (other fields, another seed scheme) is refused as
    such, not with a field-by-field diff blaming settings the user never changed."""
    (tmp_path / "fingerprint.json").write_text(json.dumps({"model": {"path": "/m", "weights": {}}}))
    with pytest.raises(MoteError, match=r"another mote-ray version \(format 1, this one writes 2\).*--restart"):
        fingerprint.check(tmp_path, {"model": {"files": {}}}, has_output=True, restart=False, what="chains")


def test_output_without_a_fingerprint_is_not_resumed_blindly(tmp_path):
    with pytest.raises(MoteError, match="no fingerprint.json"):
        fingerprint.check(tmp_path, {"a": 1}, has_output=True, restart=False, what="chains")


def test_generate_fingerprint_covers_what_determines_output(tiny_model):
    from mote_ray.config import EngineConfig, PoolConfig
    from mote_ray.generation import GenerateConfig, output_fingerprint

    base = GenerateConfig(engine=EngineConfig(model=tiny_model, engine="transformers"))
    fp = output_fingerprint(base)
    assert fp["engine"]["name"] == "transformers" and fp["model"]["files"]["model.safetensors"]
    # Pool and batch sizes change speed, not output: same fingerprint.
    assert output_fingerprint(base.model_copy(update={"pool": PoolConfig(size=3, batch_size=5)})) == fp
    for change in ({"policy": "drop"}, {"seed": 1}, {"max_tokens": {"analysis": 1, "guidance": 1, "answer": 1, "check": 1}}, {"question_tokens": 64}):
        assert fingerprint.changes(fp, output_fingerprint(base.model_copy(update=change))), change


# ---------------------------------------------------------------- model identity (by content)

def _copy(model, dest):
    import shutil

    shutil.copytree(model, dest)
    for f in dest.iterdir():
        f.chmod(0o644)  # ../shared is read-only
    return dest


def _refused_naming(out, old, new, name):
    fingerprint.check(out, {"model": old}, has_output=False, restart=False, what="chains")
    with pytest.raises(MoteError, match=rf"model\.files\.{name}.*--restart"):
        fingerprint.check(out, {"model": new}, has_output=True, restart=False, what="chains")


@pytest.mark.parametrize("sampled", [False, True])
def test_retrained_weights_of_the_same_shape_are_refused(tiny_model, tmp_path, monkeypatch, sampled):
    """Same file names and sizes, other values: a different model. `sampled`: the path a file over
    WHOLE_BYTES takes (header + evenly spaced chunks), forced here on the small real model."""
    import torch
    from safetensors.torch import load_file, save_file

    if sampled:
        monkeypatch.setattr(fingerprint, "WHOLE_BYTES", 1024)
        monkeypatch.setattr(fingerprint, "CHUNK", 256)
    m = _copy(tiny_model, tmp_path / "m")
    old = fingerprint.model_identity(str(m))
    weights = m / "model.safetensors"
    size = weights.stat().st_size
    state = load_file(weights)
    torch.manual_seed(0)
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size
    _refused_naming(tmp_path / "out", old, fingerprint.model_identity(str(m)), r"model\.safetensors")


def test_changed_tokenizer_or_chat_template_is_refused(tiny_model, tmp_path):
    m = _copy(tiny_model, tmp_path / "m")
    old = fingerprint.model_identity(str(m))
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    (m / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{{ messages[0]['content'] }}"}))
    _refused_naming(tmp_path / "a", old, fingerprint.model_identity(str(m)), r"tokenizer_config\.json")
    m2 = _copy(tiny_model, tmp_path / "m2")
    (m2 / "chat_template.jinja").write_text("{{ messages[-1]['content'] }}")
    _refused_naming(tmp_path / "b", old, fingerprint.model_identity(str(m2)), r"chat_template\.jinja: \"\(unset\)\"")


def test_identical_copy_is_accepted(tiny_model, tmp_path):
    out = tmp_path / "out"
    fingerprint.check(out, {"model": fingerprint.model_identity(tiny_model)}, has_output=False, restart=False,
                      what="chains")
    copy = _copy(tiny_model, tmp_path / "elsewhere")
    (copy / "README.md").write_text("notes")  # docs are not the model
    fingerprint.check(out, {"model": fingerprint.model_identity(str(copy))}, has_output=True, restart=False,
                      what="chains")


def test_a_large_file_is_sampled_not_read_whole(tmp_path):
    big = tmp_path / "model.safetensors"
    with open(big, "wb") as f:  # sparse: 64 GiB on paper, nothing on disk
        f.write((8).to_bytes(8, "little") + b"{}      ")
        f.truncate(64 << 30)
    t0 = time.perf_counter()
    digest = fingerprint.file_digest(big)
    assert time.perf_counter() - t0 < 10 and digest.startswith(f"{64 << 30}:")


def test_train_output_dir_is_identified_by_what_answers(tiny_model, tmp_path):
    run = tmp_path / "run"
    _copy(tiny_model, run / "base")
    for part, name in (("mote", "mote_state.safetensors"), ("adapters/answer", "adapter_model.safetensors"),
                       ("vllm", "config.json"), ("checkpoint/checkpoint_0", "__0_0.distcp"), ("mlruns", "meta.yaml")):
        (run / part).mkdir(parents=True, exist_ok=True)
        (run / part / name).write_text("a")
    ident = fingerprint.model_identity(str(run))["files"]
    assert {"base/model.safetensors", "mote/mote_state.safetensors",
            "adapters/answer/adapter_model.safetensors"} <= set(ident)
    assert not [f for f in ident if f.startswith(("vllm/", "checkpoint/", "mlruns/"))]
    (run / "checkpoint" / "checkpoint_1").mkdir()  # the run goes on: the model it answers with has not changed
    (run / "vllm" / "config.json").write_text("derived, rewritten on first use")
    assert fingerprint.model_identity(str(run))["files"] == ident
    (run / "mote" / "mote_state.safetensors").write_text("b")
    assert fingerprint.changes({"m": ident}, {"m": fingerprint.model_identity(str(run))["files"]}) == [
        f"m.mote/mote_state.safetensors: {json.dumps(ident['mote/mote_state.safetensors'])} -> "
        f"{json.dumps(fingerprint.file_digest(run / 'mote' / 'mote_state.safetensors'))}"]


def test_gguf_file_is_identified_with_its_metadata(tmp_path, monkeypatch):
    """A chat template inside the GGUF metadata: hashed with the header even where the sampled
    chunks (two of 16 bytes here) would miss it."""
    import gguf
    import numpy as np

    def write(path, template):
        w = gguf.GGUFWriter(path, "llama")
        w.add_chat_template(template)
        w.add_tensor("w", np.arange(4096, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    monkeypatch.setattr(fingerprint, "WHOLE_BYTES", 1024)
    monkeypatch.setattr(fingerprint, "CHUNK", 16)
    monkeypatch.setattr(fingerprint, "SAMPLES", 2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = write(tmp_path / "a/m.gguf", "{{ A }}"), write(tmp_path / "b/m.gguf", "{{ B }}")
    (tmp_path / "a/other.gguf").write_text("not this one")
    assert a.stat().st_size == b.stat().st_size
    ident = fingerprint.model_identity(str(a))
    assert list(ident["files"]) == ["m.gguf"] and ident == fingerprint.model_identity(str(tmp_path / "a"), "m.gguf")
    assert ident != fingerprint.model_identity(str(b))


# ---------------------------------------------------------------- the other resumable jobs

@pytest.mark.parametrize("argv", [
    ["generate", "--prompts", "p.csv", "--out", "o"], ["train", "--chains", "c", "--out", "o"],
    ["aligners", "data", "--prompts", "p.csv", "--out", "o"], ["pipeline", "--out", "o"],
    ["eval", "--model", "m", "--suite", "harmlessness", "--data", "d.csv", "--out", "o"]])
def test_every_resumable_command_takes_restart(argv):
    from mote_ray.cli import parse

    assert parse([*argv, "--restart"]).restart is True and parse(argv).restart is False


def test_train_fingerprint_covers_the_weights_not_the_run(tiny_model, tmp_path):
    from mote_ray.mote.model import MoTEConfig
    from mote_ray.training.run import TrainConfig, train_fingerprint

    from .fakes import write_format_chains

    files = sorted((write_format_chains(tmp_path / "c", 6) / "chains").glob("*.parquet"))
    cfg = TrainConfig(model=tiny_model)

    def fp(c=cfg, use_gpu=False, chains=files):
        return train_fingerprint(c, tiny_model, chains, use_gpu)

    base = fp()
    for run_only in ({"storage_path": "s3://b/r"}, {"tracking": {"mlflow": None}}, {"checkpoint_every": 3},
                     {"eval_every": 2}, {"max_failures": 0}, {"cpus_per_worker": 1.0}, {"log_every": 5}):
        assert fp(cfg.model_copy(update=run_only)) == base, run_only
    for change in ({"lr": 1e-3}, {"workers": 2}, {"seed": 1}, {"mote": MoTEConfig(r=8)}, {"include_flagged": True},
                   {"max_steps": 5}, {"batch_size": 4}, {"method": "sft"}):
        assert fingerprint.changes(base, fp(cfg.model_copy(update=change))), change
    assert fingerprint.changes(base, fp(use_gpu=True)) == ["use_gpu: false -> true"]
    # Under a constant lr with no warm-up no step depends on the length: a stopped run may go on.
    constant = cfg.model_copy(update={"schedule": "constant", "warmup_ratio": 0.0})
    assert fp(constant.model_copy(update={"max_steps": 9})) == fp(constant)
    other = sorted((write_format_chains(tmp_path / "d", 6, question="Other {i}?") / "chains").glob("*.parquet"))
    assert [c.split(":")[0] for c in fingerprint.changes(base, fp(chains=other))] == ["chains"]


def test_aligner_data_refuses_a_changed_config_and_restart_starts_over(tiny_model, tmp_path, monkeypatch, capsys):
    import pyarrow as pa

    from mote_ray.aligners import data
    from mote_ray.cli import main
    from mote_ray.generation import write_atomic

    generated = []

    def fake_generate(config, todo, out):  # the engine's part; the job around it is real
        generated.append(len(todo))
        rows = [{**r, "draft": "d", "critique": "c", "corrected": "d", "fault": False, "kept": True} for r in todo]
        write_atomic(pa.Table.from_pylist([{k: r.get(k) for k in data.SCHEMA.names} for r in rows],
                                          schema=data.SCHEMA), out / "data")

    monkeypatch.setattr(data, "_generate", fake_generate)
    q = tmp_path / "q.jsonl"
    q.write_text('{"prompt": "How do I boil an egg?"}\n{"prompt": "Why is the sky blue?"}\n')
    out = tmp_path / "out"
    args = ["aligners", "data", "--prompts", str(q), "--model", tiny_model, "--engine", "transformers",
            "--criteria", "ethical,helpful", "--out", str(out)]
    assert main(args) == 0 and generated == [4]
    assert main(args) == 0 and generated == [4]  # resumed: nothing left to do
    assert main([*args, "--temperature", "0.9"]) == 2
    assert "temperature: 0.7 -> 0.9" in capsys.readouterr().err and generated == [4]
    assert main([*args, "--set", "max_tokens.draft=8"]) == 2
    assert "max_tokens.draft: 96 -> 8" in capsys.readouterr().err
    assert main([*args, "--temperature", "0.9", "--restart"]) == 0 and generated == [4, 4]
    assert json.loads((out / "fingerprint.json").read_text())["temperature"] == 0.9
    (out / "fingerprint.json").unlink()  # as written by an older mote-ray
    assert main(args) == 2 and "no fingerprint.json" in capsys.readouterr().err
