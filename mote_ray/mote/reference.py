"""The transformers reference MoTE engine: the oracle, and the fallback where vLLM cannot run.

It runs `StageRequest`s (mote/chain.py) in padded batches: every row's tokens go through the
experts the request names per token (prompt and earlier stages, then the stage's expert for each
generated token), with one KV cache per batch — the training forward (`MoTEModel`, expert per
token) used incrementally. Sampling per row: banned ids, stage choices, stop ids, temperature and
top-p, and a `torch.Generator` per request, so a row's output does not depend on its neighbours.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mote_ray.mote.chain import StageRequest, StageResult


class ReferenceEngine:
    name = "transformers"

    def __init__(self, model, tokenizer, *, max_batch: int = 32):
        self.model, self.tok, self.max_batch = model.eval(), tokenizer, max_batch
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.choice_reason = "transformers reference (exact, batched)"

    def run(self, requests: Sequence[StageRequest]) -> list[StageResult]:
        out: list[StageResult] = []
        for i in range(0, len(requests), self.max_batch):
            out += self._batch(list(requests[i:i + self.max_batch]))
        return out

    @torch.inference_mode()
    def logits(self, tokens: Sequence[int], experts: Sequence[int]) -> torch.Tensor:
        """(seq, vocab) logits of one sequence, read token by token with the KV cache (the oracle test)."""
        rows, past = [], None
        for t, e in zip(tokens, experts):
            res = self.model(torch.tensor([[t]], device=self.device), torch.tensor([[e]], device=self.device),
                             past_key_values=past, use_cache=True)
            rows.append(res.logits[0, -1].float())
            past = res.past_key_values
        return torch.stack(rows)

    @torch.inference_mode()
    def _batch(self, reqs: list[StageRequest]) -> list[StageResult]:
        from transformers import DynamicCache

        b, t = len(reqs), max(len(r.tokens) for r in reqs)
        ids = torch.full((b, t), self.pad, dtype=torch.long)
        experts = torch.zeros((b, t), dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding: every row's last token sits at column t-1
            n = len(r.tokens)
            ids[i, t - n:], experts[i, t - n:], mask[i, t - n:] = torch.tensor(r.tokens), torch.tensor(r.experts), 1
        ids, experts, mask = ids.to(self.device), experts.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        res = self.model(ids, experts, attention_mask=mask, position_ids=pos, past_key_values=DynamicCache(),
                         use_cache=True)
        logits, past = res.logits[:, -1].float(), res.past_key_values
        gens = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None for r in reqs]
        results = [StageResult(token_ids=[]) for _ in reqs]
        live = [True] * b
        next_pos = pos[:, -1:] + 1
        while True:
            feed = []
            for i, r in enumerate(reqs):
                if not live[i]:
                    feed.append(self.pad)
                    continue
                tok = _pick(logits[i], r, gens[i], results[i].token_ids)
                if tok in r.stop_ids:
                    results[i].stop_token, results[i].finish_reason, live[i] = tok, "stop", False
                else:
                    results[i].token_ids.append(tok)
                    if len(results[i].token_ids) >= r.max_tokens:
                        results[i].finish_reason, live[i] = "length", False
                feed.append(tok if live[i] else self.pad)
            if not any(live):
                return results
            x = torch.tensor(feed, device=self.device)[:, None]
            e = torch.tensor([r.expert if r.expert is not None else 0 for r in reqs], device=self.device)[:, None]
            mask = torch.cat([mask, torch.tensor(live, device=self.device, dtype=torch.long)[:, None]], dim=1)
            res = self.model(x, e, attention_mask=mask, position_ids=next_pos, past_key_values=past, use_cache=True)
            logits, past, next_pos = res.logits[:, -1].float(), res.past_key_values, next_pos + 1


def _pick(logits: torch.Tensor, r: StageRequest, gen: torch.Generator | None, generated: list[int]) -> int:
    logits = logits.clone()
    if generated and (r.presence_penalty or r.frequency_penalty):  # vLLM's formula, on this request's output
        counts = torch.bincount(torch.tensor(generated), minlength=logits.shape[0]).to(logits)
        logits -= r.frequency_penalty * counts + r.presence_penalty * (counts > 0).to(logits)
    if r.choices:
        keep = torch.full_like(logits, float("-inf"))
        keep[[t for t, _ in r.choices]] = 0
        logits += keep
    if r.banned:
        logits[list(r.banned)] = float("-inf")
    if r.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / r.temperature, -1)
    if r.top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_p, order = probs.sort(descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p >= r.top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))
