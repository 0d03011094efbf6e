"""Does the Grafana dashboard read real numbers? Runs a short real pipeline on a local Ray that exports
metrics (generation with a malformed input row -> training -> serving load with evaluation answers
through the endpoint), scrapes Ray's Prometheus endpoint during and after, and lists for every metric
in deploy/grafana/mote-ray.json whether a scrape had a non-zero sample of it.

    flock /tmp/mote-heavy.lock timeout 900 .venv/bin/python benchmarks/metrics_scrape.py
    -> benchmarks/results/metrics.json   (tests/test_metrics_scrape.py runs the same with --out)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY = "metrics-scrape-key"
# Before Ray starts, so every Ray process inherits them: metrics reach the endpoint within a second
# (default 10 s); the Serve config's `serve.app` imports and its api_key_env is set.
os.environ.setdefault("RAY_metrics_report_interval_ms", "500")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
os.environ["MOTE_API_KEY"] = KEY

SHARED = Path(os.environ.get("MOTE_SHARED", ROOT.parent / "shared"))
DASHBOARD = ROOT / "deploy" / "grafana" / "mote-ray.json"
RAYSERVICE = ROOT / "deploy" / "kubernetes" / "base" / "rayservice.yaml"


def dashboard_metrics(path: Path = DASHBOARD) -> list[str]:
    """Every metric name in the dashboard's panel and variable queries, as exported (sample names)."""
    dash = json.loads(path.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash.get("templating", {}).get("list", []) if v.get("definition")]
    return sorted({m for e in exprs for m in re.findall(r"\b(ray_[a-z0-9_]+)", e)})


class Scraper(threading.Thread):
    """Scrapes every `period` s and keeps, per sample name, the largest value any series had."""

    def __init__(self, url: str, period: float = 0.5):
        super().__init__(daemon=True)
        self.url, self.period, self.best, self.scrapes = url, period, {}, 0
        self.stop = threading.Event()

    def scrape_once(self) -> None:
        from mote_ray.top import scrape

        for (name, _), value in scrape(self.url).items():
            self.best[name] = max(self.best.get(name, 0.0), value)
        self.scrapes += 1

    def run(self) -> None:
        while not self.stop.is_set():
            self.scrape_once()
            self.stop.wait(self.period)


def _prompts(d: Path, n: int) -> Path:
    import csv

    with open(SHARED / "datasets" / "advbench" / "harmful_behaviors.csv") as f:
        goals = [r["goal"] for r in csv.DictReader(f)][:n]
    path = d / "prompts.jsonl"
    lines = [json.dumps({"prompt": g}) for g in goals] + ['{"prompt": ""}', "{not json"]  # two rejects
    path.write_text("\n".join(lines) + "\n")
    return path


def local_serve_config(model_dir: Path) -> dict:
    """The RayService's own Serve config, sized for this machine: the served model, the CPU reference
    engine, no GPU, one replica each, and few requests per expert replica so that a burst queues."""
    import yaml

    config = yaml.safe_load(yaml.safe_load(RAYSERVICE.read_text())["spec"]["serveConfigV2"])
    app = config["applications"][0]
    app["args"].update(model=str(model_dir), engine="transformers")
    for d in app["deployments"]:
        d["ray_actor_options"] = {"num_cpus": 0.1 if d["name"] == "Router" else 0.5, "num_gpus": 0}
        d["autoscaling_config"].update(min_replicas=1, max_replicas=1)
        if d["name"] != "Router":
            d["max_ongoing_requests"] = 4
    config["http_options"] = {"host": "127.0.0.1", "port": None}
    return config


def _post(url: str, body: dict | bytes, key: str | None = KEY) -> int:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def serving_load(url: str, n: int = 48, concurrency: int = 24) -> dict:
    """Concurrent chat requests in every mode (more at once than the experts take, so some queue),
    one streamed, and bad ones (400, 401) so requests by status has more than 'ok'."""
    req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        model = json.loads(r.read())["data"][0]["id"]
    modes = ["adaptive", "direct", "full", "analysis"]
    bodies = [{"model": model, "max_tokens": 24, "messages": [{"role": "user", "content": f"Question {i}?"}],
               "mote": {"mode": modes[i % len(modes)]}} for i in range(n)]
    bodies += [b"{not json", {"model": model, "messages": []},
               {"model": model, "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "Hi?"}]}]
    with ThreadPoolExecutor(concurrency) as pool:
        codes = list(pool.map(lambda b: _post(url, b), bodies))
    codes.append(_post(url, bodies[0], key=None))
    return {str(c): codes.count(c) for c in sorted(set(codes))}


def run(out_dir: Path, prompts: int = 12, train_steps: int = 6) -> dict:
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from mote_ray.config import EngineConfig, PoolConfig
    from mote_ray.eval.responders import ModelSpec, respond
    from mote_ray.generation import GenerateConfig, run_generate
    from mote_ray.serving.local import free_port
    from mote_ray.top import node_urls, report, scrape
    from mote_ray.training.run import TrainConfig, run_train

    metrics_port, http_port = free_port(), free_port()
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
             _metrics_export_port=metrics_port)
    scraper = Scraper(f"http://127.0.0.1:{metrics_port}/metrics")
    scraper.start()
    timings, t0 = {}, time.perf_counter()
    try:
        gen_cfg = GenerateConfig(engine=EngineConfig(model=str(SHARED / "models" / "stories260K"), engine="transformers"),
                                 pool=PoolConfig(batch_size=4),
                                 max_tokens={"analysis": 16, "guidance": 16, "answer": 16, "check": 4})
        stats = run_generate(gen_cfg, [str(_prompts(out_dir, prompts))], out_dir / "gen", progress=False)
        timings["generate_s"] = time.perf_counter() - t0
        run_train(TrainConfig(model=str(SHARED / "models" / "stories260K-hd32"), max_steps=train_steps, batch_size=4,
                              lr=1e-2, checkpoint_every=train_steps, max_len=256, mote={"r": 4, "p_skip": 0.0},
                              include_flagged=True, val_share=0.0),
                  out_dir / "gen", out_dir / "run")
        timings["train_s"] = time.perf_counter() - t0 - timings["generate_s"]
        # Deployed the way KubeRay deploys serveConfigV2 (and `serve run config.yaml`): a config
        # handed to the Serve controller, which imports serve.app:build_app with the args.
        config = local_serve_config(out_dir / "run")
        config["http_options"]["port"] = http_port
        serve.start(http_options=config["http_options"])
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
        url = f"http://127.0.0.1:{http_port}"
        before, t_load = scrape(scraper.url), time.perf_counter()
        codes = serving_load(url)
        rows = [{"id": f"e{i}", "prompt": f"Question {i}?", "suite": "harmlessness"} for i in range(8)]
        answered = respond(ModelSpec.parse(url), rows, max_tokens=16, api_key=KEY)
        timings["serve_and_eval_s"] = time.perf_counter() - t0 - timings["generate_s"] - timings["train_s"]
        time.sleep(3)  # a few report intervals, then the last scrapes
        top = report(before, scrape(scraper.url), time.perf_counter() - t_load)  # what `mote-ray top` prints
        discovered = node_urls(None)  # `mote-ray top --address`: the endpoints found through ray.nodes()
        discovered_has_mote = any(n.startswith("ray_mote_") for u in discovered for n, _ in scrape(u))
        scraper.stop.set()
        scraper.join()
        scraper.scrape_once()
    finally:
        scraper.stop.set()
        serve.shutdown()
        ray.shutdown()
    results = []
    for name in dashboard_metrics():
        value = scraper.best.get(name)
        results.append({"metric": name, "present": value is not None, "max_value": value,
                        "nonzero": bool(value)})
    return {"metrics": results, "scrapes": scraper.scrapes, "generate_stats": stats,
            "http_status_counts": codes, "top_output": top.splitlines()[1:],
            "top_discovers_endpoint": any(u.endswith(f":{metrics_port}/metrics") for u in discovered)
            and discovered_has_mote, "eval_answers": len(answered),
            "eval_errors": sum(1 for r in answered if r.get("error")),
            "seconds": {k: round(v, 1) for k, v in timings.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="result JSON (default: benchmarks/results/metrics.json)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mote-metrics-") as d:
        result = run(Path(d))
    ok = sum(m["nonzero"] for m in result["metrics"])
    payload = {"ratios": {"dashboard_metrics_nonzero": round(ok / len(result["metrics"]), 4)}, **result}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    for m in result["metrics"]:
        print(f"{'ok  ' if m['nonzero'] else 'MISS'} {m['metric']}  {m['max_value']}")
    print(f"{ok}/{len(result['metrics'])} dashboard metrics had a non-zero sample; wrote {out}")


if __name__ == "__main__":
    main()
