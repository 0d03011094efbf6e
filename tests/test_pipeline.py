"""README command 1's job: generate -> train -> evaluate on the offline default, resumable by stage."""

import json
import re

import pytest

from mote_ray.cli import main

pytestmark = pytest.mark.ray


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
