"""OpenAI-compatible request/response shapes, validation, errors and auth (no Ray, no model: unit-testable).

The contract: every OpenAI chat-completions field is either honoured or refused with a 400 naming it —
never silently dropped. A field at its "feature off" value (`n: 1`, `logprobs: false`, `tools: []`,
`response_format: {"type": "text"}`, ...) is accepted, since it asks for nothing we do not do.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator,
                      model_validator)

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt the context admits, small enough to parse cheaply
MAX_MESSAGES = 1024
MAX_STOP = 4
MIN_TOP_P = 1e-9  # what top_p 0 is sent to the engines as (see ChatRequest.sampling)
MAX_TOKENS_CAP = 1 << 16  # schema bound; the real bound is the model's context, checked with the prompt


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers or {}

    def body(self) -> dict:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _off(value: Any, *allowed: Any) -> bool:
    return value is None or any(value == a for a in allowed)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | list[dict] | None = None
    name: str | None = Field(None, max_length=256)  # a participant label; the chat template has no slot for it
    refusal: str | None = None  # an earlier assistant turn's refusal text, as clients echo it back

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in ("system", "developer", "user", "assistant"):
            raise ValueError(f"role {v!r} is not supported (system, developer, user, assistant; no tool messages)")
        return v

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if isinstance(v, list):
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"[{i}].type {kind!r} is not supported: only text parts")
                try:
                    TextPart(**part)
                except ValidationError as e:
                    raise ValueError(f"[{i}]: {e.errors()[0]['msg']}") from None
        return v

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: required for a {self.role} message")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(p["text"] for p in self.content)
        return self.content or ""


class MoteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["adaptive", "direct", "analysis", "full"] = "adaptive"
    return_stages: StrictBool = False
    stage_max_tokens: dict[Literal["analysis", "guidance", "answer"], StrictInt] = Field(default_factory=dict)
    # "completion" (OpenAI's meaning): max_tokens bounds every generated token, reasoning stages included.
    # "answer": max_tokens bounds the answer stage only (the stages keep their own budgets).
    max_tokens_scope: Literal["completion", "answer"] = "completion"

    @field_validator("stage_max_tokens")
    @classmethod
    def _bounded(cls, v: dict) -> dict:
        for stage, n in v.items():
            if not 1 <= n <= MAX_TOKENS_CAP:
                raise ValueError(f"{stage}: must be between 1 and {MAX_TOKENS_CAP}, got {n}")
        return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = None  # a final chunk with `usage` and no choices
    include_obfuscation: StrictBool | None = None  # we never pad chunks, so both values are honoured


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    # Strict: JSON true is not 1, "5" is not 5 (OpenAI refuses both).
    max_tokens: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=-(1 << 63), lt=1 << 63)
    stop: str | list[str] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    # Informational, honoured as such: they identify the caller or a cache hint and change no output.
    user: str | None = Field(None, max_length=512)
    safety_identifier: str | None = Field(None, max_length=512)
    prompt_cache_key: str | None = Field(None, max_length=512)
    # Accepted only at their "feature off" value (checked in _unsupported).
    n: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Any = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None
    moderation: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    mote: MoteOptions = MoteOptions()

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(not s or len(s) > 256 for s in stops):
            raise ValueError("each stop sequence must have 1 to 256 characters")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        checks = {
            "n": _off(self.n, 1), "logprobs": _off(self.logprobs, False), "top_logprobs": _off(self.top_logprobs),
            "logit_bias": _off(self.logit_bias, {}), "tools": _off(self.tools, []), "tool_choice": _off(self.tool_choice, "none"),
            "parallel_tool_calls": _off(self.parallel_tool_calls), "functions": _off(self.functions, []),
            "function_call": _off(self.function_call, "none"), "response_format": _off(self.response_format, {"type": "text"}),
            "modalities": _off(self.modalities, ["text"]), "audio": _off(self.audio), "prediction": _off(self.prediction),
            "web_search_options": _off(self.web_search_options), "reasoning_effort": _off(self.reasoning_effort),
            "verbosity": _off(self.verbosity), "service_tier": _off(self.service_tier, "auto", "default"),
            "store": _off(self.store, False), "metadata": _off(self.metadata, {}), "moderation": _off(self.moderation),
            "prompt_cache_retention": _off(self.prompt_cache_retention),
            "prompt_cache_options": _off(self.prompt_cache_options),
        }
        for name, ok in checks.items():
            if not ok:
                raise ApiError(400, f"{name}: not supported by this server (value {_short(getattr(self, name))})",
                               "unsupported_parameter", param=name)
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options: only allowed when stream is true", "invalid_request", "stream_options")
        if self.messages[-1].role != "user":
            raise ApiError(400, "messages: the last message must be from the user", "invalid_request", "messages")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, total_tokens: int) -> dict:
        """The `sampling` dict the expert deployments take (see experts.generate)."""
        # top_p 0 (OpenAI allows it) is a nucleus of just the most likely token; vLLM refuses 0 and a nucleus of
        # mass 0 would hold no token at all, so it goes to the engines as the smallest positive mass (same nucleus).
        top_p = 1.0 if self.top_p is None else max(self.top_p, MIN_TOP_P)
        return {"max_tokens": total_tokens, "top_p": top_p, "stop": self.stops,
                "presence_penalty": self.presence_penalty or 0.0, "frequency_penalty": self.frequency_penalty or 0.0}


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_request(raw: bytes, served_model: str) -> ChatRequest:
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body has {len(raw)} bytes; the limit is {MAX_BODY_BYTES}", "body_too_large")
    try:  # NaN/Infinity, invalid UTF-8, 5000-digit ints and 100k-deep nesting are all client errors
        data = json.loads(raw or b"", parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON: {str(e)[:200]}", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_json")
    try:
        req = ChatRequest(**data)
    except ApiError:
        raise
    except ValidationError as e:
        err = e.errors()[0]
        if isinstance(err.get("ctx", {}).get("error"), ApiError):
            raise err["ctx"]["error"] from None
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and x in _UNION_TAGS)]
        where = ".".join(loc) or "body"
        msg = "unknown field: not part of the OpenAI API nor of this server's `mote` options" \
            if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{where}: {msg}", "unsupported_parameter" if err["type"] == "extra_forbidden"
                       else "invalid_request", param=where) from None
    for i, m in enumerate(req.messages):
        try:
            m.text().encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"messages.{i}.content: not valid Unicode (lone surrogate)", "invalid_request",
                           param=f"messages.{i}.content") from None
    for s in req.stops:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "stop: not valid Unicode (lone surrogate)", "invalid_request", "stop") from None
    if req.model != served_model:
        raise ApiError(404, f"model {req.model!r} is not served here; this server has {served_model!r}",
                       "model_not_found", param="model")
    return req


_UNION_TAGS = {"str", "list[str]", "list[dict[any,any]]", "none", "int", "float", "bool", "StreamOptions",
               "function-after[_content(), union[str,list[dict[any,any]],none]]"}


def messages_for_template(req: ChatRequest) -> list[dict]:
    # `developer` is OpenAI's newer name for `system`.
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]


# --- auth -------------------------------------------------------------------------------------------

def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The sha256 digests of the accepted bearer keys: one from an env var and/or one per line of a
    file, re-read when the file changes (rotation without a restart). Keys themselves are never kept."""

    def __init__(self, digests: list[str] | None = None, keys_file: str | None = None):
        self.fixed = list(digests or [])
        self.keys_file, self._mtime, self._from_file = keys_file, None, []
        if keys_file:
            self._reload()
            if not self._from_file:
                raise ValueError(f"api keys file {keys_file} has no keys")

    @property
    def enabled(self) -> bool:
        return bool(self.fixed or self.keys_file)

    def _reload(self) -> None:
        path = Path(self.keys_file)
        mtime = path.stat().st_mtime_ns
        if mtime != self._mtime:
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            self._from_file = [key_digest(ln) for ln in lines if ln and not ln.startswith("#")]
            self._mtime = mtime

    def digests(self) -> list[str]:
        if self.keys_file:
            try:
                self._reload()
            except OSError:  # file briefly missing during a rotation: keep the last good set
                pass
        return self.fixed + self._from_file

    def check(self, header: str | None) -> None:
        check_auth(header, self.digests() if self.enabled else None)


def check_auth(header: str | None, digests: str | list[str] | None) -> None:
    """Bearer-token auth against sha256 digests, compared in constant time against every one."""
    if digests is None:
        return
    digests = [digests] if isinstance(digests, str) else digests
    header = header or ""
    token = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
    given = key_digest(token)
    ok = False
    for d in digests:  # no early exit: timing does not tell which key (or whether any) matched
        ok |= hmac.compare_digest(given, d)
    if not token or not ok:
        raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", "invalid_api_key")


# --- responses ----------------------------------------------------------------------------------------

def completion(req: ChatRequest, result: dict) -> dict:
    """A chat.completion object; stages go in an extra `mote` field when asked for (or when no answer came)."""
    body = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
        "model": req.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result["answer"], "refusal": None},
                     "logprobs": None, "finish_reason": result["finish_reason"]}],
        "usage": usage(result),
    }
    if extra := mote_field(req, result):
        body["mote"] = extra
    return body


def usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}


def mote_field(req: ChatRequest, result: dict) -> dict | None:
    """Stages when asked for; `no_answer` whenever the chain ended (EOS or max_tokens) before an answer."""
    out: dict = {}
    if "answer" not in result["stages"]:
        out["no_answer"] = True
    if req.mote.return_stages:
        out.update({"mode": req.mote.mode, "stages": result["stages"], "stages_used": list(result["stages"]),
                    "stage_tokens": result["stage_tokens"], "token_ids": result.get("token_ids", []),
                    "expert_seconds": result.get("seconds"), "engine": result.get("engine"),
                    # prompt tokens of the chain's stage requests, and how many the prefix cache served
                    "prompt_cache": {"requested_tokens": result.get("requested_tokens", 0),
                                     "cached_tokens": result.get("cached_tokens", 0)}})
    return out or None


def chunk(req: ChatRequest, cid: str, created: int, delta: dict | None, finish: str | None = None,
          extra: dict | None = None) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
            "choices": choices, **(extra or {})}
    return f"data: {json.dumps(body)}\n\n"


def error_event(status: int, message: str, code: str) -> str:
    return f"data: {json.dumps(ApiError(status, message, code).body())}\n\n"


def stop_safe_len(text: str, stops: list[str]) -> int:
    """How much of streamed `text` can be sent without risking a stop sequence that a later token completes."""
    if not stops:
        return len(text)
    hold = 0
    for s in stops:
        if s in text:
            return text.index(s)
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold



def request_schema() -> dict:
    """ChatRequest's JSON schema with its $defs inlined, for the app's OpenAPI document (and schemathesis)."""
    schema = ChatRequest.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)
