"""README command 1's job: generate -> train -> evaluate on the offline default, resumable by stage."""

import json
import re

import pytest

from mote_ray.cli import main


@pytest.mark.ray
def test_pipeline_on_the_offline_default_then_resumes(ray_local, tmp_path, capsys):
    ray_local.shutdown()  # the pipeline's jobs start their own local Ray, as from a shell
    args = ["pipeline", "--out", str(tmp_path), "--set", "train.max_steps=4", "--set", "eval_max_tokens=16",
            "--set", "generate.max_tokens={analysis: 16, guidance: 16, answer: 16, check: 4}"]
    assert main(args) == 0
    for stage in ("generate", "train", "train-sft", "eval"):
        assert (tmp_path / f"{stage}.done").is_file()
    assert (tmp_path / "train" / "adapters" / "answer" / "adapter_config.json").is_file()
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["suites"]) == {"harmlessness", "overrefusal"}
    for entry in results["suites"].values():
        assert set(entry["models"]) == {"base", "sft", "mote-adaptive", "mote-direct"}
        assert entry["models"]["mote-direct"]["stages_used"] == {"answer": entry["items"]}
    page = (tmp_path / "report.html").read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert len(images) == 3 and all((tmp_path / i).stat().st_size > 1000 for i in images)
    for entry in results["suites"].values():
        for res in entry["models"].values():
            for m in res["metrics"].values():
                assert m["value"] is not None and f"{m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]" in page
    assert "report.html" in capsys.readouterr().err
    assert main(args) == 0  # every stage done: skipped, same report
    assert "done earlier" in capsys.readouterr().err
    # A changed config is refused rather than resumed with the old stages' outputs.
    assert main([*args, "--set", "train.max_steps=5"]) == 2
    err = capsys.readouterr().err
    assert "config.train.max_steps: 4 -> 5" in err and "--restart" in err


def test_changed_config_is_refused_and_restart_starts_over(tiny_model, tmp_path, monkeypatch, capsys):
    """The stages are stand-ins (no engine, no Ray); the pipeline's fingerprint, .done files and
    --restart around them are the real ones."""
    from mote_ray import generation
    from mote_ray.eval import run as eval_run
    from mote_ray.training import run as train_run

    calls = []

    def fake_generate(config, prompts, out, **kw):
        calls.append("generate")
        return {"total": 1}

    def fake_train(config, chains, out, restart=False):
        calls.append(f"train {config.method} {config.max_steps}{' over old output' if out.exists() else ''}")
        out.mkdir()
        return {"steps": config.max_steps}

    def fake_eval(config, out, summary=""):
        calls.append("eval")
        (out / "results.json").write_text(json.dumps({"suites": {}}))
        return {"suites": {}}

    monkeypatch.setattr(generation, "run_generate", fake_generate)
    monkeypatch.setattr(train_run, "run_train", fake_train)
    monkeypatch.setattr(eval_run, "run_eval", fake_eval)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["pipeline", "--model", tiny_model, "--engine", "transformers", "--out", str(out),
            "--set", "train.max_steps=4"]
    run = ["generate", "train mote 4", "train sft 4", "eval"]
    assert main(args) == 0 and calls == run
    assert main(args) == 0 and calls == run  # every stage done: skipped
    assert main([*args, "--set", "train.max_steps=5"]) == 2
    err = capsys.readouterr().err
    assert "config.train.max_steps: 4 -> 5" in err and "--restart" in err and calls == run
    assert main([*args, "--set", "train.max_steps=5", "--restart"]) == 0
    assert calls == [*run, "generate", "train mote 5", "train sft 5", "eval"]  # every stage again, on a clean OUT
    assert json.loads((out / "fingerprint.json").read_text())["config"]["train"]["max_steps"] == 5
    assert (out / "notes.txt").read_text() == "mine"  # only the pipeline's own outputs are cleared
