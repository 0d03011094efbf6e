"""Expert deployments: the replicas that run MoTE chains (the router in deployments.py calls them).

ExactExpert holds the token-routed MoTE model (mote/generate.py): every stage of a request runs in
one replica with one KV cache, each token through its own expert — the exact path. FastExpert holds
one engine (vLLM when it can run the model, else transformers) with the per-stage adapters, all
stages multiplexed on it by adapter name (mote/fast.py) — the fast path.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid

from ray import serve

log = logging.getLogger("ray.serve")


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
