"""Pieces both engines share: prompt length limits and turning generated ids into a result."""

from __future__ import annotations

from typing import Sequence

from mote_ray.errors import MoteError
from mote_ray.records import GenerationRequest, GenerationResult


class PromptTooLongError(MoteError):
    pass


def token_budgets(requests: Sequence[GenerationRequest], prompt_ids: Sequence[list[int]],
                  max_model_len: int) -> list[int]:
    """New-token budget per request: its max_tokens, capped by the context left after its prompt."""
    too_long = [(r.id, len(p)) for r, p in zip(requests, prompt_ids) if len(p) >= max_model_len]
    if too_long:
        shown = ", ".join(f"{i or '#'}={n}" for i, n in too_long[:5])
        raise PromptTooLongError(f"{len(too_long)} prompt(s) have >= max_model_len={max_model_len} "
                                 f"tokens ({shown}); shorten them or raise max_model_len")
    return [min(r.sampling.max_tokens, max_model_len - len(p)) for r, p in zip(requests, prompt_ids)]


def make_result(request: GenerationRequest, tokenizer, generated: Sequence[int], prompt_len: int,
                budget: int, *, engine: str, model: str) -> GenerationResult:
    """Cut `generated` at EOS, a stop token or a stop string, the same way for both engines."""
    stops = {t for t in (tokenizer.eos_token_id, *request.sampling.stop_token_ids) if t is not None}
    ids = list(generated)[:budget]
    finish, n, stop_id = "length", len(ids), None
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    if cut is not None:
        ids, finish, n, stop_id = ids[:cut], "stop", cut + 1, ids[cut]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for stop in request.sampling.stop:
        pos = text.find(stop)
        if pos >= 0:
            text, finish = text[:pos], "stop"
    return GenerationResult(id=request.id, text=text, token_ids=ids, prompt_tokens=prompt_len,
                            completion_tokens=n, finish_reason=finish, stop_token_id=stop_id, engine=engine, model=model,
                            adapter=request.adapter)
