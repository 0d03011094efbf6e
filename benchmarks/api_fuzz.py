"""API fuzzing: schemathesis-generated and hostile requests against the live Serve app and the squad proxy.

    .venv/bin/python benchmarks/api_fuzz.py  ->  benchmarks/results/api_fuzz.json

Two apps on loopback, each with its own Ray: `mote-ray serve` (a tiny trained MoTE model, key
required) and `mote-ray aligners serve` in front of it (its own inbound key; its upstream key is
another one). Cases, each sent with the right key and ~1 in 8 without one (then it must be a 401):
  - schemathesis (property-based, from an OpenAPI document; chosen because it is the field's tool for
    exactly this) on each app's own /openapi.json, every operation, positive and negative modes;
  - schemathesis positive cases from the app's chat schema narrowed to valid requests (the fields we
    implement, our model name), so many generate and their responses are checked;
  - schemathesis on the official OpenAI description's chat-completions operation
    (../shared/openai/openapi.yaml, read in place), each body sent as drawn and with our model name;
  - hand-written hostile bodies: huge numbers, deep JSON, invalid UTF-8, NaN, negative limits,
    unknown modes, 10k messages, 2 MiB bodies, lone surrogates, wrong types, odd auth headers.
Checked on every response: no 5xx (server_errors); every 4xx has an OpenAI-style error body
(bad_error_bodies); every 200 from chat completions validates against CreateChatCompletionResponse,
every SSE chunk against CreateChatCompletionStreamResponse (schema_violations). Afterwards every file
the run's Ray sessions wrote and both servers' output are searched for the keys (key_leaks).
Bounded: FUZZ_SCALE (default 1) scales the case counts; each request has a 120 s client timeout.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from api_serve import key_leaks, ray_tmp, trained_mote, trained_squad, work_dir  # noqa: E402
from common import SHARED, write_result  # noqa: E402

SPEC = SHARED / "openai" / "openapi.yaml"
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
SERVE_KEY, PROXY_KEY = "fz-serve-7d1c0b2a", "fz-proxy-93e6f5aa"
UPSTREAM_KEY = SERVE_KEY  # what the proxy sends upstream: the Serve app's key
CHAT = "/v1/chat/completions"


def n(count: int) -> int:
    return max(1, int(count * SCALE))


def draw(strategy, count: int, seed: int) -> list:
    """`count` schemathesis cases, generation phase only (no shrinking: we want spread, not minimal)."""
    from hypothesis import HealthCheck, Phase, given, seed as hseed, settings
    from hypothesis.errors import Unsatisfiable

    out = []

    @hseed(seed)
    @settings(max_examples=count, phases=[Phase.generate], suppress_health_check=list(HealthCheck), deadline=None,
              database=None)
    @given(strategy)
    def collect(case):
        out.append(case)

    try:
        collect()
    except Unsatisfiable:  # e.g. negative cases of an operation that takes no input: there are none
        pass
    return out


def spec_bodies(count: int) -> list:
    import schemathesis
    from schemathesis import GenerationMode

    op = schemathesis.openapi.from_path(str(SPEC))["/chat/completions"]["POST"]
    cases = draw(op.as_strategy(), count // 2, 1) + draw(op.as_strategy(GenerationMode.NEGATIVE), count - count // 2, 2)
    return [c.body for c in cases]


def app_cases(base: str, count: int) -> list[dict]:
    """Requests drawn from the app's own OpenAPI document, every operation, both modes."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    per = max(1, count // (2 * len(ops)))
    out = []
    for i, op in enumerate(ops):
        weight = 4 if op.path == CHAT else 1  # the chat operation is the one with a body worth exploring
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for c in draw(op.as_strategy(mode), per * weight, 10 + i):
                body = None if c.body is None or type(c.body).__name__ == "NotSet" else c.body
                out.append({"method": c.method.upper(), "path": c.formatted_path, "query": c.query or None,
                            "json": body, "source": "app_schema"})
    return out


SUPPORTED = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "presence_penalty",
             "frequency_penalty", "seed", "stop", "stream", "stream_options", "user", "safety_identifier",
             "prompt_cache_key", "mote", "squad")


def valid_cases(base: str, model: str, count: int) -> list[dict]:
    """Positive cases from the app's own chat schema narrowed to what a request can validly carry (the
    fields we implement, roles and text parts as validated, our model name), so most of them generate
    and their responses are checked against the official schemas; the last message is made a user turn."""
    import httpx
    import schemathesis

    doc = httpx.get(base + "/openapi.json", timeout=30).json()
    body = doc["paths"][CHAT]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = {k: v for k, v in body["properties"].items() if k in SUPPORTED}
    props["model"] = {"const": model}
    props["messages"] = {"type": "array", "minItems": 1, "maxItems": 6, "items": {
        "type": "object", "additionalProperties": False, "required": ["role", "content"], "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant"]},
            "content": {"anyOf": [{"type": "string", "maxLength": 200}, {"type": "array", "maxItems": 3, "items": {
                "type": "object", "additionalProperties": False, "required": ["type", "text"],
                "properties": {"type": {"const": "text"}, "text": {"type": "string", "maxLength": 80}}}}]}}}}
    for k in ("max_tokens", "max_completion_tokens"):  # bounded so the run stays short; big values are drawn elsewhere
        props[k] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 96}, {"type": "null"}]}
    narrowed = {"openapi": "3.1.0", "info": {"title": "valid chat requests", "version": "1"}, "paths": {CHAT: {"post": {
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False, "required": ["model", "messages"], "properties": props}}}},
        "responses": {"200": {"description": "a chat completion"}}}}}}
    op = schemathesis.openapi.from_dict(narrowed)[CHAT]["POST"]
    out = []
    for c in draw(op.as_strategy(), count, 3):
        b = dict(c.body)
        if b["messages"][-1]["role"] != "user":
            b["messages"] = [*b["messages"], {"role": "user", "content": "Question 7?"}]
        out.append({"method": "POST", "path": CHAT, "json": b, "source": "app_schema_valid"})
    return out


def hostile(model: str) -> list[dict]:
    m = [{"role": "user", "content": "Question 1?"}]
    good = {"model": model, "messages": m}
    raw = [
        b"", b"null", b"[]", b'"x"', b"{", b"\xff\xfe\xfd", b'{"model": "' + b"\xc3\x28" + b'"}',
        b'{"model": "m", "messages": [], "temperature": NaN}', b'{"temperature": Infinity}', b'{"seed": -Infinity}',
        b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"max_tokens": ' + b"9" * 10_000 + b"}", b'{"model": "x", "pad": "' + b"x" * (2 << 20) + b'"}',
        json.dumps({**good, "messages": [{"role": "user", "content": "\ud800"}]}).encode(),
        json.dumps({**good, "messages": [{"role": "user", "content": "a\u0000b"}], "max_tokens": 4}).encode(),
    ]
    bodies = [
        {**good, "max_tokens": 10**30}, {**good, "max_tokens": -5}, {**good, "max_tokens": 0}, {**good, "seed": 10**40},
        {**good, "temperature": -1}, {**good, "temperature": 1e308}, {**good, "top_p": -0.1}, {**good, "n": 10**6},
        {**good, "mote": {"mode": "sideways"}}, {**good, "mote": {"stage_max_tokens": {"analysis": -3}}},
        {**good, "mote": {"stage_max_tokens": {"analysis": 10**12}}}, {**good, "mote": {"stage_max_tokens": {"x": 1}}},
        {**good, "mote": "full"}, {**good, "mote": {"return_stages": "yes"}}, {**good, "messages": m * 10_000},
        {**good, "messages": [{"role": "user", "content": "word " * 5000}]}, {**good, "stop": ["a"] * 100},
        {**good, "stop": 5}, {**good, "stream": "maybe"}, {**good, "stream_options": {"include_usage": True}},
        {**good, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
        {**good, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, {**good, "messages": [{"role": "user"}]},
        {**good, "messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, {**good, "messages": [m[0], 5]},
        {**good, "tools": [{"type": "function", "function": {"name": "f"}}]}, {**good, "logprobs": True},
        {**good, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, {**good, "model": None},
        {**good, "model": "x" * 10_000}, {"messages": m}, {**good, "max_tokens": 4, "stream": True, "stop": "e"},
        {**good, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}},
        {**good, "max_completion_tokens": 3, "mote": {"mode": "full", "return_stages": True}},
        {**good, "max_tokens": 500}, {**good, "squad": {"return_trace": "x"}}, {**good, "squad": [1]},
    ]
    cases = [{"method": "POST", "path": CHAT, "content": r, "source": "hostile"} for r in raw]
    cases += [{"method": "POST", "path": CHAT, "json": b, "source": "hostile"} for b in bodies]
    cases += [{"method": "POST", "path": CHAT, "json": good, "auth": a, "source": "hostile_auth"}
              for a in ("Basic Zm9vOmJhcg==", "Bearer", "Bearer ", "bearer " + SERVE_KEY, "Bearer " + "k" * 10_000,
                        "Bearer \u00e9\u00e9", SERVE_KEY)]
    cases += [{"method": "GET", "path": "/v1/models", "auth": "Bearer nope", "source": "hostile_auth"},
              {"method": "POST", "path": CHAT, "content": b"{}", "ctype": "text/plain", "source": "hostile"},
              {"method": "POST", "path": CHAT, "content": b"a=b", "ctype": "application/x-www-form-urlencoded",
               "source": "hostile"}]
    return cases


class Tally:
    def __init__(self):
        self.cases = self.server_errors = self.schema_violations = self.bad_error_bodies = self.unauth_not_401 = 0
        self.unsendable = 0
        self.status: dict[str, int] = {}
        self.by_source: dict[str, int] = {}
        self.examples: dict[str, list] = {}

    def note(self, kind: str, case: dict, detail) -> None:
        self.examples.setdefault(kind, [])
        if len(self.examples[kind]) < 5:
            self.examples[kind].append({"case": _brief(case), "detail": str(detail)[:400]})


def _brief(case: dict) -> dict:
    out = {k: v for k, v in case.items() if k not in ("content", "json")}
    if "json" in case:
        out["json"] = json.dumps(case["json"], default=str)[:300]
    if "content" in case:
        out["content"] = repr(case["content"][:120])
    return out


class _RawResponse:
    def __init__(self, status_code: int, headers: dict, text: str):
        self.status_code, self.headers, self.text = status_code, headers, text

    def json(self):
        return json.loads(self.text)


def _raw_request(base: str, method: str, path: str, headers: dict, content: bytes | None) -> _RawResponse:
    """http.client sends header values as given (UTF-8 bytes), where httpx/h11 refuse them client-side."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.putrequest(method, path)
        for k, v in {**headers, "Content-Length": str(len(content or b""))}.items():
            conn.putheader(k, v.encode("utf-8"))
        conn.endheaders(content)
        r = conn.getresponse()
        return _RawResponse(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode("utf-8", "replace"))
    finally:
        conn.close()


def send(client, base: str, case: dict, key: str | None, tally: Tally, app: str) -> None:
    from mote_ray.serving.conformance import violations

    headers = {}
    if "auth" in case:
        headers["Authorization"] = case["auth"]
    elif key:
        headers["Authorization"] = f"Bearer {key}"
    kwargs = {"headers": headers, "params": case.get("query")}
    if isinstance(case.get("json"), (bytes, bytearray)):  # schemathesis' negative mode draws raw bodies too
        case = {**{k: v for k, v in case.items() if k != "json"}, "content": bytes(case["json"])}
    if "content" in case:
        kwargs["content"] = case["content"]
        headers["Content-Type"] = case.get("ctype", "application/json")
    elif case.get("json") is not None:
        try:
            kwargs["content"] = json.dumps(case["json"]).encode()
        except TypeError as e:  # not a JSON value: nothing to send as JSON, and said so in the result
            tally.unsendable += 1
            tally.note("unsendable", case, e)
            return
        headers["Content-Type"] = "application/json"
    try:
        if "auth" in case:  # hostile headers httpx refuses to send (trailing space, non-ASCII) go out as raw bytes
            r = _raw_request(base, case["method"], case["path"], headers, kwargs.get("content"))
        else:
            r = client.request(case["method"], base + case["path"], **kwargs)
    except Exception as e:  # a reset or a hang is as bad as a 5xx
        tally.server_errors += 1
        tally.note("transport_errors", case, f"{type(e).__name__}: {e}")
        return
    tally.cases += 1
    tally.status[str(r.status_code)] = tally.status.get(str(r.status_code), 0) + 1
    src = f"{app}:{case['source']}"
    tally.by_source[src] = tally.by_source.get(src, 0) + 1
    if r.status_code >= 500:
        tally.server_errors += 1
        tally.note("server_errors", case, f"{r.status_code} {r.text[:300]}")
        return
    if key is None and "auth" not in case and case["path"] in (CHAT, "/v1/models") and r.status_code != 401:
        tally.unauth_not_401 += 1
        tally.note("unauth_not_401", case, r.status_code)
    if r.status_code >= 400:
        try:
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        except Exception:
            if case["path"] in (CHAT, "/v1/models"):  # FastAPI's own 404/405 for paths we do not serve are not ours
                tally.bad_error_bodies += 1
                tally.note("bad_error_bodies", case, f"{r.status_code} {r.text[:300]}")
        return
    if case["path"] != CHAT or case["method"] != "POST":
        return
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data: {"):
                try:
                    event = json.loads(line[6:])
                except ValueError as e:  # not JSON: fails any schema
                    errs = [f"chunk is not JSON ({e}): {line[:200]}"]
                else:
                    errs = ["error event: " + json.dumps(event)] if "error" in event else \
                        violations(str(SPEC), "CreateChatCompletionStreamResponse", event)
                if errs:
                    tally.schema_violations += 1
                    tally.note("schema_violations", case, errs)
                    break
    else:
        try:
            errs = violations(str(SPEC), "CreateChatCompletionResponse", r.json())
        except ValueError as e:
            errs = [f"body is not JSON ({e}): {r.text[:200]}"]
        if errs:
            tally.schema_violations += 1
            tally.note("schema_violations", case, errs)


def fuzz(base: str, key: str, model: str, counts: dict, tally: Tally, app: str) -> None:
    import httpx

    rng = random.Random(0)
    cases = app_cases(base, counts["app"]) + valid_cases(base, model, counts["valid"])
    for b in spec_bodies(counts["spec"]):
        cases.append({"method": "POST", "path": CHAT, "json": b, "source": "official_spec"})
        if isinstance(b, dict):  # the same body with our model name, so it reaches the rest of the validation
            cases.append({"method": "POST", "path": CHAT, "json": {**b, "model": model}, "source": "official_spec"})
    cases += hostile(model)
    rng.shuffle(cases)
    print(f"[{app}] {len(cases)} cases", flush=True)
    t0 = time.perf_counter()
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda ic: send(client, base, ic[1], None if ic[0] % 8 == 7 else key, tally, app),
                      enumerate(cases)))
    print(f"[{app}] done in {time.perf_counter() - t0:.0f}s: {tally.cases} cases so far, "
          f"{tally.server_errors} server errors, {tally.schema_violations} schema violations", flush=True)


def main() -> int:
    from mote_ray.serving.local import LocalServer

    work = work_dir("fuzz")
    t0 = time.perf_counter()
    mote, squad = trained_mote(work), trained_squad(work)
    build_s = time.perf_counter() - t0
    tally, tmp_dirs, outputs = Tally(), [ray_tmp(), ray_tmp()], []
    env = {"FZ_SERVE_KEY": SERVE_KEY, "FZ_PROXY_KEY": PROXY_KEY, "FZ_UPSTREAM_KEY": UPSTREAM_KEY}
    t1 = time.perf_counter()
    with LocalServer(["--model", str(mote), "--api-key-env", "FZ_SERVE_KEY", "--timeout", "60"],
                     env={**env, "RAY_TMPDIR": tmp_dirs[0]}) as up:
        model = Path(mote).name
        fuzz(up.base_url, SERVE_KEY, model, {"app": n(700), "spec": n(500), "valid": n(300)}, tally, "serve")
        with LocalServer(["--squad", str(squad), "--upstream", up.base_url + "/v1", "--api-key-env", "FZ_PROXY_KEY",
                          "--upstream-key-env", "FZ_UPSTREAM_KEY"], command=("aligners", "serve"),
                         env={**env, "RAY_TMPDIR": tmp_dirs[1]}) as px:
            fuzz(px.base_url, PROXY_KEY, model, {"app": n(150), "spec": n(300), "valid": n(80)}, tally, "proxy")
            outputs.append(px.output())
        outputs.append(up.output())
    fuzz_s = time.perf_counter() - t1
    leaks = key_leaks([SERVE_KEY, PROXY_KEY], tmp_dirs, outputs)
    write_result("api_fuzz", {
        "cases": tally.cases, "server_errors": tally.server_errors, "schema_violations": tally.schema_violations,
        "bad_error_bodies": tally.bad_error_bodies, "unauthenticated_not_401": tally.unauth_not_401,
        "key_leaks": len(leaks),
    }, unsendable_cases=tally.unsendable, status_counts=tally.status, cases_by_source=tally.by_source, examples=tally.examples, leaked_in=leaks[:20],
        scale=SCALE, build_seconds=round(build_s, 1), fuzz_seconds=round(fuzz_s, 1),
        total_seconds=round(time.perf_counter() - t0, 1), spec=str(SPEC.name),
        schemathesis=__import__("schemathesis").__version__)
    ok = tally.server_errors == 0 and tally.schema_violations == 0 and not leaks
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
