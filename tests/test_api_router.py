"""The Router's control flow with a scripted expert handle (no Ray): admission, bounds, timeouts that
cancel the expert call, disconnects, stop-sequence hold-back in streams, metrics counted once,
readiness from the expert deployment's state, and every response against the official OpenAI schemas.
The same behaviour on the live app, with the real tiny model, is in test_api_live.py."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from mote_ray.serving.api import KeyRing, key_digest
from mote_ray.serving.conformance import violations
from mote_ray.serving.deployments import Router

from .conftest import SHARED

SPEC = str(SHARED / "openai" / "openapi.yaml")
KEY = "router-test-key"


class FakeMetric:
    def __init__(self, *a, **k):
        self.calls: list[tuple[float, dict]] = []

    def inc(self, value=1, tags=None):
        self.calls.append((value, tags or {}))

    def observe(self, value, tags=None):
        self.calls.append((value, tags or {}))


METRICS = SimpleNamespace(Counter=FakeMetric, Histogram=FakeMetric)


def result(answer="fine answer", stages=None, finish="stop"):
    stages = stages if stages is not None else {"answer": answer}
    return {"answer": answer, "stages": stages, "stage_tokens": {s: 2 for s in stages}, "stage_seconds": {},
            "finish_reason": finish, "prompt_tokens": 5, "completion_tokens": 4, "token_ids": [1, 2, 3, 4],
            "seconds": 0.01}


class FakeResponse:
    def __init__(self, value, delay=0.0):
        self.value, self.delay, self.cancelled = value, delay, False

    def __await__(self):
        async def run():
            await asyncio.sleep(self.delay)
            if isinstance(self.value, Exception):
                raise self.value
            return self.value
        return run().__await__()

    def cancel(self):
        self.cancelled = True


class FakeStream:
    def __init__(self, items, delay=0.0):
        self.items, self.delay, self.cancelled = list(items), delay, False

    async def __anext__(self):
        await asyncio.sleep(self.delay)
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


class FakeExpert:
    """generate/stream as the expert deployments' handle exposes them; records what the router sent."""

    deployment_name, app_name = "ExactExpert", "mote"

    def __init__(self, answer=None, events=None, delay=0.0):
        self.answer, self.events, self.delay = answer or result(), events, delay
        self.calls, self.responses = [], []
        self.generate = SimpleNamespace(remote=self._generate)
        self.stream = SimpleNamespace(remote=self._stream)

    def options(self, stream=False):
        return self

    def _generate(self, *args, sampling=None):
        self.calls.append((args, sampling))
        self.responses.append(FakeResponse(self.answer, self.delay))
        return self.responses[-1]

    def _stream(self, *args, sampling=None):
        self.calls.append((args, sampling))
        events = self.events or [{"stage": "answer", "delta": self.answer["answer"]}, {"done": self.answer}]
        self.responses.append(FakeStream(events, self.delay))
        return self.responses[-1]


@pytest.fixture(scope="module")
def tok(tiny_model):
    from mote_ray.chat import load_tokenizer
    from mote_ray.models import resolve_model

    return load_tokenizer(resolve_model(tiny_model))


def make_router(tok, expert, keys=None, status=None, timeout_s=5.0, max_inflight=8, context=512):
    r = Router.func_or_class.__new__(Router.func_or_class)
    r._setup(expert, tok, "tiny", keys or KeyRing([key_digest(KEY)]), context, 384, timeout_s, max_inflight, METRICS,
             status_fn=lambda _: status or {"status": "HEALTHY", "replica_states": {"RUNNING": 1}})
    return r


def request(body, key=KEY):
    from starlette.requests import Request

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    sent = []

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.sleep(3600)

    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers,
                    "query_string": b""}, receive)


def body(**kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": "Question 1?"}], **kw}


async def call(router, payload, key=KEY):
    resp = await router.chat(request(payload, key))
    if hasattr(resp, "body_iterator"):
        events = [e async for e in resp.body_iterator]
        return resp.status_code, [json.loads(e[6:]) for e in events if e.startswith("data: {")], resp
    if isinstance(resp, dict):
        return 200, resp, None
    return resp.status_code, json.loads(resp.body), resp


def run(coro):
    return asyncio.run(coro)


def test_sampling_and_total_max_tokens_reach_the_expert(tok):
    expert = FakeExpert()
    router = make_router(tok, expert)
    status, data, _ = run(call(router, body(max_tokens=20, top_p=0.5, stop=["END"], seed=3, temperature=0.7,
                                           presence_penalty=0.5, frequency_penalty=-0.5,
                                           mote={"stage_max_tokens": {"analysis": 6}})))
    assert status == 200, data
    (ids, mode, limits, temperature, seed), sampling = expert.calls[0]
    assert (mode, temperature, seed) == ("adaptive", 0.7, 3)
    assert limits == {"analysis": 6}  # max_tokens bounds the whole completion, not the answer stage
    assert sampling == {"max_tokens": 20, "top_p": 0.5, "stop": ["END"], "presence_penalty": 0.5,
                        "frequency_penalty": -0.5}
    run(call(router, body(max_tokens=20, mote={"max_tokens_scope": "answer"})))
    (_, _, limits, _, _), sampling = expert.calls[1]
    assert limits == {"answer": 20} and sampling["max_tokens"] == 512 - len(ids)  # the rest of the context
    assert violations(SPEC, "CreateChatCompletionResponse", data) == []


def test_prompt_plus_max_tokens_beyond_the_context_is_a_400_with_the_numbers(tok):
    router = make_router(tok, FakeExpert(), context=64)
    status, data, _ = run(call(router, body(max_tokens=60)))
    assert status == 400 and data["error"]["param"] == "max_tokens"
    assert "exceeds the model's context of 64 tokens" in data["error"]["message"]
    status, data, _ = run(call(router, body(messages=[{"role": "user", "content": "word " * 200}])))
    assert status == 400 and data["error"]["code"] == "context_length_exceeded"


def test_each_streaming_request_is_counted_once(tok):
    router = make_router(tok, FakeExpert())
    for stream in (True, False):
        router.requests.calls.clear()
        status, _, _ = run(call(router, body(stream=stream)))
        assert status == 200
        assert router.requests.calls == [(1, {"mode": "adaptive", "stream": str(stream).lower(), "status": "ok"})]
    assert router.inflight == 0


def test_stream_chunks_conform_hold_back_stop_sequences_and_report_usage(tok):
    final = result(answer="hello ")  # the engine cut the answer where the stop sequence began
    events = [{"stage": "analysis", "delta": "think"}, {"stage": "answer", "delta": "hello wo"},
              {"stage": "answer", "delta": "rld and more"}, {"done": final}]
    router = make_router(tok, FakeExpert(answer=final, events=events))
    status, chunks, _ = run(call(router, body(stream=True, stop="world", stream_options={"include_usage": True},
                                             mote={"return_stages": True})))
    assert status == 200
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "hello "
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert any(c.get("mote", {}).get("stage") == "analysis" for c in chunks)
    for c in chunks:
        assert violations(SPEC, "CreateChatCompletionStreamResponse", c) == [], c


def test_no_answer_is_flagged_in_mote(tok):
    router = make_router(tok, FakeExpert(answer=result(answer="", stages={"analysis": "thinking"}, finish="length")))
    status, data, _ = run(call(router, body(max_tokens=3)))
    assert status == 200 and data["choices"][0]["finish_reason"] == "length"
    assert data["choices"][0]["message"]["content"] == "" and data["mote"] == {"no_answer": True}


def test_timeout_aborts_the_expert_call(tok):
    expert = FakeExpert(delay=2.0)
    router = make_router(tok, expert, timeout_s=0.2)
    status, data, _ = run(call(router, body()))
    assert status == 504 and data["error"]["code"] == "timeout" and expert.responses[0].cancelled
    status, chunks, _ = run(call(router, body(stream=True)))
    assert status == 504 and expert.responses[1].cancelled
    # a stream that times out after it started: an error event, then the expert stream is cancelled
    slow = FakeExpert(events=[{"stage": "answer", "delta": "a"}, {"stage": "answer", "delta": "b"}, {"done": result()}])
    router = make_router(tok, slow, timeout_s=0.5)

    def stream(*args, sampling=None):
        s = FakeStream(slow.events)
        orig = s.__anext__

        async def later():
            if len(s.items) < 3:
                await asyncio.sleep(2)
            return await orig()
        s.__anext__ = later
        slow.responses.append(s)
        return s
    slow.stream = SimpleNamespace(remote=stream)
    status, chunks, _ = run(call(router, body(stream=True)))
    assert status == 200 and chunks[-1]["error"]["code"] == "timeout" and slow.responses[0].cancelled
    assert router.requests.calls[-1][1]["status"] == "timeout" and router.inflight == 0


def test_client_disconnect_cancels_the_expert_stream(tok):
    expert = FakeExpert(events=[{"stage": "answer", "delta": "a"}] * 50 + [{"done": result()}])
    router = make_router(tok, expert)

    async def go():
        resp = await router.chat(request(body(stream=True)))
        it = resp.body_iterator
        await it.__anext__()
        await it.__anext__()
        await it.aclose()  # what Starlette does when the client goes away

    run(go())
    assert expert.responses[0].cancelled and router.inflight == 0
    assert router.requests.calls[-1] == (1, {"mode": "adaptive", "stream": "true", "status": "cancelled"})


def test_full_queue_is_a_429_with_retry_after(tok):
    expert = FakeExpert(delay=0.5)
    router = make_router(tok, expert, max_inflight=2)

    async def go():
        return await asyncio.gather(*(call(router, body()) for _ in range(4)))

    out = run(go())
    codes = sorted(s for s, _, _ in out)
    assert codes == [200, 200, 429, 429]
    rejected = next(r for s, _, r in out if s == 429)
    assert rejected.headers["retry-after"] == "1"
    assert next(d for s, d, _ in out if s == 429)["error"]["type"] == "rate_limit_error"


def test_readiness_asks_the_expert_deployment(tok):
    for state, want in [({"status": "HEALTHY", "replica_states": {"RUNNING": 2}}, 200),
                        ({"status": "UNHEALTHY", "replica_states": {"RUNNING": 1}}, 503),
                        ({"status": "UPDATING", "replica_states": {"STARTING": 1}}, 503),
                        ({"status": "UPSCALING", "replica_states": {"RUNNING": 1}}, 200)]:
        resp = run(make_router(tok, FakeExpert(), status=state).readyz())
        assert getattr(resp, "status_code", 200) == want, state

    def broken(_):
        raise ConnectionError("controller gone")

    router = make_router(tok, FakeExpert())
    router.status_fn = broken
    assert run(router.readyz()).status_code == 503


def test_keys_from_a_file_rotate_without_restart_and_never_echo(tok, tmp_path):
    import os

    keys = tmp_path / "keys"
    keys.write_text("# rotated monthly\nold-key-1\nnew-key-2\n")
    router = make_router(tok, FakeExpert(), keys=KeyRing(keys_file=str(keys)))
    assert run(call(router, body(), key="old-key-1"))[0] == 200
    assert run(call(router, body(), key="new-key-2"))[0] == 200
    keys.write_text("new-key-2\n")
    os.utime(keys, ns=(1, 10**18))  # a different mtime even within the clock's resolution
    status, data, _ = run(call(router, body(), key="old-key-1"))
    assert status == 401 and "old-key-1" not in json.dumps(data)
    assert run(call(router, body(), key=None))[0] == 401
    assert run(call(router, body(), key="new-key-2"))[0] == 200


def test_body_too_large_is_a_413(tok):
    router = make_router(tok, FakeExpert())
    status, data, _ = run(call(router, b'{"model": "tiny", "messages": [], "pad": "' + b"x" * (1 << 21) + b'"}'))
    assert status == 413 and data["error"]["code"] == "body_too_large"


def test_expert_health_check_fails_when_its_vllm_engine_has_died():
    """Serve calls check_health on each replica; a dead engine must fail it so the replica is replaced
    and /readyz (which reads the deployment state) stops saying ready."""
    from mote_ray.serving.experts import ExactExpert

    cls = ExactExpert.func_or_class
    expert = cls.__new__(cls)  # the health check only reads the engine; no model is loaded here
    expert.name, expert.engine = "vllm", SimpleNamespace(llm=SimpleNamespace(errored=False))
    expert.check_health()
    expert.engine.llm.errored = True
    with pytest.raises(RuntimeError, match="vLLM engine has died"):
        expert.check_health()
