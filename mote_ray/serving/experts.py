"""Expert deployments: the replicas that run MoTE chains (the router in deployments.py calls them).

ExactExpert is the exact token-routed model (every token read by its own stage expert). On vLLM
(`--engine auto` where it can load the model) it runs the MoTE model class on `AsyncLLM`:
concurrent requests' stages are continuously batched, each stage's tokens stream as they come, and
a request that is cancelled (client gone, timeout) aborts its engine request at once. Elsewhere it
runs the batched transformers reference: concurrent requests' stage requests are batched by
`serve.batch` (no lock, no batch of one) and stream a stage at a time.
LoraExpert is the old inexact multi-LoRA path (`--path lora`), for comparison.
Both drive the one chain driver (mote/chain.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

log = logging.getLogger("ray.serve")


class _ChainServer:
    """What both expert deployments do with a request: build its chain, drive it, stream it."""

    def _setup(self, model_dir: str, max_len: int) -> None:
        from mote_ray.chat import load_tokenizer
        from mote_ray.models import resolve_model
        from mote_ray.mote.engine import chain_spec_for

        self.tok = load_tokenizer(resolve_model(f"{model_dir}/base"))
        self.spec = chain_spec_for(model_dir, self.tok, max_len)
        self.specials = {t for pair in self.spec.stage_ids.values() for t in pair}

    def _chain(self, ids, mode, limits, temperature, seed, sampling):
        from mote_ray.mote.chain import chain

        s = dict(sampling or {})
        unknown = set(s) - {"max_tokens", "top_p", "stop", "presence_penalty", "frequency_penalty"}
        if unknown:
            raise ValueError(f"unsupported sampling keys {sorted(unknown)}")
        return chain(self.spec, ids, self.decode, mode=mode, limits=limits, temperature=temperature, seed=seed,
                     max_tokens=s.get("max_tokens"), top_p=s.get("top_p", 1.0), stop=tuple(s.get("stop") or ()),
                     presence_penalty=s.get("presence_penalty", 0.0), frequency_penalty=s.get("frequency_penalty", 0.0))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    async def _stage(self, req, on_tokens):
        """One stage request on a batch engine (`engine.run`): concurrent chains' stage requests are
        batched together; a stage's tokens reach `on_tokens` when its batch is done."""
        res = await self._batched(req)
        if on_tokens is not None and res.token_ids:
            await on_tokens(list(res.token_ids))
        return res

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, requests: list) -> list:
        # Off the event loop, so health checks and new requests are accepted while a batch runs.
        return await asyncio.to_thread(self.engine.run, requests)

    async def _run(self, steps, on_text=None, stop=()):
        """Drive a chain; `on_text(stage, delta)` gets each stage's text as it grows. With `stop`
        strings the answer's engine request ends as soon as one appears (the chain cuts the text)."""
        from mote_ray.mote.chain import _first_stop, drive

        hold = max((len(s) - 1 for s in stop), default=0)

        async def run(req):
            if req.is_choice or (on_text is None and not (stop and req.stage == "answer")):
                return await self._stage(req, None)
            shown, toks = "", []

            async def on_tokens(new) -> bool:
                nonlocal shown
                toks.extend(new)
                text, hit = self.decode(toks), False
                text = text.rstrip("\ufffd")  # a character still incomplete in bytes: wait for its next token
                if req.stage == "answer" and stop:
                    cut = _first_stop(text, stop)
                    if cut is not None:
                        text, hit = text[:cut], True
                    else:  # a stop string may be forming at the end: hold that tail back
                        text = text[:max(len(shown), len(text) - hold)]
                if on_text is not None and len(text) > len(shown):
                    await on_text(req.stage, text[len(shown):])
                    shown = text
                return hit

            res = await self._stage(req, on_tokens)
            final = self.decode(res.token_ids)
            if req.stage == "answer" and stop and (cut := _first_stop(final, stop)) is not None:
                final = final[:cut]
            if on_text is not None and len(final) > len(shown) and final.startswith(shown):
                await on_text(req.stage, final[len(shown):])
            return res

        return await drive(run, steps)

    async def generate(self, ids: list[int], mode: str, limits: dict, temperature: float, seed: int | None,
                       sampling: dict | None = None) -> dict:
        t0 = time.perf_counter()
        stop = tuple((sampling or {}).get("stop") or ())  # as in streams: the answer's request ends at a stop string
        return _result(await self._run(self._chain(ids, mode, limits, temperature, seed, sampling), stop=stop), ids, t0,
                       self.name)

    async def stream(self, ids: list[int], mode: str, limits: dict, temperature: float, seed: int | None,
                     sampling: dict | None = None):
        """Yields {"stage", "delta"} as each stage's text grows, then {"done": result} (or {"error"})."""
        q: asyncio.Queue = asyncio.Queue()
        steps = self._chain(ids, mode, limits, temperature, seed, sampling)
        stop = tuple((sampling or {}).get("stop") or ())

        async def on_text(stage, delta):
            await q.put({"stage": stage, "delta": delta})

        async def run():
            try:
                await q.put({"done": _result(await self._run(steps, on_text, stop), ids, None, self.name)})
            except asyncio.CancelledError:
                raise
            except Exception as e:  # surfaced to the client as a clean error event
                await q.put({"error": f"{type(e).__name__}: {e}"})

        task = asyncio.create_task(run())
        try:
            while True:
                item = await q.get()
                yield item
                if "done" in item or "error" in item:
                    return
        finally:  # the client went away (or the router timed out): stop the chain and its engine request
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


@serve.deployment(name="ExactExpert", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32})
class ExactExpert(_ChainServer):
    def __init__(self, model_dir: str, engine: str = "auto", max_batch: int = 32, compile: bool = True):
        import json
        from pathlib import Path

        from mote_ray.mote.engine import AsyncVLLMMoTEEngine, build_with_fallback, reference_engine

        self.engine, self.name, why = build_with_fallback(model_dir, engine, lambda: AsyncVLLMMoTEEngine(model_dir, compile=compile),
                                                          lambda: reference_engine(model_dir, max_batch=max_batch))
        max_len = self.engine.max_len if self.name == "vllm" else \
            json.loads((Path(model_dir) / "base" / "config.json").read_text()).get("max_position_embeddings")
        self._setup(model_dir, max_len)
        log.info("ExactExpert engine: %s (%s; %s)", self.name, why, getattr(self.engine, "choice_reason", ""))

    async def _stage(self, req, on_tokens):
        if self.name == "vllm":  # continuous batching inside the engine
            return await self.engine.run_stage(req, on_tokens)
        return await super()._stage(req, on_tokens)

    def engine_stats(self) -> dict:
        """The engine's own count of requests it still holds (vLLM), for fault tests and readiness."""
        if self.name != "vllm":
            return {"engine": self.name, "unfinished_requests": None, "aborted_requests": None, "compiled": False}
        return {"engine": self.name, "unfinished_requests": self.engine.unfinished_requests(),
                "aborted_requests": self.engine.aborted, "compiled": self.engine.compiled}

    def check_health(self):
        if self.name == "vllm" and getattr(self.engine.llm, "errored", False):
            raise RuntimeError("the vLLM engine has died")


@serve.deployment(name="LoraExpert", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16})
class LoraExpert(_ChainServer):
    """The inexact multi-LoRA path (one folded adapter per stage on one engine), kept for comparison."""

    def __init__(self, model_dir: str, engine: str = "auto"):
        from mote_ray.mote.engine import LoraStageEngine

        self.engine = LoraStageEngine(model_dir, engine=engine)
        self.name = self.engine.name
        self._setup(model_dir, self.engine.engine.config.max_model_len)
        log.info("LoraExpert engine: %s", self.name)

    def engine_stats(self) -> dict:
        return {"engine": self.name, "unfinished_requests": None}


def _result(out, ids: list[int], t0: float | None, engine: str) -> dict:
    return {"answer": out.answer, "stages": out.stages, "stage_tokens": out.stage_tokens,
            "stage_seconds": out.stage_seconds, "finish_reason": out.finish_reason, "prompt_tokens": len(ids),
            "completion_tokens": len(out.token_ids), "token_ids": out.token_ids,
            "cached_tokens": out.cached_tokens, "requested_tokens": out.requested_tokens, "engine": engine,
            "answer_missing": "answer" not in out.stages,
            "seconds": time.perf_counter() - t0 if t0 else None}
