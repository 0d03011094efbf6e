"""Every suite on real data files, answered by the tiny real model on both engines through Ray Data,
judged, and reported; `mote-ray eval` as a user runs it; a killed evaluation resumes per model."""

import json
import re

import pytest

from mote_ray.eval.run import EvalConfig, SuiteConfig, run_eval

from .conftest import requires_vllm

pytestmark = pytest.mark.ray


def _suites(d):
    return [
        SuiteConfig(name="harmlessness", data=[str(d / "harmbench_val/harmbench_behaviors_text_val.csv")],
                    format="harmbench", limit=3),
        SuiteConfig(name="jailbreak", data=[str(d / "advbench/harmful_behaviors.csv")], format="advbench", limit=2,
                    templates=[str(d / f"pyrit_jailbreak_templates/templates/{t}.yaml")
                               for t in ("security_researcher", "prefix_injection")], templates_per_prompt=2),
        SuiteConfig(name="overrefusal", data=[str(d / "jbb_benign/benign-behaviors.csv")], format="jailbreakbench",
                    limit=3),
        SuiteConfig(name="helpfulness", data=[str(d / "alpaca_instructions/alpaca.json")], format="alpaca", limit=3),
    ]


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=[pytest.mark.vllm, requires_vllm])])
def test_all_suites_on_real_data(ray_local, datasets_dir, tiny_model, tiny_model_hd32, engine, tmp_path):
    model = tiny_model if engine == "transformers" else tiny_model_hd32
    # The tiny model is also the LLM judge: it cannot follow the rubric, so its replies must be
    # counted as parse failures rather than scored.
    cfg = EvalConfig(models=[f"tiny={model}"], engine=engine, max_tokens=16, suites=_suites(datasets_dir),
                     judge_model=model)
    results = run_eval(cfg, tmp_path)
    s = results["suites"]
    assert s["harmlessness"]["rejects"] >= 1  # HarmBench copyright rows, with reasons
    assert any("copyright" in json.loads(line)["reason"] for line in (tmp_path / "rejects.jsonl").open())
    for name, entry in s.items():
        res = entry["models"]["tiny"]
        assert res["answered"] >= 1 and res["answered"] + res["errors"] == entry["rows"], name
        for metric in res["metrics"].values():
            if metric["value"] is None:  # nothing scored (the tiny judge's replies unparseable): no data
                assert metric["ci"] is None and (metric["n"] == 0 or metric["unscored"] == metric["n"])
            else:
                assert 0 <= metric["ci"][0] <= metric["value"] <= metric["ci"][1] <= 1 or name == "helpfulness"
        rows = [json.loads(line) for line in (tmp_path / "responses" / name / "tiny.jsonl").open()]
        assert all(r["engine"] == engine and (r["response"] is not None) != bool(r["error"]) for r in rows)
        assert all("tokens" in r["error"] for r in rows if r["error"])  # too long for the context: kept, with why
    assert s["jailbreak"]["rows"] == 4 == s["jailbreak"]["models"]["tiny"]["answered"]  # 2 prompts x 2 templates
    jb = [json.loads(line) for line in (tmp_path / "responses/jailbreak/tiny.jsonl").open()]
    assert all(r["objective"] in r["prompt"] and "{{" not in r["prompt"][-40:] for r in jb)
    helpful = s["helpfulness"]["models"]["tiny"]
    assert helpful["judge_parse_failures"]["helpfulness"] + helpful["metrics"]["judge_score"]["n"] == 3
    page = (tmp_path / "report.html").read_text()
    assert all((tmp_path / src).is_file() for src in re.findall(r"<img src='([^']+)'", page))


def test_eval_cli_resumes_per_model(ray_local, datasets_dir, tiny_model, tmp_path):
    from mote_ray.cli import main

    args = ["eval", "--model", f"a={tiny_model}", "--model", f"b={tiny_model}", "--engine", "transformers",
            "--suite", "overrefusal", "--data", str(datasets_dir / "jbb_benign/benign-behaviors.csv"),
            "--format", "jailbreakbench", "--limit", "2", "--max-tokens", "8", "--out", str(tmp_path)]
    assert main(args) == 0
    first = (tmp_path / "responses/overrefusal/a.jsonl").read_text()
    (tmp_path / "responses/overrefusal/b.jsonl").unlink()  # as if killed after model a
    assert main(args) == 0
    assert (tmp_path / "responses/overrefusal/a.jsonl").read_text() == first  # not answered again
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["suites"]["overrefusal"]["models"]) == {"a", "b"}
    assert main(["eval", "--model", tiny_model, "--suite", "overrefusal", "--data", str(tmp_path / "none.csv"),
                 "--out", str(tmp_path / "x")]) == 2  # a clear error, not a traceback
