"""Serve deployments: thin shells over plain objects (the MoTE generator, the API functions).

ExactExpert holds the token-routed MoTE model (mote/generate.py): every stage of a request runs in
one replica with one KV cache, each token through its own expert — the exact path. FastExpert holds
one engine (vLLM when it can run the model, else transformers) with the per-stage adapters, all
stages multiplexed on it by adapter name (mote/fast.py) — the fast path. One multiplexed
deployment rather than one per stage: a chain's stages run back to back, so per-stage deployments
would add a network hop and a base-model copy per stage while each sat idle two thirds of the time.
The router (FastAPI ingress) validates, authenticates, encodes, picks the mode and calls the expert.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from mote_ray.serving.api import ApiError, check_auth, chunk, completion, mote_field, parse_request

log = logging.getLogger("ray.serve")  # the logger Serve replicas write to their log files and the driver
app = FastAPI(title="mote-ray", description="OpenAI-compatible MoTE chat completions")


@serve.deployment(name="ExactExpert", ray_actor_options={"num_cpus": 1},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4})
class ExactExpert:
    def __init__(self, model_dir: str):
        import torch

        from mote_ray.mote.export import load_mote
        from mote_ray.mote.generate import MoTEGenerator

        torch.set_num_threads(max(1, torch.get_num_threads()))
        model, self.tok = load_mote(model_dir)
        self.gen = MoTEGenerator(model, self.tok)
        self.lock = threading.Lock()  # one generation at a time per replica (CPU-bound)

    def generate(self, ids: list[int], mode: str, limits: dict, temperature: float, seed: int | None) -> dict:
        t0 = time.perf_counter()
        with self.lock:
            out = self.gen.generate(ids, mode=mode, limits=limits, temperature=temperature, seed=seed)
        return _result(out, ids, t0)

    def stream(self, ids: list[int], mode: str, limits: dict, temperature: float, seed: int | None):
        """Yields {"stage", "delta"} as text grows, then {"done": result}."""
        q: queue.Queue = queue.Queue()
        texts: dict[str, list[int]] = {}
        shown: dict[str, str] = {}

        def on_token(stage, token):
            if stage is None or token in self.gen.start_to_stage or token in {e for _, e in self.gen.ids.values()}:
                return
            texts.setdefault(stage, []).append(token)
            text = self.tok.decode(texts[stage], skip_special_tokens=True)
            delta, shown[stage] = text[len(shown.get(stage, "")):], text
            if delta:
                q.put({"stage": stage, "delta": delta})

        def run():
            try:
                with self.lock:
                    out = self.gen.generate(ids, mode=mode, limits=limits, temperature=temperature, seed=seed,
                                            on_token=on_token)
                q.put({"done": _result(out, ids)})
            except Exception as e:  # surfaced to the client as a clean error
                q.put({"error": f"{type(e).__name__}: {e}"})

        threading.Thread(target=run, daemon=True).start()
        while True:
            item = q.get()
            yield item
            if "done" in item or "error" in item:
                return

    def check_health(self):
        if self.gen is None:
            raise RuntimeError("no model loaded")


def _result(out, ids: list[int], t0: float | None = None) -> dict:
    return {"answer": out.answer, "stages": out.stages, "stage_tokens": out.stage_tokens,
            "stage_seconds": out.stage_seconds, "finish_reason": out.finish_reason, "prompt_tokens": len(ids), "completion_tokens": len(out.token_ids),
            "token_ids": out.token_ids, "seconds": time.perf_counter() - t0 if t0 else None}


@serve.deployment(name="FastExpert", ray_actor_options={"num_cpus": 1},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16})
class FastExpert:
    """Stage-by-stage chains on one engine; concurrent requests' steps are batched by `serve.batch`."""

    def __init__(self, model_dir: str, engine: str = "auto"):
        import json
        from pathlib import Path

        from mote_ray.mote.fast import load_fast_engine
        from mote_ray.mote.routing import stage_token_ids

        self.engine = load_fast_engine(model_dir, engine=engine)
        self.tok = self.engine.tokenizer
        self.stage_ids = stage_token_ids(self.tok)
        meta = json.loads((Path(model_dir) / "mote" / "mote_config.json").read_text())
        self.prompt_expert = meta["mote"].get("inference_prompt_expert", "answer")
        log.info("FastExpert engine: %s (%s)", self.engine.name, self.engine.choice_reason)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _step(self, requests: list) -> list:
        # Off the event loop, so health checks and new requests are accepted while it runs.
        return await asyncio.to_thread(self.engine.generate, requests)

    async def _run(self, ids, mode, limits, temperature, seed, on_stage=None):
        from mote_ray.mote.fast import chain

        steps = chain(ids, self.stage_ids, self.tok.eos_token_id, mode=mode, limits=limits, temperature=temperature,
                      seed=seed, prompt_expert=self.prompt_expert)
        request, rid = next(steps), uuid.uuid4().hex
        while True:
            res = await self._step(request.model_copy(update={"id": rid}))
            if on_stage and request.sampling.stop_token_ids:  # a stage's text, not a stage choice
                await on_stage(request.adapter, res.text)
            try:
                request = steps.send(res)
            except StopIteration as stop:
                return stop.value

    async def generate(self, ids: list[int], mode: str, limits: dict, temperature: float, seed: int | None) -> dict:
        t0 = time.perf_counter()
        return _result(await self._run(ids, mode, limits, temperature, seed), ids, t0)

    async def stream(self, ids: list[int], mode: str, limits: dict, temperature: float, seed: int | None):
        """Stage by stage: {"stage", "delta"} as each stage completes, then {"done": result}."""
        q: asyncio.Queue = asyncio.Queue()

        async def on_stage(stage, text):
            if text:
                await q.put({"stage": stage, "delta": text})

        async def run():
            try:
                await q.put({"done": _result(await self._run(ids, mode, limits, temperature, seed, on_stage), ids)})
            except Exception as e:
                await q.put({"error": f"{type(e).__name__}: {e}"})

        task = asyncio.create_task(run())
        while True:
            item = await q.get()
            yield item
            if "done" in item or "error" in item:
                await task
                return


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
