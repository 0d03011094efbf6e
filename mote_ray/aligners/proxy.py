"""A Serve deployment that puts the squad in front of any OpenAI-compatible upstream.

`POST /v1/chat/completions` goes upstream unchanged (the client's bearer key is passed through, or
the key from `--upstream-key-env`); the answer comes back aligned by the squad, with its trace in a
`squad` field when the request carries `"squad": {"return_trace": true}`. Upstream failures become
clean errors: unreachable or timed out -> 503, a 5xx -> 502 (503 stays 503), a 4xx passes through
with its body. `stream: true` is answered as one SSE chunk (the squad needs the whole answer).
"""

from __future__ import annotations

import asyncio
import json
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

app = FastAPI(title="mote-ray squad proxy")


def _error(status: int, message: str, code: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


@serve.deployment(name="SquadProxy", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
@serve.ingress(app)
class SquadProxy:
    def __init__(self, squad_dir: str, upstream: str, engine: str = "transformers", upstream_key_env: str | None = None,
                 timeout_s: float = 120.0):
        import httpx

        from mote_ray.aligners.squad import Squad

        self.squad = Squad(squad_dir, engine)
        base = upstream.rstrip("/")
        self.upstream = base if base.endswith("/v1") else base + "/v1"
        self.key = os.environ.get(upstream_key_env) if upstream_key_env else None
        self.client = httpx.AsyncClient(timeout=timeout_s)

    @app.get("/healthz")
    def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(self):
        return {"status": "ready", "upstream": self.upstream}

    def _headers(self, request: Request) -> dict:
        auth = f"Bearer {self.key}" if self.key else request.headers.get("authorization")
        return {"Authorization": auth} if auth else {}

    async def _forward(self, method: str, path: str, request: Request, body: dict | None = None):
        import httpx

        try:
            r = await self.client.request(method, self.upstream + path, json=body, headers=self._headers(request))
        except (httpx.ConnectError, httpx.TimeoutException, httpx.RemoteProtocolError) as e:
            return None, _error(503, f"upstream {self.upstream} unavailable ({type(e).__name__}); retry", "upstream_unavailable")
        if r.status_code >= 500:
            status = 503 if r.status_code == 503 else 502
            return None, _error(status, f"upstream answered {r.status_code}: {r.text[:300]}", "upstream_error")
        if r.status_code >= 400:
            return None, JSONResponse(r.json() if r.headers.get("content-type", "").startswith("application/json")
                                      else {"error": {"message": r.text[:300]}}, status_code=r.status_code)
        try:
            return r.json(), None
        except ValueError:
            return None, _error(502, "upstream answered with a body that is not JSON", "upstream_error")

    @app.get("/v1/models")
    async def models(self, request: Request):
        data, err = await self._forward("GET", "/models", request)
        return err or data

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        try:
            body = json.loads(await request.body() or b"")
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return _error(400, "request body must be a JSON object", "invalid_json")
        opts = body.pop("squad", None) or {}
        stream = bool(body.get("stream"))
        body["stream"] = False
        data, err = await self._forward("POST", "/chat/completions", request, body)
        if err:
            return err
        try:
            answer = data["choices"][0]["message"]["content"] or ""
            prompt = next(m["content"] for m in reversed(body.get("messages", [])) if m.get("role") == "user")
        except (KeyError, IndexError, TypeError, StopIteration):
            return _error(502, "upstream response has no choices[0].message.content (or the request no user turn)",
                          "upstream_error")
        out = (await asyncio.to_thread(self.squad.align, [prompt], [answer]))[0]
        data["choices"][0]["message"]["content"] = out["answer"]
        if opts.get("return_trace"):
            data["squad"] = {"original": answer, "trace": out["trace"], "scores": out["scores"]}
        if not stream:
            return data
        chunk = {"id": data.get("id", "chatcmpl-squad"), "object": "chat.completion.chunk", "created": data.get("created", 0),
                 "model": data.get("model"), "choices": [{"index": 0, "delta": {"role": "assistant", "content": out["answer"]},
                                                          "finish_reason": data["choices"][0].get("finish_reason", "stop")}]}

        async def events():
            yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def build_proxy(args: dict):
    from pathlib import Path

    from mote_ray.errors import MoteError

    squad = Path(args["squad"]).resolve()
    if not (squad / "squad.json").is_file():
        raise MoteError(f"{args['squad']} is not a squad directory (no squad.json)")
    return SquadProxy.bind(str(squad), args["upstream"], args.get("engine") or "transformers", args.get("upstream_key_env"),
                           float(args.get("timeout_s", 120)))
