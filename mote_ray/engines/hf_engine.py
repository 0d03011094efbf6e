"""transformers backend: batched, left-padded `generate`, per-request sampling, PEFT adapters by name."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Sequence

from mote_ray.chat import encode, load_tokenizer
from mote_ray.config import EngineConfig
from mote_ray.engines.common import make_result, token_budgets
from mote_ray.errors import MoteError, UnsupportedModelError
from mote_ray.models import ResolvedModel
from mote_ray.records import GenerationRequest, GenerationResult, SamplingParams

log = logging.getLogger(__name__)
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class TransformersEngine:
    name = "transformers"

    def __init__(self, config: EngineConfig, resolved: ResolvedModel, *, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM

        if config.threads:
            torch.set_num_threads(config.threads)
        self.config, self.model, self.device = config, resolved, device
        self.choice_reason = ""
        self.tokenizer = load_tokenizer(resolved)
        dtype = {"auto": torch.float32 if device == "cpu" else torch.bfloat16}.get(config.dtype) or getattr(torch, config.dtype)
        kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
        try:
            # sdpa: the MoTE step-skip masks (4D boolean) need it; eager misreads them (design.md).
            self.lm = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, attn_implementation="sdpa", **kwargs)
        except (ValueError, KeyError, OSError) as e:
            raise UnsupportedModelError(f"transformers cannot load {resolved.name}: {str(e).splitlines()[0][:200]}") from None
        self.lm.to(device).eval()
        self.adapters: dict[str, str] = {}

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        if name in self.adapters:
            return
        try:
            if not self.adapters:
                self.lm = PeftModel.from_pretrained(self.lm, path, adapter_name=name).eval()
            else:
                self.lm.load_adapter(path, adapter_name=name)
        except (ValueError, OSError) as e:
            raise MoteError(f"cannot load adapter {name!r} from {path}: {str(e).splitlines()[0][:200]}") from None
        self.adapters[name] = path

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        prompt_ids = [encode(self.tokenizer, r) for r in requests]
        budgets = token_budgets(requests, prompt_ids, self.config.max_model_len)
        for r in requests:
            if r.adapter is not None and r.adapter not in self.adapters:
                raise MoteError(f"request {r.id!r} names adapter {r.adapter!r}, which is not loaded "
                                f"(loaded: {sorted(self.adapters) or 'none'})")
        # One generate() call per sampling setting; rows sorted by length to limit padding. Seeds are
        # not part of the key: each row samples from its own torch.Generator (`_RowSampler`), so a
        # request's output does not depend on which requests share its micro-batch.
        groups: dict[SamplingParams, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[r.sampling.model_copy(update={"seed": None})].append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        bs = self.config.batch_size
        for sampling, idx in groups.items():
            idx.sort(key=lambda i: len(prompt_ids[i]))
            for start in range(0, len(idx), bs):
                chunk = idx[start:start + bs]
                seeds = [requests[i].sampling.seed for i in chunk]
                outs = self._generate_chunk(sampling, seeds, [prompt_ids[i] for i in chunk],
                                            [budgets[i] for i in chunk], [requests[i].adapter for i in chunk])
                for i, gen in zip(chunk, outs):
                    results[i] = make_result(requests[i], self.tokenizer, gen, len(prompt_ids[i]), budgets[i],
                                             engine=self.name, model=self.model.name)
        return results  # type: ignore[return-value]

    def _generate_chunk(self, sampling: SamplingParams, seeds: list[int | None], ids: list[list[int]],
                        budgets: list[int], adapters: list[str | None]) -> list[list[int]]:
        import torch

        tok = self.tokenizer
        batch = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(self.device)
        eos = [t for t in (tok.eos_token_id, *sampling.stop_token_ids) if t is not None]
        kwargs = dict(max_new_tokens=max(budgets), pad_token_id=tok.pad_token_id, eos_token_id=eos)
        processors = []
        if sampling.allowed_token_ids is not None or sampling.banned_token_ids:
            processors.append(_TokenMask(sampling.allowed_token_ids, sampling.banned_token_ids))
        if not sampling.greedy:
            # Sampling happens in our last processor, row by row with each row's generator; it leaves
            # one token per row, which generate()'s greedy step then takes.
            processors.append(_RowSampler(sampling, seeds, self.device))
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if processors:
            kwargs["logits_processor"] = processors
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=tok)
        if self.adapters:
            kwargs["adapter_names"] = [a or BASE_ADAPTER for a in adapters]
        with torch.inference_mode():
            out = self.lm.generate(**batch, **kwargs)
        gen = out[:, batch["input_ids"].shape[1]:].tolist()
        pad = tok.pad_token_id
        if pad != tok.eos_token_id:  # finished rows are filled with pad after their EOS/stop
            gen = [_rstrip(g, pad) for g in gen]
        return gen

    def close(self) -> None:
        self.lm = None


class _TokenMask:
    """A transformers logits processor: keep only `allowed` ids (if given), drop `banned` ones."""

    def __init__(self, allowed, banned):
        self.allowed, self.banned = allowed, list(banned)

    def __call__(self, input_ids, scores):
        if self.allowed is not None:
            keep = scores.new_full(scores.shape[-1:], float("-inf"))
            keep[list(self.allowed)] = 0
            scores = scores + keep
        if self.banned:
            scores[:, self.banned] = float("-inf")
        return scores


class _RowSampler:
    """Temperature / top-k / top-p sampling with one torch.Generator per row (seeded by that request's
    seed, or from the global RNG when it has none). Returns scores that keep only the sampled token,
    so generate()'s greedy step emits exactly it. A finished row keeps drawing, but only its own
    generator, so no row's draws depend on another's."""

    def __init__(self, sampling: SamplingParams, seeds: list[int | None], device: str):
        import torch

        self.sampling = sampling
        self.generators = []
        for seed in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
            self.generators.append(g)

    def __call__(self, input_ids, scores):
        import torch

        s = self.sampling
        scores = scores.float() / s.temperature
        if s.top_k:
            kth = torch.topk(scores, min(s.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop = cum - sorted_scores.softmax(-1) >= s.top_p  # keep the smallest prefix reaching top_p
            scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = scores.softmax(-1)
        picks = torch.stack([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, picks, 0.0)


def _rstrip(ids: list[int], value: int) -> list[int]:
    end = len(ids)
    while end and ids[end - 1] == value:
        end -= 1
    return ids[:end]
