"""`mote-ray top` against a real HTTP endpoint serving Prometheus text the way Ray exports it."""

from __future__ import annotations

import contextlib
import io
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from mote_ray.cli import main
from mote_ray.errors import MoteError
from mote_ray.top import report, scrape

LABELS = 'Component="core_worker",SessionName="s1",WorkerId="{w}"'


def exposition(prompts: float, tokens: dict[str, float], loss: float, step_sum: float, step_count: float) -> str:
    """Two workers report the generation counters (summed by `top`); rank 0 reports training."""
    lines = ["# HELP ray_mote_generate_prompts_done_total Prompts", "# TYPE ray_mote_generate_prompts_done_total counter"]
    lines += [f'ray_mote_generate_prompts_done_total{{{LABELS.format(w=w)}}} {prompts / 2}' for w in ("a", "b")]
    lines += ["# TYPE ray_mote_generate_tokens_total counter"]
    lines += [f'ray_mote_generate_tokens_total{{{LABELS.format(w="a")},stage="{s}"}} {n}' for s, n in tokens.items()]
    lines += ["# TYPE ray_mote_train_loss gauge",
              f'ray_mote_train_loss{{{LABELS.format(w="t")},stage="all"}} {loss}',
              f'ray_mote_train_loss{{{LABELS.format(w="t")},stage="answer"}} {loss + 1}',
              "# TYPE ray_mote_train_step_seconds histogram",
              f'ray_mote_train_step_seconds_bucket{{{LABELS.format(w="t")},le="+Inf"}} {step_count}',
              f'ray_mote_train_step_seconds_sum{{{LABELS.format(w="t")}}} {step_sum}',
              f'ray_mote_train_step_seconds_count{{{LABELS.format(w="t")}}} {step_count}',
              "# TYPE ray_node_cpu_count gauge", f'ray_node_cpu_count{{{LABELS.format(w="n")}}} 2.0']
    return "\n".join(lines) + "\n"


@pytest.fixture
def endpoint():
    """Serves the next exposition on every GET (the last one repeats)."""
    pages = [exposition(10, {"analysis": 100, "answer": 50}, 2.5, 1.0, 4),
             exposition(30, {"analysis": 300, "answer": 90}, 2.0, 2.5, 7)]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = (pages.pop(0) if len(pages) > 1 else pages[0]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()


def test_top_prints_rates_over_the_interval_summed_over_workers(endpoint):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["top", "--url", endpoint, "--interval", "0.5", "--count", "1"]) == 0
    lines = {line[:28].strip(): line[28:].strip() for line in out.getvalue().splitlines()[1:]}
    assert lines["generate  prompts/s"] == "40"  # (30 - 10) / 0.5, two workers summed
    assert lines["generate  tokens/s"] == "480  (analysis: 400, answer: 80)"
    assert lines["train     step seconds ~"] == "0.5"  # (2.5 - 1.0) / (7 - 4)
    assert lines["train     loss"] == "all: 2, answer: 3"  # latest gauge values, not summed


def test_report_says_when_no_mote_metrics_exist_yet(endpoint):
    snap = {k: v for k, v in scrape(endpoint).items() if k[0] == "ray_node_cpu_count"}
    assert "no mote-ray metrics yet" in report(snap, snap, 1.0)


def test_unreachable_endpoint_is_a_clear_error(capsys):
    assert main(["top", "--url", "http://127.0.0.1:9/metrics", "--count", "1"]) == 2
    assert "cannot read metrics from http://127.0.0.1:9/metrics" in capsys.readouterr().err


def test_bad_interval_is_refused(capsys):
    assert main(["top", "--url", "http://127.0.0.1:9/metrics", "--interval", "0"]) == 2
    assert "--interval must be positive" in capsys.readouterr().err
