"""OpenAI-compatible request/response shapes, validation and errors (no Ray, no model: unit-testable)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def body(self) -> dict:
        kind = "authentication_error" if self.status == 401 else "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "code": self.code}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class MoteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["adaptive", "direct", "analysis", "full"] = "adaptive"
    return_stages: bool = False
    stage_max_tokens: dict[Literal["analysis", "guidance", "answer"], int] = Field(default_factory=dict)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (n, user, ...)
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int | None = None
    stream: bool = False
    mote: MoteOptions = MoteOptions()

    @property
    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse_request(raw: bytes, served_model: str) -> ChatRequest:
    try:
        data = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_json")
    try:
        req = ChatRequest(**data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "body"
        raise ApiError(422, f"{where}: {err['msg']}", "invalid_request") from None
    if req.messages[-1].role != "user":
        raise ApiError(422, "messages: the last message must be from the user", "invalid_request")
    if req.model != served_model:
        raise ApiError(404, f"model {req.model!r} is not served here; this server has {served_model!r}", "model_not_found")
    return req


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_auth(header: str | None, digest: str | None) -> None:
    """Bearer-token auth against a sha256 digest (the key itself never reaches the replicas or logs)."""
    if digest is None:
        return
    token = (header or "").removeprefix("Bearer ").strip() if (header or "").startswith("Bearer ") else ""
    if not token or not hmac.compare_digest(key_digest(token), digest):
        raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", "invalid_api_key")


def completion(req: ChatRequest, result: dict) -> dict:
    """A chat.completion object; stages go in an extra `mote` field when asked for."""
    body = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
        "model": req.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result["answer"]},
                     "finish_reason": result["finish_reason"]}],
        "usage": {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                  "total_tokens": result["prompt_tokens"] + result["completion_tokens"]},
    }
    if req.mote.return_stages:
        body["mote"] = mote_field(req, result)
    return body


def mote_field(req: ChatRequest, result: dict) -> dict:
    return {"mode": req.mote.mode, "stages": result["stages"], "stages_used": list(result["stages"]),
            "stage_tokens": result["stage_tokens"], "token_ids": result.get("token_ids", []),
            "expert_seconds": result.get("seconds")}


def chunk(req: ChatRequest, cid: str, delta: dict, finish: str | None = None, extra: dict | None = None) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": req.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **(extra or {})}
    return f"data: {json.dumps(body)}\n\n"
