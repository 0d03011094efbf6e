"""MoTE engines: what runs a chain's `StageRequest`s (mote/chain.py), chosen by one function.

  vllm          the MoTE model inside vLLM (mote/vllm_model.py): exact, continuously batched,
                prefix-cached; `LLM` offline (eval, chat, benchmarks), `AsyncLLM` for serving
  transformers  the batched reference (mote/reference.py): the oracle, and the fallback
  lora          the old multi-LoRA path: one folded adapter per stage, each stage re-reads the whole
                prefix with its own adapter — inexact (measured in benchmarks/serving.py), kept
                for comparison and for engines without the plugin

`open_mote_engine(model_dir, engine="auto")` picks vLLM when it can load the model here, else the
reference, and says why.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Awaitable, Callable

from mote_ray.errors import MoteError
from mote_ray.mote.chain import ChainSpec, StageRequest, StageResult

OnTokens = Callable[[list[int]], Awaitable[bool]]  # True: end the request here


def mote_meta(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "mote" / "mote_config.json"
    if not path.is_file():
        raise MoteError(f"{model_dir} is not a `mote-ray train --method mote` output (no mote/mote_config.json)")
    return json.loads(path.read_text())


def _to_vllm(req: StageRequest, V: int, per_request_seed: bool, max_len: int, stream: bool = False):
    """(TokensPrompt, SamplingParams) for one stage request: every id tagged with its expert.
    `stream`: deltas per step (else only the final output: no per-step copies of the whole text)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    prompt = TokensPrompt(prompt_token_ids=[t + e * V for t, e in zip(req.tokens, req.experts)])
    # ignore_eos: only our expert-tagged stop ids end a stage (vLLM's own EOS check sees untagged ids).
    kw = dict(max_tokens=max(1, min(req.max_tokens, max_len - len(req.tokens))), temperature=req.temperature,
              ignore_eos=True,
              top_p=req.top_p, seed=req.seed if per_request_seed else None, detokenize=False,
              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
              output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
    if req.is_choice:  # each start token in its own expert's copy: the pick is already tagged
        kw["allowed_token_ids"] = [t + e * V for t, e in req.choices]
    else:
        kw["stop_token_ids"] = [t + req.expert * V for t in req.stop_ids]
        kw["extra_args"] = {"mote_expert": req.expert, "mote_banned": list(req.banned)}
    return prompt, SamplingParams(**kw)


def _from_vllm(req: StageRequest, out, V: int, cached: int) -> StageResult:
    ids = [t % V for t in out.token_ids]
    res = StageResult(token_ids=ids, finish_reason="length", cached_tokens=cached or 0)
    if ids and not req.is_choice and ids[-1] in req.stop_ids:
        res.stop_token, res.token_ids, res.finish_reason = ids[-1], ids[:-1], "stop"
    elif getattr(out, "finish_reason", None) == "stop" and not req.is_choice:
        raise RuntimeError(f"vLLM stopped a stage on {out.token_ids[-1:]} , which is none of its stop ids {req.stop_ids}")
    return res


class _Output:
    def __init__(self, token_ids, finish_reason=None):
        self.token_ids, self.finish_reason = token_ids, finish_reason


def _engine_kwargs(vllm_dir: Path, max_model_len: int | None, gpu_memory_utilization: float | None,
                   dtype: str | None = None, compile: bool = False) -> dict:
    """`compile` (CPU): vLLM's torch.compile mode for CPU (trace once, inductor C++ kernels) instead of
    eager: it removes the per-op Python overhead that dominates a small model's decode step, for more
    start-up on first use (cached in ~/.cache/vllm). On GPU the model runs eager (CUDA graphs are
    untested with the MoTE hooks here)."""
    from mote_ray.engines.vllm_engine import CPU_EXECUTOR, cpu_kv_cache_bytes
    from mote_ray.mote.vllm_model import MoTELogitsProcessor, register

    register()  # in this process too (the entry point covers vLLM's own processes)
    on_cpu = _device() == "cpu"
    cfg = json.loads((vllm_dir / "config.json").read_text())
    max_len = max_model_len or int(cfg.get("max_position_embeddings", 2048))
    # generation_config="vllm": no sampling defaults or extra EOS ids from the model's generation config.
    kwargs = dict(model=str(vllm_dir), skip_tokenizer_init=True, dtype=dtype or ("float32" if on_cpu else "auto"),
                  max_model_len=max_len, enforce_eager=not (compile and on_cpu),
                  enable_prefix_caching=True, generation_config="vllm",
                  logits_processors=[MoTELogitsProcessor], seed=0)
    if on_cpu and gpu_memory_utilization is None:
        kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(cfg, max_len)  # host memory, sized to the model
        # The CPU default block is 128 tokens; the prefix cache reuses whole blocks only, so a chain's
        # stages (tens of tokens each) would share nothing. 32 is the CPU kernels' granularity.
        kwargs["block_size"] = 32
        kwargs["distributed_executor_backend"] = CPU_EXECUTOR  # no spinning worker process (engines/vllm_engine.py)
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization or 0.9
    return kwargs


def _no_cpp_compiler() -> str | None:
    """Why torch.compile cannot build its CPU kernels here (no C++ compiler), or None."""
    import shutil

    cxx = os.environ.get("CXX") or "c++"
    return None if shutil.which(cxx) or shutil.which("g++") else f"no C++ compiler ({cxx}) for torch.compile"


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class VLLMMoTEEngine:
    """Offline: `run` takes a list of stage requests and returns their results (one `LLM.generate`)."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, *, max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None, dtype: str | None = None):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        from mote_ray.engines.vllm_engine import in_process_core
        from mote_ray.mote.vllm_dir import ensure_vllm_dir

        kwargs = _engine_kwargs(ensure_vllm_dir(model_dir), max_model_len, gpu_memory_utilization, dtype)
        self.V = json.loads((Path(kwargs["model"]) / "config.json").read_text())["mote"]["base_vocab_size"]
        self.max_len, self.per_request_seed = kwargs["max_model_len"], _device() != "cpu"
        with in_process_core(_device() == "cpu") as self.core_here:
            self.llm = LLM(**kwargs)
        self.choice_reason = "vLLM MoTE model (exact, token-routed experts)"

    def run(self, requests: list[StageRequest]) -> list[StageResult]:
        if not requests:
            return []
        pairs = [_to_vllm(r, self.V, self.per_request_seed, self.max_len) for r in requests]
        outs = self.llm.generate([p for p, _ in pairs], [s for _, s in pairs], use_tqdm=False)
        return [_from_vllm(r, o.outputs[0], self.V, o.num_cached_tokens) for r, o in zip(requests, outs)]

    def close(self) -> None:
        from mote_ray.engines.vllm_engine import shutdown_llm

        llm, self.llm = self.llm, None
        shutdown_llm(llm, self.core_here)


class AsyncVLLMMoTEEngine:
    """Serving: vLLM's `AsyncLLM`; concurrent stage requests are continuously batched, each token
    streamed as it comes, and a cancelled `run_stage` aborts its engine request (vLLM aborts a
    request whose `generate` iterator is cancelled)."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, *, max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None, compile: bool = True):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from mote_ray.mote.vllm_dir import ensure_vllm_dir

        kwargs = _engine_kwargs(ensure_vllm_dir(model_dir), max_model_len, gpu_memory_utilization, compile=compile)
        self.V = json.loads((Path(kwargs["model"]) / "config.json").read_text())["mote"]["base_vocab_size"]
        self.max_len, self.per_request_seed = kwargs["max_model_len"], _device() != "cpu"
        self.choice_reason = "vLLM MoTE model on AsyncLLM (exact, continuous batching)"
        if not kwargs["enforce_eager"] and (missing := _no_cpp_compiler()):
            # Inductor compiles C++ kernels: without a toolchain the same model runs eager (slower
            # steps, same tokens) rather than failing; said in the log and in engine_stats. Any other
            # start-up error is raised as it is.
            kwargs["enforce_eager"] = True
            self.choice_reason += f", eager ({missing})"
            logging.getLogger("ray.serve").warning("vLLM MoTE model: %s; running eager", missing)
        self.compiled = not kwargs["enforce_eager"]
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self._ids, self.aborted = 0, 0

    async def run_stage(self, req: StageRequest, on_tokens: OnTokens | None = None) -> StageResult:
        """Run one stage request; `on_tokens(new_ids)` sees its tokens as they come and may return
        True to end it there (a stop string). Cancelled or failed: the engine request is aborted."""
        stream = on_tokens is not None and not req.is_choice
        prompt, params = _to_vllm(req, self.V, self.per_request_seed, self.max_len, stream)
        self._ids += 1
        rid = f"mote-{os.getpid()}-{self._ids}"
        ids, cached, stopped, final = [], 0, False, None
        try:
            async for out in self.llm.generate(prompt, params, request_id=rid):
                final, cached = out.outputs[0], out.num_cached_tokens or cached
                ids += final.token_ids  # a delta when streaming, else the one final output
                if stream:
                    new = [t % self.V for t in final.token_ids]
                    new = [t for t in new if t not in req.stop_ids]
                    if new and await on_tokens(new):
                        stopped = True
                        break
        except BaseException as e:  # cancelled (client gone, timeout) or failed: free the engine at once
            self.aborted += isinstance(e, (asyncio.CancelledError, GeneratorExit))
            await self.llm.abort(rid)
            raise
        if stopped:
            await self.llm.abort(rid)
        res = _from_vllm(req, _Output(ids, None if stopped or final is None else final.finish_reason), self.V, cached)
        if stopped:
            res.finish_reason = "stop"
        return res

    def unfinished_requests(self) -> int:
        """Requests the engine client still tracks (AsyncLLM's own count; an abort also reaches the
        engine core's scheduler). Tests assert 0 after a disconnect or a timeout."""
        return self.llm.output_processor.get_num_unfinished_requests()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.shutdown()


class LoraStageEngine:
    """The inexact multi-LoRA path: each stage request as a plain request on the folded adapter of
    the expert that reads its new tokens (the whole prefix re-read by that adapter)."""

    def __init__(self, model_dir: str | Path, engine: str = "auto"):
        from mote_ray.mote.fast import load_fast_engine

        self.engine = load_fast_engine(model_dir, engine=engine)
        self.name, self.choice_reason = f"lora/{self.engine.name}", "multi-LoRA (inexact: prefix re-read by the stage's adapter)"

    def run(self, requests: list[StageRequest]) -> list[StageResult]:
        from mote_ray.mote.routing import EXPERTS
        from mote_ray.records import GenerationRequest, SamplingParams

        greqs = []
        if any(r.presence_penalty or r.frequency_penalty for r in requests):
            raise ValueError("presence/frequency penalties are not supported on the lora path; use --path exact")
        for i, r in enumerate(requests):
            expert = r.experts[-1] if r.is_choice else r.expert  # who reads the next token
            sp = SamplingParams(max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p, seed=r.seed,
                                stop_token_ids=r.stop_ids, banned_token_ids=r.banned,
                                allowed_token_ids=tuple(t for t, _ in r.choices) or None)
            greqs.append(GenerationRequest(id=str(i), prompt_ids=list(r.tokens), adapter=EXPERTS[expert], sampling=sp))
        out = []
        for r, g in zip(requests, self.engine.generate(greqs)):
            res = StageResult(token_ids=list(g.token_ids), finish_reason=g.finish_reason, stop_token=g.stop_token_id)
            if res.stop_token is not None and res.token_ids and res.token_ids[-1] == res.stop_token:
                res.token_ids = res.token_ids[:-1]
            out.append(res)
        return out

    def close(self) -> None:
        self.engine.close()


def reference_engine(model_dir: str | Path, max_batch: int = 32):
    from mote_ray.mote.export import load_mote
    from mote_ray.mote.reference import ReferenceEngine

    model, tok = load_mote(model_dir, device=_device())
    return ReferenceEngine(model, tok, max_batch=max_batch)


def chain_spec_for(model_dir: str | Path, tokenizer, max_len: int | None = None) -> ChainSpec:
    from mote_ray.mote.routing import stage_token_ids

    meta = mote_meta(model_dir)
    return ChainSpec(stage_token_ids(tokenizer), tokenizer.eos_token_id,
                     meta["mote"].get("inference_prompt_expert", "answer"), max_len)


def vllm_unavailable_reason(model_dir: str | Path) -> str | None:
    """Why the vLLM MoTE engine cannot run this model here, or None if it can."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    cfg = json.loads((Path(model_dir) / "base" / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if _device() == "cpu" and head_dim < 32:
        return f"vLLM's CPU attention needs head_dim >= 32 (this model: {head_dim})"
    if mote_meta(model_dir)["mote"].get("n_experts", 3) != 3:
        return "not a 3-expert MoTE model (a plain-LoRA baseline)"
    return None


def build_with_fallback(model_dir: str | Path, engine: str, make_vllm, make_reference):
    """(engine object, "vllm" | "transformers", why): vLLM where it can run here, else the reference —
    also when vLLM fails to build the model under `auto` (the reason is kept)."""
    choice, why = pick_engine(model_dir, engine)
    if choice == "vllm":
        try:
            return make_vllm(), "vllm", why
        except Exception as e:
            if engine == "vllm":
                raise
            why = f"reference engine: vLLM could not build the MoTE model ({type(e).__name__}: {str(e)[:200]})"
    return make_reference(), "transformers", why


def pick_engine(model_dir: str | Path, engine: str = "auto") -> tuple[str, str]:
    """("vllm" | "transformers", why) for `--engine auto|vllm|transformers`."""
    if engine not in ("auto", "vllm", "transformers"):
        raise MoteError(f"engine must be auto, vllm or transformers, got {engine!r}")
    if engine == "transformers":
        return "transformers", "asked for the transformers reference"
    why = vllm_unavailable_reason(model_dir)
    if why is None:
        return "vllm", "vLLM can load the MoTE model here"
    if engine == "vllm":
        raise MoteError(f"--engine vllm: {why}")
    return "transformers", f"reference engine: {why}"
