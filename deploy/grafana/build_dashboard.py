"""Writes deploy/grafana/mote-ray.json: python deploy/grafana/build_dashboard.py

Panels are (title, [(PromQL, legend)]) on the exported metric names (ray_ + what mote_ray declares);
each panel's description names the declared metrics its queries read (tests/test_metrics_scrape.py
checks both against the code, benchmarks/metrics_scrape.py against a live scrape).
"""
import json
import re
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}
panels, y = [], 0
pid = 0

def row(title):
    global y, pid
    pid += 1
    panels.append({"id": pid, "type": "row", "title": title, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    y += 1

def panel(title, targets, unit="short", x=0, w=8, h=8, kind="timeseries", desc=""):
    global pid
    pid += 1
    exprs = [t[0] for t in targets]
    declared = sorted({re.sub(r"_(bucket|sum|count|total)$", "", m)
                       for e in exprs for m in re.findall(r"\bray_(mote_[a-z0-9_]+)", e)})
    builtin = sorted({m for e in exprs for m in re.findall(r"\b(ray_serve_[a-z0-9_]+)", e)})
    src = []
    if declared:
        src.append("Declared in the code as " + ", ".join(declared) + " (Ray exports them with the ray_ prefix).")
    if builtin:
        src.append("Ray Serve built-in: " + ", ".join(builtin) + ".")
    p = {"id": pid, "type": kind, "title": title, "description": (desc + " " + " ".join(src)).strip(),
         "datasource": DS, "gridPos": {"h": h, "w": w, "x": x, "y": y},
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
         "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": lf, "range": True}
                     for i, (e, lf) in enumerate(targets)]}
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"}
    if kind == "bargauge":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "orientation": "horizontal",
                        "displayMode": "gradient"}
        if unit == "percentunit":
            p["fieldConfig"]["defaults"].update(min=0, max=1)
    panels.append(p)

def nextrow(h=8):
    global y
    y += h

S = '{SessionName=~"$session"}'
HIST = "Quantiles from the buckets (Ray exports histogram sums from bucket midpoints, so means would be off)."
row("Generation (mote-ray generate)")
panel("Prompts/s", [(f"sum(rate(ray_mote_generate_prompts_done_total{S}[$__rate_interval]))", "prompts/s")],
      "short", 0, 6, desc="Prompts with a finished AlignCoT chain per second.")
panel("Tokens/s per stage", [(f"sum by (stage) (rate(ray_mote_generate_tokens_total{S}[$__rate_interval]))", "{{stage}}")],
      "short", 6, 6)
panel("Stage mix (chains by stages used)", [(f"sum by (stages, flagged) (increase(ray_mote_generate_chains_total{S}[$__range]))",
       "{{stages}} flagged={{flagged}}")], "short", 12, 6, kind="bargauge",
      desc="How many chains needed only an answer, analysis+answer, or all stages, over the time range.")
panel("Rejected input rows", [(f"sum by (reason) (ray_mote_generate_rejects_total{S})", "{{reason}}")],
      "short", 18, 6, kind="stat", desc="Input rows written to rejects.jsonl, by reason.")
nextrow()
row("Training (mote-ray train)")
panel("Tokens/s", [(f"sum(rate(ray_mote_train_tokens_total{S}[$__rate_interval]))", "tokens/s")], "short", 0, 8,
      desc="Tokens trained per second over all Ray Train workers.")
panel("Loss per stage", [(f"max by (stage) (ray_mote_train_loss{S})", "{{stage}}")], "short", 8, 8,
      desc="Latest step's loss: overall (all) and per AlignCoT stage expert.")
panel("Step time p50 / p95", [(f"histogram_quantile(0.5, sum by (le) (rate(ray_mote_train_step_seconds_bucket{S}[$__rate_interval])))", "p50"),
                    (f"histogram_quantile(0.95, sum by (le) (rate(ray_mote_train_step_seconds_bucket{S}[$__rate_interval])))", "p95")],
      "s", 16, 8, desc=HIST)
nextrow()
row("Serving (OpenAI-compatible endpoint)")
panel("Requests/s by mode and status", [(f"sum by (mode, status) (rate(ray_mote_serve_requests_total{S}[$__rate_interval]))", "{{mode}} {{status}}")],
      "reqps", 0, 8)
panel("Latency p50 / p95 by mode", [
    (f"histogram_quantile(0.5, sum by (le, mode) (rate(ray_mote_serve_request_seconds_bucket{S}[$__rate_interval])))", "p50 {{mode}}"),
    (f"histogram_quantile(0.95, sum by (le, mode) (rate(ray_mote_serve_request_seconds_bucket{S}[$__rate_interval])))", "p95 {{mode}}")],
      "s", 8, 8, desc="Non-streaming chat completions, from request arrival at the router to the answer. " + HIST)
panel("Queue depth", [
    (f"sum by (deployment) (ray_serve_deployment_queued_queries{S})", "queued {{deployment}}"),
    (f"sum by (deployment) (ray_serve_num_ongoing_requests_at_replicas{S})", "at replicas {{deployment}}")],
      "short", 16, 8, desc="Requests waiting for a replica, and requests being processed, per deployment.")
nextrow()
panel("Time per stage p50", [(f"histogram_quantile(0.5, sum by (le, stage) (rate(ray_mote_serve_stage_seconds_bucket{S}[$__rate_interval])))", "{{stage}}")],
      "s", 0, 8, desc=HIST)
panel("Tokens/s per stage", [(f"sum by (stage) (rate(ray_mote_serve_stage_tokens_total{S}[$__rate_interval]))", "{{stage}}")],
      "short", 8, 8)
panel("Requests by stages used", [(f"sum by (le) (increase(ray_mote_serve_stages_per_request_bucket{S}[$__range]))", "<= {{le}} stages")],
      "short", 16, 8, kind="bargauge",
      desc="Cumulative: requests that used at most 1 (direct answer), 2, or 3 stages (analysis + guidance + answer).")
nextrow()
row("Evaluation (mote-ray eval)")
panel("Progress by suite", [(f"sum by (suite) (ray_mote_eval_prompts_answered_total{S}) / sum by (suite) (ray_mote_eval_prompts_planned_total{S})", "{{suite}}")],
      "percentunit", 0, 12, kind="bargauge", desc="Answered / planned evaluation prompts (all models so far).")
panel("Answers/s by suite and status", [(f"sum by (suite, status) (rate(ray_mote_eval_prompts_answered_total{S}[$__rate_interval]))", "{{suite}} {{status}}")],
      "short", 12, 12, desc="status=error rows are kept with their reason and scored as missing.")
nextrow()

dash = {
    "uid": "mote-ray", "title": "mote-ray", "tags": ["mote-ray", "ray"], "timezone": "browser",
    "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
    "time": {"from": "now-30m", "to": "now"},
    "description": "Throughput of mote-ray generation, training, serving and evaluation from Ray's Prometheus metrics.",
    "templating": {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0},
        {"name": "session", "label": "Ray session", "type": "query", "datasource": DS,
         "query": {"query": "label_values(ray_node_cpu_count, SessionName)", "refId": "session"},
         "definition": "label_values(ray_node_cpu_count, SessionName)",
         "includeAll": True, "multi": True, "allValue": ".+", "current": {"text": "All", "value": "$__all"},
         "refresh": 2, "hide": 0},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}
(Path(__file__).parent / "mote-ray.json").write_text(json.dumps(dash, indent=2) + "\n")
print(f"{len(panels)} panels")
