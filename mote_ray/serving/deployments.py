"""The Serve app: the OpenAI-compatible Router (FastAPI ingress) over one expert deployment (experts.py).

One multiplexed
deployment rather than one per stage: a chain's stages run back to back, so per-stage deployments
would add a network hop and a base-model copy per stage while each sat idle two thirds of the time.
The router (FastAPI ingress) validates, authenticates, encodes, picks the mode and calls the expert.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from mote_ray.serving.api import ApiError, check_auth, chunk, completion, mote_field, parse_request
from mote_ray.serving.experts import ExactExpert, FastExpert

log = logging.getLogger("ray.serve")  # the logger Serve replicas write to their log files and the driver
app = FastAPI(title="mote-ray", description="OpenAI-compatible MoTE chat completions")


@serve.deployment(name="Router", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16})
@serve.ingress(app)
class Router:
    def __init__(self, expert, model_dir: str, model_name: str, key_digest: str | None = None,
                 max_prompt_tokens: int = 384, timeout_s: float = 120.0):
        from ray.serve import metrics

        from mote_ray.chat import load_tokenizer
        from mote_ray.models import resolve_model

        self.expert, self.model_name, self.digest = expert, model_name, key_digest
        self.max_prompt_tokens, self.timeout_s = max_prompt_tokens, timeout_s
        self.tok = load_tokenizer(resolve_model(f"{model_dir}/base"))
        self.requests = metrics.Counter("mote_serve_requests", "Chat requests by mode and status",
                                        tag_keys=("mode", "status"))
        self.stage_tokens = metrics.Counter("mote_serve_stage_tokens", "Generated tokens per stage", tag_keys=("stage",))
        self.stages_used = metrics.Histogram("mote_serve_stages_per_request", "Stages used per request",
                                             boundaries=[1, 2, 3])
        self.stage_seconds = metrics.Histogram("mote_serve_stage_seconds", "Time per stage", tag_keys=("stage",),
                                               boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])

    @app.get("/healthz")
    def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(self):
        return {"status": "ready", "model": self.model_name}

    @app.get("/v1/models")
    def models(self, request: Request):
        try:
            check_auth(request.headers.get("authorization"), self.digest)
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "mote-ray"}]}

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        rid, t0, mode = uuid.uuid4().hex[:12], time.perf_counter(), "?"
        try:
            check_auth(request.headers.get("authorization"), self.digest)
            req = parse_request(await request.body(), self.model_name)
            mode = req.mote.mode
            ids = self._encode(req)
            limits = {**req.mote.stage_max_tokens}
            if req.answer_tokens:
                limits["answer"] = req.answer_tokens
            args = (ids, mode, limits, req.temperature, req.seed)
            if req.stream:
                self.requests.inc(tags={"mode": mode, "status": "stream"})
                return StreamingResponse(self._sse(req, args, rid), media_type="text/event-stream")
            try:
                result = await asyncio.wait_for(self.expert.generate.remote(*args), timeout=self.timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(504, f"generation took longer than {self.timeout_s:g}s", "timeout") from None
            except Exception as e:  # replica died or is gone: the client may retry
                raise ApiError(503, f"expert unavailable ({type(e).__name__}); retry", "unavailable") from None
            self._observe(mode, result, "ok")
            self._log(rid, mode, 200, t0, result)
            return completion(req, result)
        except ApiError as e:
            self.requests.inc(tags={"mode": mode, "status": str(e.status)})
            self._log(rid, mode, e.status, t0)
            return JSONResponse(e.body(), status_code=e.status)

    def _encode(self, req) -> list[int]:
        from mote_ray.chat import encode
        from mote_ray.records import GenerationRequest

        ids = encode(self.tok, GenerationRequest(messages=[m.model_dump() for m in req.messages]))
        if len(ids) > self.max_prompt_tokens:
            raise ApiError(413, f"prompt has {len(ids)} tokens; this server accepts at most {self.max_prompt_tokens}",
                           "prompt_too_long")
        return ids

    async def _sse(self, req, args, rid):
        cid = f"chatcmpl-{rid}"
        yield chunk(req, cid, {"role": "assistant", "content": ""})
        try:
            async for item in self.expert.options(stream=True).stream.remote(*args):
                if "error" in item:
                    yield f"data: {json.dumps({'error': {'message': item['error'], 'type': 'server_error'}})}\n\n"
                    return
                if "done" in item:
                    result = item["done"]
                    extra = {"mote": mote_field(req, result)} if req.mote.return_stages else None
                    self._observe(req.mote.mode, result, "ok")
                    yield chunk(req, cid, {}, finish=result["finish_reason"], extra=extra)
                    break
                if item["stage"] == "answer":
                    yield chunk(req, cid, {"content": item["delta"]})
                elif req.mote.return_stages:
                    yield chunk(req, cid, {}, extra={"mote": {"stage": item["stage"], "delta": item["delta"]}})
        except Exception as e:
            yield f"data: {json.dumps({'error': {'message': f'expert unavailable ({type(e).__name__})', 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"

    def _observe(self, mode, result, status):
        self.requests.inc(tags={"mode": mode, "status": status})
        self.stages_used.observe(len(result["stages"]))
        for stage, n in result["stage_tokens"].items():
            self.stage_tokens.inc(n, tags={"stage": stage})
        for stage, sec in result.get("stage_seconds", {}).items():
            self.stage_seconds.observe(sec, tags={"stage": stage})

    def _log(self, rid, mode, status, t0, result=None):
        # Structured and without prompt or answer text (privacy by default).
        entry = {"request": rid, "mode": mode, "status": status, "ms": round(1000 * (time.perf_counter() - t0), 1)}
        if result:
            entry.update(stages=list(result["stages"]), completion_tokens=result["completion_tokens"])
        log.info(json.dumps(entry))


def build(args: dict):
    """The Serve application for `args` = {model, path, engine, replicas, expert_cpus, api_key_env,
    max_prompt_tokens, timeout_s, name}."""
    import os
    from pathlib import Path

    from mote_ray.errors import MoteError
    from mote_ray.serving.api import key_digest

    model_dir = str(Path(args["model"]).resolve())
    if not (Path(model_dir) / "mote").is_dir() or not (Path(model_dir) / "base").is_dir():
        raise MoteError(f"{args['model']} is not a `mote-ray train` output (needs mote/ and base/)")
    path = args.get("path", "exact")
    if path not in ("exact", "fast"):
        raise MoteError(f"path must be 'exact' or 'fast', got {path!r}")
    digest = None
    if env := args.get("api_key_env"):
        if not os.environ.get(env):
            raise MoteError(f"--api-key-env {env}: that environment variable is empty or unset")
        digest = key_digest(os.environ[env])
    if path == "exact":
        deployment, init = ExactExpert, (model_dir,)
    else:
        if not (Path(model_dir) / "adapters").is_dir():
            raise MoteError(f"{args['model']} has no adapters/ (the fast path serves the exported per-stage adapters)")
        deployment, init = FastExpert, (model_dir, args.get("engine") or "auto")
    if replicas := args.get("replicas"):  # a fixed count instead of autoscaling
        deployment = deployment.options(num_replicas=int(replicas), autoscaling_config=None)
    if cpus := args.get("expert_cpus"):  # e.g. 0.5 to fit two replicas and the router on 2 CPUs
        deployment = deployment.options(ray_actor_options={"num_cpus": float(cpus)})
    expert = deployment.bind(*init)
    return Router.bind(expert, model_dir, args.get("name") or Path(model_dir).name, digest,
                       int(args.get("max_prompt_tokens", 384)), float(args.get("timeout_s", 120)))
