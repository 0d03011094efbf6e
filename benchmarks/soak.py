"""Soak: a bounded, steady mixed load on the live Serve app; nothing lost, no 5xx, memory flat.

    .venv/bin/python benchmarks/soak.py  ->  benchmarks/results/soak.json

`mote-ray serve` (a tiny trained MoTE model, key required, one expert replica so its memory is one
process) on loopback; CONCURRENCY clients for SOAK_SECONDS (default 600 s at 16), each looping over
a seeded mix: all four modes, streaming and not, random max_tokens and sampling parameters, ~10% of
streams dropped by the client after a few chunks, ~5% invalid requests (must be a 400).
Every request is classified once: ok, client_error (an expected 4xx with an OpenAI error body),
rejected (429 with Retry-After: back-pressure, retried by clients), disconnected (on purpose),
server_error (a 5xx or an error event in a stream), lost (no response, a transport error, a stream
without its final chunk and [DONE], or a 4xx we did not expect). Ratios: server_errors, lost_requests,
rss_growth = the expert replica's RSS at the end / after warm-up (RSS sampled every 5 s; warm-up is
the first 15% of the run); queue_empty_at_end: once the load has stopped the router reports 0
requests in flight and the expert's engine holds none (vLLM's own count, GET /mote/engine).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from api_serve import key_leaks, ray_tmp, rss_of, trained_mote, work_dir  # noqa: E402
from common import write_result  # noqa: E402

SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "16"))
KEY = "soak-key-5b0e1c7d"
MODES = ["adaptive", "direct", "analysis", "full"]


def request_mix(rng: random.Random, model: str) -> tuple[dict, str]:
    """A request body and what the client will do: 'normal', 'disconnect' or 'invalid'."""
    body = {"model": model, "messages": [{"role": "user", "content": f"Question {rng.randint(0, 999)}?"}],
            "max_tokens": rng.randint(8, 64), "stream": rng.random() < 0.5,
            "mote": {"mode": rng.choice(MODES), "return_stages": rng.random() < 0.3,
                     "stage_max_tokens": {"analysis": rng.randint(2, 16), "guidance": rng.randint(2, 16)}}}
    if rng.random() < 0.3:
        body.update(temperature=0.8, top_p=0.9, seed=rng.randint(0, 1000))
    if rng.random() < 0.1:
        body["stop"] = [rng.choice(["e", ".", "you"])]
    r = rng.random()
    if r < 0.05:  # each of these must be a 400 naming the field
        field, value = rng.choice([("n", 3), ("logprobs", True), ("max_tokens", -1), ("max_tokens", True),
                                   ("top_p", 7), ("mote", {"mode": "sideways"})])
        body[field] = value
        return body, "invalid"
    if body["stream"] and r < 0.15:
        return body, "disconnect"
    return body, "normal"


def one(client, base: str, body: dict, plan: str) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        if not body["stream"] or plan == "invalid":
            r = client.post(base + "/v1/chat/completions", json=body, headers=headers)
            return classify(r.status_code, r.headers, r.text, plan, stream=False)
        with client.stream("POST", base + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                return classify(r.status_code, r.headers, r.read().decode(), plan, stream=True)
            lines, finished, done = 0, False, False
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                lines += 1
                if plan == "disconnect" and lines >= 2:
                    return "disconnected"  # leaving the block closes the connection mid-stream
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return "server_error"
                finished |= any(c.get("finish_reason") for c in event.get("choices", []))
            return "ok" if finished and done else "lost:stream_incomplete"
    except (httpx.TransportError, ValueError) as e:
        return f"lost:{type(e).__name__}"


def classify(status: int, headers, text: str, plan: str, stream: bool) -> str:
    if status >= 500:  # 503 included: no replica dies in a soak, so "expert unavailable" is a failure
        return "server_error"
    if status == 429:
        return "rejected" if headers.get("retry-after") else "lost:429_without_retry_after"
    if status >= 400:
        try:
            ok_body = bool(json.loads(text)["error"]["message"])
        except (ValueError, KeyError, TypeError):
            ok_body = False
        return "client_error" if plan == "invalid" and status == 400 and ok_body else f"lost:unexpected_{status}"
    if plan == "invalid":
        return "lost:invalid_answered_200"  # a parameter silently ignored
    try:
        body = json.loads(text)
        return "ok" if body["choices"][0]["finish_reason"] else "lost:no_finish_reason"
    except (ValueError, KeyError, IndexError, TypeError):
        return "lost:bad_body"


def main() -> int:
    import httpx

    from mote_ray.serving.local import LocalServer

    work = work_dir("soak")
    mote = trained_mote(work)
    tmp = ray_tmp()
    counts: dict[str, int] = {}
    sent = [0]
    lock, stop = threading.Lock(), threading.Event()
    latencies: list[float] = []
    with LocalServer(["--model", str(mote), "--api-key-env", "SOAK_KEY", "--replicas", "1", "--timeout", "60"],
                     env={"SOAK_KEY": KEY, "RAY_TMPDIR": tmp}) as srv:
        expert = srv.session_pids("ServeReplica:mote:ExactExpert") or srv.session_pids("ServeReplica:mote:")
        model = mote.name

        def worker(i: int) -> None:
            rng = random.Random(i)
            with httpx.Client(timeout=120) as client:
                while not stop.is_set():
                    body, plan = request_mix(rng, model)
                    with lock:
                        sent[0] += 1
                    t = time.perf_counter()
                    outcome = one(client, srv.base_url, body, plan)
                    with lock:
                        counts[outcome] = counts.get(outcome, 0) + 1
                        if outcome == "ok":
                            latencies.append(time.perf_counter() - t)

        rss: list[tuple[float, int]] = []
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(CONCURRENCY)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while time.monotonic() - t0 < SECONDS:
            rss.append((round(time.monotonic() - t0, 1), rss_of(expert)))
            time.sleep(min(5.0, max(0.1, SECONDS - (time.monotonic() - t0))))
        stop.set()
        for t in threads:
            t.join(timeout=180)
        hung = sum(t.is_alive() for t in threads)
        rss.append((round(time.monotonic() - t0, 1), rss_of(expert)))
        time.sleep(2)
        inflight = []
        for _ in range(5):  # the router replicas' own count of admitted, unfinished requests
            r = httpx.get(srv.base_url + "/readyz", timeout=10)
            inflight.append(r.json().get("inflight"))
        engine = httpx.get(srv.base_url + "/mote/engine", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
        output = srv.output()
    leaks = key_leaks([KEY], [tmp], [output])
    warm = [v for t, v in rss if t >= 0.15 * SECONDS] or [v for _, v in rss]
    answered = sum(counts.values())
    lost = sum(v for k, v in counts.items() if k.startswith("lost")) + (sent[0] - answered)
    write_result("soak", {
        "server_errors": counts.get("server_error", 0), "lost_requests": lost,
        "rss_growth": warm[-1] / warm[0] if warm and warm[0] else float("nan"),
        "queue_empty_at_end": float(all(x == 0 for x in inflight) and engine.get("unfinished_requests") in (0, None)),
        "key_leaks": len(leaks),
    }, outcomes=counts, requests=sent[0], hung_clients=hung, seconds=SECONDS, concurrency=CONCURRENCY,
        requests_per_s=round(sent[0] / SECONDS, 2),
        ok_latency_s={"p50": round(statistics.median(latencies), 3) if latencies else None,
                      "p95": round(sorted(latencies)[int(0.95 * (len(latencies) - 1))], 3) if latencies else None},
        expert_rss_mib=[(t, round(v / 2**20, 1)) for t, v in rss], expert_pids=expert, router_inflight_at_end=inflight,
        engine_at_end=engine)
    return 0 if counts.get("server_error", 0) == 0 and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
