"""The request contract (pure, no Ray): every OpenAI field honoured or refused with a 400 naming it,
hostile bodies refused with 4xx, and our response shapes against the official OpenAI schemas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mote_ray.serving.api import (MAX_BODY_BYTES, ApiError, check_auth, completion, key_digest,
                                  messages_for_template, parse_request)
from mote_ray.serving.conformance import violations

from .conftest import SHARED

GOOD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
SPEC = SHARED / "openai" / "openapi.yaml"


def refused(extra: dict | bytes) -> ApiError:
    raw = extra if isinstance(extra, bytes) else json.dumps({**GOOD, **extra}).encode()
    with pytest.raises(ApiError) as e:
        parse_request(raw, "m")
    body = e.value.body()["error"]
    assert body["message"] and body["type"] and body["code"]  # OpenAI's error shape
    return e.value


@pytest.mark.parametrize("field,value", [
    ("n", 2), ("logprobs", True), ("top_logprobs", 3), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "auto"), ("response_format", {"type": "json_object"}), ("logit_bias", {"5": 10}),
    ("functions", [{"name": "f"}]), ("audio", {"voice": "alloy", "format": "mp3"}), ("modalities", ["audio"]),
    ("reasoning_effort", "high"), ("prediction", {"type": "content", "content": "x"}), ("store", True),
    ("web_search_options", {}), ("parallel_tool_calls", True), ("service_tier", "flex"),
    ("not_an_openai_field", 1),
])
def test_unsupported_fields_are_a_400_naming_the_field(field, value):
    e = refused({field: value})
    assert e.status == 400 and e.param == field and field in e.message


@pytest.mark.parametrize("field,value", [("n", 1), ("logprobs", False), ("tools", []), ("logit_bias", {}),
                                         ("response_format", {"type": "text"}), ("modalities", ["text"]),
                                         ("store", False), ("service_tier", "auto"), ("user", "u-1"),
                                         ("stream_options", {"include_usage": True})])
def test_fields_at_their_feature_off_value_are_accepted(field, value):
    extra = {field: value, **({"stream": True} if field == "stream_options" else {})}
    parse_request(json.dumps({**GOOD, **extra}).encode(), "m")


def test_text_parts_work_and_image_parts_are_refused():
    req = parse_request(json.dumps({**GOOD, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]}).encode(), "m")
    assert messages_for_template(req) == [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "one\ntwo"}]
    e = refused({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]})
    assert e.status == 400 and e.param == "messages.0.content" and "image_url" in e.message


@pytest.mark.parametrize("extra,param", [
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"), ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"max_tokens": -1}, "max_tokens"), ({"max_completion_tokens": 10**9}, "max_completion_tokens"),
    ({"seed": 2**70}, "seed"), ({"n": True}, "n"), ({"max_tokens": "5"}, "max_tokens"), ({"stream": 1}, "stream"), ({"mote": {"stage_max_tokens": {"analysis": 0}}}, "mote.stage_max_tokens"),
    ({"mote": {"stage_max_tokens": {"analysis": 10**7}}}, "mote.stage_max_tokens"), ({"mote": {"mode": "up"}}, "mote.mode"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x"}] * 10_000}, "messages"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
])
def test_out_of_bounds_values_are_a_400_naming_the_field(extra, param):
    e = refused(extra)
    assert e.status == 400 and e.param == param, e.message


@pytest.mark.parametrize("raw", [b'{"model": "m", "messages": [], "temperature": NaN}', b"\xff\xfe{}",
                                 b"[" * 200_000, b'{"seed": ' + b"9" * 5000 + b"}", b"", b'"a string"'])
def test_hostile_bodies_are_a_400(raw):
    e = refused(raw)
    assert e.status == 400 and e.code == "invalid_json"


def test_oversized_body_is_a_413():
    assert refused(b" " * (MAX_BODY_BYTES + 1)).status == 413


def test_keys_are_compared_against_every_digest_and_never_echoed():
    digests = [key_digest("k1"), key_digest("k2")]
    check_auth("Bearer k2", digests)
    with pytest.raises(ApiError) as e:
        check_auth("Bearer k3", digests)
    assert e.value.status == 401 and "k3" not in json.dumps(e.value.body())


def test_completion_conforms_to_the_official_response_schema():
    if not SPEC.is_file():
        pytest.skip(f"needs {SPEC}")
    req = parse_request(json.dumps({**GOOD, "mote": {"return_stages": True}}).encode(), "m")
    res = {"answer": "ok", "stages": {"analysis": "a", "answer": "ok"}, "stage_tokens": {"analysis": 1, "answer": 1},
           "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 6, "token_ids": [1] * 6, "seconds": 0.1}
    body = completion(req, res)
    assert violations(str(SPEC), "CreateChatCompletionResponse", body) == []
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    del body["choices"][0]["logprobs"]  # the validator is not vacuous: what the old responses lacked
    assert violations(str(SPEC), "CreateChatCompletionResponse", body)


def _model_dir(tmp_path):
    for sub in ("mote", "base"):
        (tmp_path / sub).mkdir()
    return str(tmp_path)


def test_app_without_a_key_is_refused_unless_loopback_or_insecure(tmp_path, monkeypatch):
    from mote_ray.errors import MoteError
    from mote_ray.serving.deployments import auth_from_args, build

    with pytest.raises(MoteError, match="no API key configured"):
        build({"model": _model_dir(tmp_path)})  # what `serve run serve/config.yaml` does without MOTE_API_KEY
    with pytest.raises(MoteError, match="MOTE_API_KEY"):
        auth_from_args({"api_key_env": "MOTE_API_KEY"})
    assert auth_from_args({"insecure": True}) is None and auth_from_args({"loopback_only": True}) is None
    monkeypatch.setenv("MOTE_API_KEY", "k")
    assert auth_from_args({"api_key_env": "MOTE_API_KEY"}) == {"digests": [key_digest("k")], "keys_file": None}


def test_cli_listens_beyond_loopback_only_with_a_key_or_insecure(tmp_path, capsys):
    from mote_ray.cli import main

    assert main(["serve", "--model", _model_dir(tmp_path), "--host", "0.0.0.0"]) != 0
    assert "refusing to listen on 0.0.0.0 without an API key" in capsys.readouterr().err


def test_config_yaml_requires_the_key_it_names():
    import yaml

    args = yaml.safe_load((Path(__file__).parents[1] / "serve/config.yaml").read_text())
    app = args["applications"][0]["args"]
    assert app["api_key_env"] == "MOTE_API_KEY" and app["insecure"] is False
    assert args["http_options"]["host"] == "0.0.0.0"  # so the key is what protects it


def test_proxy_never_forwards_the_callers_key():
    from mote_ray.aligners.proxy import SquadProxy

    proxy = SquadProxy.func_or_class.__new__(SquadProxy.func_or_class)
    proxy.key = None
    assert proxy._headers() == {}  # the old proxy passed the caller's Authorization upstream
    proxy.key = "upstream-secret"
    assert proxy._headers() == {"Authorization": "Bearer upstream-secret"}


def _proxy(upstream_seen: list):
    """A SquadProxy without Ray or models: an httpx mock upstream and a squad that appends '!'."""
    import httpx

    from mote_ray.aligners.proxy import SquadProxy
    from mote_ray.serving.api import KeyRing

    def upstream(request: httpx.Request) -> httpx.Response:
        try:
            body = json.loads(request.content)
        except RecursionError:  # as our Serve app answers a body nested too deeply to parse
            return httpx.Response(400, json={"error": {"message": "too deep", "type": "invalid_request_error"}})
        upstream_seen.append(body)
        if not isinstance(body.get("stream", False), bool) or "stream_options" in body:  # what our Serve app refuses
            return httpx.Response(400, json={"error": {"message": "stream: bad", "type": "invalid_request_error"}})
        return httpx.Response(200, json={
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi", "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    class Squad:
        def align(self, prompts, answers):
            return [{"answer": a + "!", "trace": [{"aligner": "ethical"}], "scores": {"ethical": 0.9}} for a in answers]

    proxy = SquadProxy.func_or_class.__new__(SquadProxy.func_or_class)
    proxy.squad, proxy.upstream, proxy.key, proxy.keys = Squad(), "http://up/v1", None, KeyRing()
    proxy.client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    return proxy


def _proxy_call(proxy, raw: bytes):
    import asyncio

    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def run():
        resp = await proxy.chat(Request({"type": "http", "method": "POST", "path": "/v1/chat/completions",
                                         "headers": [], "query_string": b""}, receive))
        if hasattr(resp, "body_iterator"):
            return resp.status_code, "".join([c async for c in resp.body_iterator])
        if isinstance(resp, dict):  # FastAPI serialises a returned dict as a 200
            return 200, json.dumps(resp)
        return resp.status_code, resp.body.decode()

    return asyncio.run(run())


def test_proxy_forwards_what_it_cannot_utf8_encode_and_refuses_infinite_numbers():
    seen = []
    proxy = _proxy(seen)
    body = {**GOOD, "messages": [{"role": "user", "content": "a\ud800b"}]}
    status, text = _proxy_call(proxy, json.dumps(body).encode())  # the old proxy raised UnicodeEncodeError: a 500
    assert status == 200 and seen[-1]["messages"] == body["messages"]  # the upstream judges the same value
    status, text = _proxy_call(proxy, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 1e400}')
    assert status == 400 and json.loads(text)["error"]["message"]


def test_proxy_never_answers_500_on_json_nested_near_the_recursion_limit():
    """A body parsed just under the recursion limit could fail to be written back upstream (a 500 before)."""
    import sys

    proxy = _proxy([])
    limit = sys.getrecursionlimit()
    for depth in range(limit - 250, limit + 10):  # the window moves with the stack depth of the caller
        raw = json.dumps(GOOD)[:-1].encode() + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
        status, text = _proxy_call(proxy, raw)
        assert status in (200, 400), (depth, status, text[:200])
        if status == 400:
            assert json.loads(text)["error"]["message"]


def test_proxy_refuses_to_start_when_its_upstream_key_variable_is_unset(tmp_path, monkeypatch):
    from mote_ray.aligners.proxy import build_proxy
    from mote_ray.errors import MoteError

    (tmp_path / "squad.json").write_text("{}")
    monkeypatch.delenv("MOTE_TEST_UPSTREAM_KEY", raising=False)
    with pytest.raises(MoteError, match="MOTE_TEST_UPSTREAM_KEY"):  # before: every request went upstream keyless
        build_proxy({"squad": str(tmp_path), "upstream": "http://up", "upstream_key_env": "MOTE_TEST_UPSTREAM_KEY",
                     "insecure": True})


def test_proxy_never_rewrites_an_invalid_stream_into_a_valid_request():
    seen = []
    proxy = _proxy(seen)
    status, _ = _proxy_call(proxy, json.dumps({**GOOD, "stream": "maybe"}).encode())
    assert status == 400 and seen[-1]["stream"] == "maybe"  # the old proxy sent stream: false and answered 200
    status, _ = _proxy_call(proxy, json.dumps({**GOOD, "stream_options": {"include_usage": True}}).encode())
    assert status == 400 and "stream_options" in seen[-1]  # without stream: the upstream refuses it, as OpenAI does
    status, text = _proxy_call(proxy, json.dumps({**GOOD, "stream": True, "stream_options": {"include_usage": "y"}}).encode())
    assert status == 400 and json.loads(text)["error"]["param"] == "stream_options"


def test_proxy_stream_honours_include_usage_and_the_trace_against_the_official_schema():
    proxy = _proxy([])
    status, text = _proxy_call(proxy, json.dumps({**GOOD, "stream": True, "stream_options": {"include_usage": True},
                                                  "squad": {"return_trace": True}}).encode())
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert status == 200 and text.rstrip().endswith("data: [DONE]")
    assert events[0]["choices"][0]["delta"]["content"] == "Hi!" and events[0]["squad"]["original"] == "Hi"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 4  # the old proxy sent no usage
    for event in events:
        assert violations(str(SPEC), "CreateChatCompletionStreamResponse", event) == []


def test_proxy_documents_its_request_body_for_clients_and_fuzzers():
    from mote_ray.aligners.proxy import app

    op = app.openapi()["paths"]["/v1/chat/completions"]["post"]
    props = op["requestBody"]["content"]["application/json"]["schema"]["properties"]  # the old doc had no body
    assert {"model", "messages", "max_tokens", "mote"} <= set(props) and props["squad"]["properties"]["return_trace"]


def test_top_p_zero_is_the_single_most_likely_token_on_every_engine():
    import torch
    from vllm import SamplingParams as VllmSampling

    from mote_ray.mote.chain import StageRequest
    from mote_ray.mote.reference import _pick

    top_p = parse_request(json.dumps({**GOOD, "top_p": 0}).encode(), "m").sampling(8)["top_p"]
    VllmSampling(temperature=0.7, top_p=top_p)  # the old value 0.0 raised VLLMValidationError: a 503
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    req = StageRequest(tokens=(1,), experts=(2,), expert=2, temperature=0.7, top_p=top_p, max_tokens=1)
    picks = {_pick(logits.clone(), req, torch.Generator().manual_seed(i), []) for i in range(30)}
    assert picks == {1}  # only the most likely token, never an empty nucleus
