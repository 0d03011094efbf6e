"""A Serve deployment that puts the squad in front of any OpenAI-compatible upstream.

`POST /v1/chat/completions` goes upstream unchanged (with the key from `--upstream-key-env`, if any:
the caller's own key is checked here, against `--api-key-env`, and never forwarded, echoed or logged);
the answer comes back aligned by the squad, with its trace in a
`squad` field when the request carries `"squad": {"return_trace": true}`. Upstream failures become
clean errors: unreachable or timed out -> 503, a 5xx -> 502 (503 stays 503), a 4xx passes through
with its body. `stream: true` is answered as one SSE chunk (the squad needs the whole answer), plus a usage chunk when
`stream_options.include_usage` asks for one.
"""

from __future__ import annotations

import asyncio
import json
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from mote_ray.serving.api import ApiError, KeyRing, request_schema
from mote_ray.serving.config import ProxyConfig

app = FastAPI(title="mote-ray squad proxy")


def _proxy_request_schema() -> dict:
    """What the proxy takes: the upstream's chat request (ours, documented) plus the `squad` options."""
    schema = request_schema()
    schema["properties"]["squad"] = {"type": "object", "additionalProperties": False,
                                     "properties": {"return_trace": {"type": "boolean"}}}
    return schema


# Module helpers sit above the deployment class (the Serve replica raised NameError on ones below it).
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _text(content) -> str:
    """A message's text: a string, or OpenAI's list of text parts."""
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str):
        raise TypeError("content")
    return content


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(ApiError(status, message, code).body(), status_code=status)


@serve.deployment(name="SquadProxy", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
@serve.ingress(app)
class SquadProxy:
    def __init__(self, squad_dir: str, upstream: str, engine: str = "transformers", upstream_key_env: str | None = None,
                 timeout_s: float = 120.0, auth: dict | None = None):
        import httpx

        from mote_ray.aligners.squad import Squad

        self.squad = Squad(squad_dir, engine)
        base = upstream.rstrip("/")
        self.upstream = base if base.endswith("/v1") else base + "/v1"
        self.key = os.environ.get(upstream_key_env) if upstream_key_env else None
        self.client = httpx.AsyncClient(timeout=timeout_s)
        self.keys = KeyRing(**(auth or {}))

    @app.get("/healthz")
    def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(self):
        return {"status": "ready", "upstream": self.upstream}

    def _headers(self) -> dict:
        # Only our own upstream key goes upstream; the caller's Authorization header stays here.
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    async def _forward(self, method: str, path: str, content: bytes | None = None):
        """`content`: the JSON body, serialized once by the caller (see `chat`)."""
        import httpx

        headers = {**self._headers(), **({"Content-Type": "application/json"} if content is not None else {})}
        try:
            r = await self.client.request(method, self.upstream + path, content=content, headers=headers)
        except httpx.TransportError as e:  # refused, reset, timed out, closed mid-answer: all "unavailable"
            return None, _error(503, f"upstream {self.upstream} unavailable ({type(e).__name__}); retry", "upstream_unavailable")
        if r.status_code >= 500:
            status = 503 if r.status_code == 503 else 502
            return None, _error(status, f"upstream answered {r.status_code}: {r.text[:300]}", "upstream_error")
        if r.status_code >= 400:
            try:
                payload = r.json()
                assert isinstance(payload, dict) and isinstance(payload.get("error"), dict)
            except (ValueError, AssertionError):
                return None, _error(r.status_code, f"upstream answered {r.status_code}: {r.text[:300]}", "upstream_error")
            return None, JSONResponse(payload, status_code=r.status_code)
        try:
            return r.json(), None
        except ValueError:
            return None, _error(502, "upstream answered with a body that is not JSON", "upstream_error")

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self.keys.check(request.headers.get("authorization"))
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        data, err = await self._forward("GET", "/models")
        return err or data

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": _proxy_request_schema()}}}})
    async def chat(self, request: Request):
        from mote_ray.serving.deployments import _read_body

        try:
            self.keys.check(request.headers.get("authorization"))
            raw = await _read_body(request)
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        try:
            body = json.loads(raw or b"", parse_constant=_reject_constant)
            assert isinstance(body, dict)
        except (ValueError, RecursionError, AssertionError):
            return _error(400, "request body must be a JSON object", "invalid_json")
        opts = body.pop("squad", None)
        if opts is not None and not (isinstance(opts, dict) and set(opts) <= {"return_trace"}
                                     and isinstance(opts.get("return_trace", False), bool)):
            return _error(400, "squad: must be an object {\"return_trace\": bool}", "invalid_request")
        opts = opts or {}
        # A stream is answered here as one chunk, so upstream is asked without streaming and stream_options
        # are honoured here. Any other `stream` value (false, or not a boolean) goes upstream as sent, with
        # its stream_options, for the upstream to accept or refuse: nothing is rewritten into a valid request.
        stream = body.get("stream") is True
        include_usage = False
        if stream:
            so = body.pop("stream_options", None)
            if so is not None and not (isinstance(so, dict) and set(so) <= {"include_usage", "include_obfuscation"}
                                       and all(v is None or isinstance(v, bool) for v in so.values())):
                return JSONResponse(ApiError(400, "stream_options: must be an object with boolean include_usage / "
                                             "include_obfuscation", "invalid_request", "stream_options").body(),
                                    status_code=400)
            include_usage = bool((so or {}).get("include_usage"))
            body["stream"] = False
        # Serialized once, here: json.dumps' ASCII escapes carry any parsed value (a lone surrogate included)
        # to the upstream unchanged, so it judges exactly what the caller sent (httpx's UTF-8 encoding raised).
        try:
            content = json.dumps(body, allow_nan=False).encode()
        except ValueError:  # 1e400 parses to inf: not a number JSON can carry upstream
            return _error(400, "request body has a number out of range (not finite)", "invalid_json")
        except RecursionError:  # parsed just under the recursion limit, one frame too deep to write back
            return _error(400, "request body is nested too deeply", "invalid_json")
        data, err = await self._forward("POST", "/chat/completions", content)
        if err:
            return err
        try:
            answer = data["choices"][0]["message"]["content"] or ""
            prompt = _text(next(m["content"] for m in reversed(body.get("messages", [])) if m.get("role") == "user"))
        except (KeyError, IndexError, TypeError, StopIteration, AttributeError):
            return _error(502, "upstream response has no choices[0].message.content (or the request no user turn)",
                          "upstream_error")
        out = (await asyncio.to_thread(self.squad.align, [prompt], [answer]))[0]
        data["choices"][0]["message"]["content"] = out["answer"]
        if opts.get("return_trace"):
            data["squad"] = {"original": answer, "trace": out["trace"], "scores": out["scores"]}
        if not stream:
            return data
        head = {"id": data.get("id", "chatcmpl-squad"), "object": "chat.completion.chunk",
                "created": data.get("created", 0), "model": data.get("model")}
        # Extensions the caller asked for (our trace, the upstream's `mote` stages) ride on the one chunk.
        chunk = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": out["answer"]},
                                      "logprobs": None, "finish_reason": data["choices"][0].get("finish_reason", "stop")}],
                 **{k: data[k] for k in ("mote", "squad") if k in data}}

        async def events():
            yield f"data: {json.dumps(chunk)}\n\n"
            if include_usage and "usage" in data:  # OpenAI's final chunk: usage, no choices
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': data['usage']})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def build_proxy(config: ProxyConfig | dict):
    """The squad proxy app for `config` (a dict is validated into a ProxyConfig, naming a bad field)."""
    from pathlib import Path

    from mote_ray.errors import MoteError
    from mote_ray.serving.deployments import auth_from_args

    config = ProxyConfig.model_validate(config)
    squad = Path(config.squad).resolve()
    if not (squad / "squad.json").is_file():
        raise MoteError(f"{config.squad} is not a squad directory (no squad.json)")
    auth = auth_from_args(config.model_dump())
    key_env = config.upstream_key_env
    if key_env and not os.environ.get(key_env):  # else every request would go upstream without a key, silently
        raise MoteError(f"--upstream-key-env {key_env}: ${key_env} is not set (or empty)")
    return SquadProxy.bind(str(squad), config.upstream, config.engine, key_env, config.timeout_s, auth)
