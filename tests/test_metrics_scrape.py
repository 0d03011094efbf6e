"""The Grafana dashboard (deploy/grafana/mote-ray.json) reads metrics we really emit: statically (each
query's metric is declared in mote_ray) and live (benchmarks/metrics_scrape.py: a real generation,
training, serving load and evaluation on local Ray, then Ray's Prometheus endpoint is scraped)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import MODELS, SHARED

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "mote-ray.json"
SECTIONS = {"Generation", "Training", "Serving", "Evaluation"}


def _panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def _declared() -> set[str]:
    """Metric names declared in mote_ray: metrics.Counter/Gauge/Histogram("mote_...") or _metric(KIND, "mote_...")."""
    code = "\n".join(p.read_text() for p in (ROOT / "mote_ray").rglob("*.py"))
    return set(re.findall(r"(?:Counter|Gauge|Histogram)\(\s*\"(mote_[a-z0-9_]+)\"", code)) | \
        set(re.findall(r"_metric\(\"\w+\", \"(mote_[a-z0-9_]+)\"", code))


def test_every_dashboard_query_uses_a_declared_metric_under_its_exported_name():
    declared = _declared()
    assert {"mote_generate_rejects", "mote_train_loss", "mote_eval_prompts_answered", "mote_serve_request_seconds"} \
        <= declared
    for panel in _panels():
        used = {m for t in panel["targets"] for m in re.findall(r"\b(ray_[a-z0-9_]+)", t["expr"])}
        assert used, panel["title"]
        mote = {re.sub(r"_(bucket|sum|count|total)$", "", m[len("ray_"):]) for m in used if m.startswith("ray_mote_")}
        assert mote <= declared, (panel["title"], mote - declared)
        # The description names the declared metrics (Ray prefixes ray_ on export).
        for name in mote:
            assert name in panel["description"], (panel["title"], name)
        assert all(m.startswith(("ray_mote_", "ray_serve_")) for m in used), used


def test_dashboard_covers_the_four_jobs_and_is_importable():
    dash = json.loads(DASHBOARD.read_text())
    rows = {p["title"].split(" ")[0] for p in dash["panels"] if p["type"] == "row"}
    assert rows == SECTIONS
    titles = " | ".join(p["title"] for p in _panels())
    for needle in ("Prompts/s", "Tokens/s per stage", "Stage mix", "Rejected", "Loss per stage", "Step time",
                   "Requests/s by mode and status", "p50 / p95", "Time per stage", "Queue depth", "Progress"):
        assert needle in titles, needle
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["schemaVersion"] >= 30
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "session"}


@pytest.mark.ray
def test_every_dashboard_metric_has_a_nonzero_sample_in_a_live_scrape(tmp_path):
    if not (MODELS / "stories260K").is_dir():
        pytest.skip(f"needs {MODELS} (set MOTE_SHARED)")
    import ray

    ray.shutdown()  # the script starts its own Ray, as from a shell: two instances on 2 CPUs slow both
    out = tmp_path / "metrics.json"
    env = {**os.environ, "MOTE_SHARED": str(SHARED), "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "metrics_scrape.py"), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    missing = [m["metric"] for m in result["metrics"] if not m["nonzero"]]
    assert not missing, (missing, result["http_status_counts"])
    assert {m["metric"] for m in result["metrics"]} == set(re.findall(r"\b(ray_[a-z0-9_]+)", DASHBOARD.read_text()))
    # The serving load had successes and 4xx answers; the evaluation answered through the endpoint.
    assert result["http_status_counts"].get("200", 0) >= 40 and "400" in result["http_status_counts"]
    assert result["eval_answers"] == 8 and result["eval_errors"] == 0
    # `mote-ray top`'s report over the serving interval shows the requests.
    served = next(line for line in result["top_output"] if line.startswith("serve     requests/s"))
    assert float(served.split()[2]) > 0
    assert result["top_discovers_endpoint"]  # `mote-ray top --address` finds this node's endpoint


def test_recording_outside_ray_is_a_noop_and_imports_no_ray():
    code = ("import sys; from mote_ray import metrics as m; assert 'ray' not in sys.modules; "
            "from mote_ray.inputs import Reject; "
            "m.record_rejects([Reject(source='f', row=1, reason='empty prompt', raw='')]); "
            "m.record_train_step({'loss': 1.0, 'loss_answer': 2.0}, 10.0, 0.1); "
            "m.record_eval_planned([{'suite': 's'}]); m.record_eval_answered([{'suite': 's', 'error': None}]); "
            "assert m._made == {}, m._made")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
