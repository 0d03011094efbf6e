"""The Serve app: the OpenAI-compatible Router (FastAPI ingress) over one expert deployment (experts.py).

One multiplexed
deployment rather than one per stage: a chain's stages run back to back, so per-stage deployments
would add a network hop and a base-model copy per stage while each sat idle two thirds of the time.
The router (FastAPI ingress) authenticates, bounds and validates (api.py), encodes, picks the mode and
calls the expert; it owns the request's life: a timeout or a client disconnect cancels the expert
call (Serve propagates the cancellation to the replica, whose engine aborts the generation).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from mote_ray.serving.api import (MAX_BODY_BYTES, ApiError, ChatRequest, KeyRing, chunk, completion, error_event,
                                  messages_for_template, mote_field, parse_request, request_schema, stop_safe_len,
                                  usage)
from mote_ray.serving.config import ServeConfig
from mote_ray.serving.experts import ExactExpert, LoraExpert

log = logging.getLogger("ray.serve")  # the logger Serve replicas write to their log files and the driver
app = FastAPI(title="mote-ray", description="OpenAI-compatible MoTE chat completions")
READY_STATES = {"HEALTHY", "UPSCALING", "DOWNSCALING"}


class _Slot:
    """One admitted generation: released exactly once (on finish, error, timeout, disconnect, or when
    a stream the client never read is garbage-collected), which also counts the request once."""

    def __init__(self, router: "Router", mode: str, stream: bool):
        self.router, self.mode, self.stream, self.done = router, mode, stream, False
        router.inflight += 1

    def release(self, status: str) -> None:
        if not self.done:
            self.done = True
            self.router.inflight -= 1
            self.router.requests.inc(tags={"mode": self.mode, "stream": str(self.stream).lower(), "status": status})


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 past MAX_BODY_BYTES without reading it all (Content-Length or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body has {declared} bytes; the limit is {MAX_BODY_BYTES}", "body_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES} bytes", "body_too_large")
        parts.append(part)
    return b"".join(parts)


async def _awaitable(resp):
    return await resp


def _abandon(gen, slot: _Slot) -> None:
    if not slot.done:
        gen.cancel()
        slot.release("cancelled")


def _serve_status(expert) -> dict:
    """Serve's controller's view of the expert deployment: {"status", "replica_states"}."""
    st = serve.status().applications[expert.app_name].deployments[expert.deployment_name]
    return {"status": str(getattr(st.status, "value", st.status)), "replica_states": dict(st.replica_states)}


@serve.deployment(name="Router", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16})
@serve.ingress(app)
class Router:
    def __init__(self, expert, model_dir: str, model_name: str, auth: dict | None = None,
                 max_prompt_tokens: int = 384, timeout_s: float = 120.0, max_inflight: int = 64):
        from ray.serve import metrics
        from transformers import AutoConfig

        from mote_ray.chat import load_tokenizer
        from mote_ray.models import resolve_model

        base = resolve_model(f"{model_dir}/base")
        context = int(getattr(AutoConfig.from_pretrained(base.path), "max_position_embeddings", 0) or 2048)
        self._setup(expert, load_tokenizer(base), model_name, KeyRing(**(auth or {})), context, max_prompt_tokens,
                    timeout_s, max_inflight, metrics)

    def _setup(self, expert, tok, model_name: str, keys: KeyRing, context: int, max_prompt_tokens: int,
               timeout_s: float, max_inflight: int, metrics, status_fn=None) -> None:
        """Everything but the model files (a unit test passes a fake expert handle and metrics)."""
        self.expert, self.tok, self.model_name, self.keys = expert, tok, model_name, keys
        self.context, self.max_prompt_tokens = context, min(max_prompt_tokens, context - 1)
        self.timeout_s, self.max_inflight, self.inflight = timeout_s, max_inflight, 0
        self.status_fn = status_fn or _serve_status
        self.requests = metrics.Counter("mote_serve_requests", "Chat requests (each counted once) by mode, stream, status",
                                        tag_keys=("mode", "stream", "status"))
        self.stage_tokens = metrics.Counter("mote_serve_stage_tokens", "Generated tokens per stage", tag_keys=("stage",))
        self.stages_used = metrics.Histogram("mote_serve_stages_per_request", "Stages used per request",
                                             boundaries=[1, 2, 3])
        self.stage_seconds = metrics.Histogram("mote_serve_stage_seconds", "Time per stage", tag_keys=("stage",),
                                               boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])
        self.latency = metrics.Histogram("mote_serve_request_seconds", "Non-streaming request latency by mode",
                                         tag_keys=("mode",), boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60])

    @app.get("/healthz")
    def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        """Ready when Serve's controller reports the expert deployment healthy with a running replica
        (its own health checks call each replica's check_health), not merely when this router is up."""
        name = getattr(self.expert, "deployment_name", "expert")
        try:
            state = await asyncio.wait_for(asyncio.to_thread(self.status_fn, self.expert), timeout=5)
        except Exception as e:  # the controller did not answer: not ready, and say why
            return JSONResponse({"status": "not ready", "reason": f"serve status unavailable ({type(e).__name__})"},
                                status_code=503)
        running = state.get("replica_states", {}).get("RUNNING", 0)
        if state.get("status") not in READY_STATES or running < 1:
            return JSONResponse({"status": "not ready", "expert": name, "deployment_status": state.get("status"),
                                 "running_replicas": running, "inflight": self.inflight}, status_code=503)
        return {"status": "ready", "model": self.model_name, "expert": name, "running_replicas": running,
                "inflight": self.inflight}

    @app.get("/v1/models")
    def models(self, request: Request):
        try:
            self.keys.check(request.headers.get("authorization"))
        except ApiError as e:
            return _error_response(e)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "mote-ray"}]}

    @app.get("/mote/engine")
    async def engine(self, request: Request):
        """One expert replica's engine and the requests it still holds (vLLM's own count): what fault
        tests and soaks check after disconnects and timeouts (0 = nothing left running)."""
        try:
            self.keys.check(request.headers.get("authorization"))
        except ApiError as e:
            return _error_response(e)
        return await self.expert.engine_stats.remote()

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": request_schema()}}}})
    async def chat(self, request: Request):
        rid, t0, mode = uuid.uuid4().hex[:12], time.perf_counter(), "?"
        try:
            self.keys.check(request.headers.get("authorization"))
            req = parse_request(await _read_body(request), self.model_name)
            mode = req.mote.mode
            ids, limits, sampling = self._plan(req)
            if self.inflight >= self.max_inflight:
                raise ApiError(429, f"this replica is at its limit of {self.max_inflight} concurrent requests; retry",
                               "queue_full", headers={"Retry-After": "1"})
            slot = _Slot(self, mode, bool(req.stream))
        except ApiError as e:
            self.requests.inc(tags={"mode": mode, "stream": "?", "status": str(e.status)})
            self._log(rid, mode, e.status, t0)
            return _error_response(e)
        args = (ids, mode, limits, req.temperature or 0.0, req.seed)
        if req.stream:
            return await self._start_stream(req, args, sampling, rid, t0, slot)
        resp = self.expert.generate.remote(*args, sampling=sampling)
        status = "cancelled"  # unless it ends otherwise: the client went away and Serve cancelled us
        try:
            result = await asyncio.wait_for(_awaitable(resp), timeout=self.timeout_s)
            status = "ok"
        except asyncio.TimeoutError:
            status = "timeout"
            return self._fail(rid, mode, t0, ApiError(504, f"generation took longer than {self.timeout_s:g}s; it was "
                                                            "aborted", "timeout"))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # replica died or is gone: the client may retry
            status = "unavailable"
            return self._fail(rid, mode, t0, ApiError(503, f"expert unavailable ({type(e).__name__}); retry",
                                                      "unavailable", headers={"Retry-After": "1"}))
        finally:
            if status != "ok":
                resp.cancel()
            slot.release(status)
        self._observe(result)
        self.latency.observe(time.perf_counter() - t0, tags={"mode": mode})
        self._log(rid, mode, 200, t0, result)
        return completion(req, result)

    def _plan(self, req: ChatRequest) -> tuple[list[int], dict, dict]:
        """Prompt ids, stage limits and the expert's `sampling`, all within the model's context."""
        from mote_ray.chat import encode
        from mote_ray.records import GenerationRequest

        ids = encode(self.tok, GenerationRequest(messages=messages_for_template(req)))
        if len(ids) > self.max_prompt_tokens:
            raise ApiError(400, f"prompt has {len(ids)} tokens; this server accepts at most {self.max_prompt_tokens} "
                                f"(model context {self.context})", "context_length_exceeded", param="messages")
        room = self.context - len(ids)
        limits = {**req.mote.stage_max_tokens}
        total = room
        if req.token_limit is not None:
            name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            if req.token_limit > room:
                raise ApiError(400, f"{name} is {req.token_limit} but the prompt has {len(ids)} tokens: "
                                    f"{len(ids)} + {req.token_limit} = {len(ids) + req.token_limit} exceeds the "
                                    f"model's context of {self.context} tokens", "context_length_exceeded", param=name)
            if req.mote.max_tokens_scope == "answer":
                limits["answer"] = req.token_limit
            else:
                total = req.token_limit
        return ids, limits, req.sampling(total)

    async def _start_stream(self, req, args, sampling, rid, t0, slot):
        """Waits for the expert's first event before answering 200, so a dead expert is a clean 503."""
        gen = self.expert.options(stream=True).stream.remote(*args, sampling=sampling)
        deadline = time.monotonic() + self.timeout_s
        try:
            first = await asyncio.wait_for(gen.__anext__(), timeout=self.timeout_s)
        except BaseException as e:
            gen.cancel()
            status = {asyncio.TimeoutError: "timeout", asyncio.CancelledError: "cancelled"}.get(type(e), "unavailable")
            slot.release(status)
            if isinstance(e, asyncio.CancelledError):
                raise
            err = ApiError(504, f"generation took longer than {self.timeout_s:g}s; it was aborted", "timeout") \
                if status == "timeout" else ApiError(503, f"expert unavailable ({type(e).__name__}); retry",
                                                     "unavailable", headers={"Retry-After": "1"})
            return self._fail(rid, req.mote.mode, t0, err)
        events = self._sse(req, gen, first, deadline, rid, t0, slot)
        weakref.finalize(events, _abandon, gen, slot)  # a stream never read still cancels and counts
        return StreamingResponse(events, media_type="text/event-stream")

    async def _sse(self, req, gen, first, deadline, rid, t0, slot):
        cid, created, mode = f"chatcmpl-{rid}", int(time.time()), req.mote.mode
        stops, answer, sent, status = req.stops, "", 0, "cancelled"
        try:
            yield chunk(req, cid, created, {"role": "assistant", "content": ""})
            item = first
            while True:
                if "error" in item:
                    status = "error"
                    yield error_event(500, f"generation failed: {str(item['error'])[:300]}", "generation_failed")
                    break
                if "done" in item:
                    result = item["done"]
                    tail = result["answer"][sent:] if result["answer"].startswith(answer[:sent]) else ""
                    if tail:
                        yield chunk(req, cid, created, {"content": tail})
                    yield chunk(req, cid, created, {}, finish=result["finish_reason"],
                                extra={"mote": extra} if (extra := mote_field(req, result)) else None)
                    if req.stream_options and req.stream_options.include_usage:
                        yield chunk(req, cid, created, None, extra={"usage": usage(result)})
                    status = "ok"
                    self._observe(result)
                    self._log(rid, mode, 200, t0, result)
                    break
                if item["stage"] == "answer":
                    answer += item["delta"]
                    safe = stop_safe_len(answer, stops)
                    if safe > sent:
                        yield chunk(req, cid, created, {"content": answer[sent:safe]})
                        sent = safe
                elif req.mote.return_stages:
                    yield chunk(req, cid, created, {}, extra={"mote": {"stage": item["stage"], "delta": item["delta"]}})
                remaining = deadline - time.monotonic()
                try:
                    item = await asyncio.wait_for(gen.__anext__(), timeout=max(remaining, 0.001))
                except asyncio.TimeoutError:
                    status = "timeout"
                    yield error_event(504, f"generation took longer than {self.timeout_s:g}s; it was aborted", "timeout")
                    break
                except StopAsyncIteration:
                    status = "error"
                    yield error_event(502, "the expert stream ended without a result", "generation_failed")
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    status = "unavailable"
                    yield error_event(503, f"expert unavailable ({type(e).__name__}); retry", "unavailable")
                    break
            yield "data: [DONE]\n\n"
        finally:
            if status != "ok":
                gen.cancel()
                if status != "cancelled":
                    self._log(rid, mode, status, t0)
            slot.release(status)

    def _fail(self, rid, mode, t0, e: ApiError):
        self._log(rid, mode, e.status, t0)
        return _error_response(e)

    def _observe(self, result):
        self.stages_used.observe(len(result["stages"]))
        for stage, n in result["stage_tokens"].items():
            self.stage_tokens.inc(n, tags={"stage": stage})
        for stage, sec in result.get("stage_seconds", {}).items():
            self.stage_seconds.observe(sec, tags={"stage": stage})

    def _log(self, rid, mode, status, t0, result=None):
        # Structured and without prompt, answer or key (privacy by default).
        entry = {"request": rid, "mode": mode, "status": status, "ms": round(1000 * (time.perf_counter() - t0), 1)}
        if result:
            entry.update(stages=list(result["stages"]), completion_tokens=result["completion_tokens"])
        log.info(json.dumps(entry))


def build(config: ServeConfig | dict):
    """The Serve application for `config` (a dict is validated into a ServeConfig: an unknown key or a bad
    value is refused here, naming the field).

    Without a key (api_key_env / api_keys_file) the app refuses to build unless `insecure: true` or the
    caller binds it to loopback only (`loopback_only: true`, what `mote-ray serve` passes)."""
    from pathlib import Path

    from mote_ray.errors import MoteError

    config = ServeConfig.model_validate(config)
    model_dir = str(Path(config.model).resolve())
    if not (Path(model_dir) / "mote").is_dir() or not (Path(model_dir) / "base").is_dir():
        raise MoteError(f"{config.model} is not a `mote-ray train` output (needs mote/ and base/)")
    auth = auth_from_args(config.model_dump())
    if config.path == "exact":  # vLLM's MoTE model where it can load it, else the batched reference
        from mote_ray.mote.engine import pick_engine

        pick_engine(model_dir, config.engine)  # fails here, with the reason, for --engine vllm where vLLM cannot run
        deployment, init = ExactExpert, (model_dir, config.engine, 32, config.compile)
    else:
        if not (Path(model_dir) / "adapters").is_dir():
            raise MoteError(f"{config.model} has no adapters/ (the lora path serves the exported per-stage adapters)")
        deployment, init = LoraExpert, (model_dir, config.engine)
    if config.replicas:  # a fixed count instead of autoscaling
        deployment = deployment.options(num_replicas=config.replicas, autoscaling_config=None)
    if config.expert_cpus:  # e.g. 0.5 to fit two replicas and the router on 2 CPUs
        deployment = deployment.options(ray_actor_options={"num_cpus": config.expert_cpus})
    expert = deployment.bind(*init)
    return Router.bind(expert, model_dir, config.name or Path(model_dir).name, auth, config.max_prompt_tokens,
                       config.timeout_s, config.max_inflight)


def auth_from_args(args: dict) -> dict | None:
    """KeyRing arguments from {api_key_env, api_keys_file, insecure, loopback_only}; refuses an app that
    would listen beyond loopback without a key unless `insecure` says so explicitly."""
    import os
    from pathlib import Path

    from mote_ray.errors import MoteError
    from mote_ray.serving.api import KeyRing, key_digest

    digests, keys_file = [], args.get("api_keys_file")
    if env := args.get("api_key_env"):
        if not os.environ.get(env):
            raise MoteError(f"api_key_env {env}: that environment variable is empty or unset")
        digests.append(key_digest(os.environ[env]))
    if keys_file:
        keys_file = str(Path(keys_file).resolve())
        try:
            KeyRing(keys_file=keys_file)
        except (OSError, ValueError) as e:
            raise MoteError(f"api_keys_file: {e}") from None
    if not digests and not keys_file:
        if not (args.get("insecure") or args.get("loopback_only")):
            raise MoteError("no API key configured: set api_key_env (or api_keys_file) so callers need a bearer key, "
                            "or `insecure: true` to serve without one")
        return None
    return {"digests": digests, "keys_file": keys_file}
