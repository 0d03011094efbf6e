"""`mote-ray top`: current throughput of the mote-ray jobs on a Ray cluster, for users without Grafana.

Reads the same Prometheus endpoints Grafana would (each node's metrics export port, found through
`ray.nodes()` or given with --url), twice `interval` seconds apart: counters become rates, gauges
show their latest value. Names are the exported ones (`ray_` + what mote_ray declares; see
mote_ray/metrics.py and deploy/grafana/mote-ray.json).
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from collections import defaultdict

from mote_ray.errors import MoteError

# (exported name, labels to group by, title, unit); counters are shown as rates.
RATES = [
    ("ray_mote_generate_prompts_done_total", (), "generate  prompts/s", ""),
    ("ray_mote_generate_tokens_total", ("stage",), "generate  tokens/s", ""),
    ("ray_mote_train_tokens_total", (), "train     tokens/s", ""),
    ("ray_mote_serve_requests_total", ("mode", "status"), "serve     requests/s", ""),
    ("ray_mote_serve_stage_tokens_total", ("stage",), "serve     tokens/s", ""),
    ("ray_mote_eval_prompts_answered_total", ("suite",), "eval      answers/s", ""),
]
TOTALS = [
    ("ray_mote_generate_rejects_total", ("reason",), "generate  rejected rows"),
    ("ray_mote_eval_prompts_answered_total", ("suite",), "eval      answered"),
    ("ray_mote_eval_prompts_planned_total", ("suite",), "eval      planned"),
]
GAUGES = [("ray_mote_train_loss", ("stage",), "train     loss")]
MEANS = [  # histogram: delta(sum) / delta(count) over the interval; approximate, as Ray 2.60 exports
    # histogram sums from bucket midpoints
    ("ray_mote_train_step_seconds", "train     step seconds ~"),
    ("ray_mote_serve_request_seconds", "serve     request seconds ~"),
]

Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample name, sorted labels) -> value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", action="append", default=[], metavar="URL",
                   help="a Prometheus endpoint, e.g. http://HEAD:8080/metrics (repeatable; default: every "
                        "node's metrics export port, from the Ray cluster at --address)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else `auto`)")
    p.add_argument("--interval", type=float, default=10.0,
                   help="seconds between the two scrapes of a rate (Ray reports metrics every 10 s by default)")
    p.add_argument("--count", type=int, default=0, help="refreshes before exiting (default: until Ctrl-C)")


def main(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise MoteError("--interval must be positive")
    urls = args.url or node_urls(args.address)
    before, n = scrape_all(urls), 0
    while not args.count or n < args.count:
        time.sleep(args.interval)
        after = scrape_all(urls)
        print(report(before, after, args.interval), flush=True)
        before, n = after, n + 1
    return 0


def node_urls(address: str | None) -> list[str]:
    """Every alive node's Prometheus endpoint (the port set by `ray start --metrics-export-port`)."""
    import os

    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False,
                 configure_logging=False)
    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]
    if not urls:
        raise MoteError("no Ray node exports metrics; start Ray with --metrics-export-port, or pass --url")
    return urls


def scrape(url: str, timeout: float = 10.0) -> Snapshot:
    """One endpoint's samples, one per (name, labels) including the reporting process's labels."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(url, timeout=timeout).read().decode()
    except OSError as e:
        raise MoteError(f"cannot read metrics from {url}: {e}") from None
    out: Snapshot = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] += s.value
    return dict(out)


def scrape_all(urls: list[str]) -> Snapshot:
    total: Snapshot = defaultdict(float)
    for url in urls:
        for key, value in scrape(url).items():
            total[key] += value
    return dict(total)


def grouped(snap: Snapshot, name: str, by: tuple[str, ...], op=sum) -> dict[str, float]:
    """`op` (sum over workers for counters, max for a gauge) of `name` per value of the `by` labels,
    e.g. {"analysis": 12.0, "answer": 40.0}."""
    out: dict[str, list[float]] = defaultdict(list)
    for (n, labels), value in snap.items():
        if n == name:
            d = dict(labels)
            out[" ".join(d.get(k, "") for k in by) or "all"].append(value)
    return {k: op(v) for k, v in out.items()}


def report(before: Snapshot, after: Snapshot, seconds: float) -> str:
    """The lines `mote-ray top` prints: rates over the interval, then totals and latest values."""
    lines = [time.strftime("-- %H:%M:%S --")]
    for name, by, title, _ in RATES:
        now, then = grouped(after, name, by), grouped(before, name, by)
        rates = {k: max(0.0, v - then.get(k, 0.0)) / seconds for k, v in sorted(now.items())}
        if rates:
            lines.append(f"{title:28s} " + _fmt(rates))
    for name, title in MEANS:
        ds = sum(grouped(after, name + "_sum", ()).values()) - sum(grouped(before, name + "_sum", ()).values())
        dc = sum(grouped(after, name + "_count", ()).values()) - sum(grouped(before, name + "_count", ()).values())
        if dc > 0:
            lines.append(f"{title:28s} {ds / dc:.3g}")
    for name, by, title in TOTALS:
        if totals := grouped(after, name, by):
            lines.append(f"{title:28s} " + _fmt(totals))
    for name, by, title in GAUGES:
        if values := grouped(after, name, by, op=max):
            lines.append(f"{title:28s} " + _fmt(values, total=False))
    if len(lines) == 1:
        lines.append("no mote-ray metrics yet (is a job running? metrics arrive every few seconds)")
    return "\n".join(lines)


def _fmt(values: dict[str, float], total: bool = True) -> str:
    if list(values) == ["all"]:
        return f"{values['all']:.4g}"
    parts = ", ".join(f"{k}: {v:.4g}" for k, v in sorted(values.items()))
    return f"{sum(values.values()):.4g}  ({parts})" if total else parts


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="mote-ray top")
    add_arguments(_p)
    sys.exit(main(_p.parse_args()))
