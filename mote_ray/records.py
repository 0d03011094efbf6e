"""Request/response records shared by every engine; each maps 1:1 to a Ray Data row.

Both engines take and return exactly these types, so a pipeline can switch engines by a
string. Validation happens here, once, with the offending value in the error.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


def request_seed(seed: int | None, key: str) -> int | None:
    """A request's own seed, from the run's seed and the request's key (prompt id, stage, attempt): the
    same request samples the same tokens in every run, and two prompts never share a random stream
    (one seed on every request would make all rows of a batch draw the same numbers)."""
    if seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") >> 1


class SamplingParams(BaseModel):
    """Per-request sampling; `temperature == 0` means greedy in both engines."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_tokens: int = Field(64, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation stops before the first of these strings
    # Token-level controls (the MoTE fast path steers stage tokens with them).
    stop_token_ids: tuple[int, ...] = ()  # ends generation like EOS; reported in `stop_token_id`
    allowed_token_ids: tuple[int, ...] | None = None  # only these may be sampled
    banned_token_ids: tuple[int, ...] = ()  # never sampled

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GenerationRequest(BaseModel):
    """One prompt: chat `messages` (templated), a raw `prompt` (used verbatim) or `prompt_ids` (token ids)."""

    model_config = ConfigDict(extra="forbid")
    id: str = ""
    messages: list[Message] | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    sampling: SamplingParams = SamplingParams()
    adapter: str | None = None  # a name given to Engine.load_adapter; None = base model
    # Continue an assistant turn instead of opening a new one (AlignCoT stages append to it).
    continue_final: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> GenerationRequest:
        if sum(x is not None for x in (self.messages, self.prompt, self.prompt_ids)) != 1:
            raise ValueError("give exactly one of `messages`, `prompt` or `prompt_ids`")
        if self.messages is not None and not self.messages:
            raise ValueError("`messages` is empty")
        return self


class GenerationResult(BaseModel):
    id: str
    text: str
    token_ids: list[int]  # generated ids, the closing EOS excluded
    prompt_tokens: int
    completion_tokens: int  # generated tokens, the closing EOS included
    finish_reason: Literal["stop", "length"]
    stop_token_id: int | None = None  # which of EOS / `stop_token_ids` ended it, if one did
    engine: str
    model: str
    adapter: str | None = None
