"""Pydantic models for the session routes (API.md), and how a session request
names its session on the OpenAI endpoints."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator

from vllm_stateful.server.errors import bad_request

SESSION_BODY_FIELDS = ("stateful", "ark_stateful")
SESSION_HEADER = "x-stateful-session"
COMMIT_BODY_FIELD = "stateful_commit"
# A read-only query's view of appends (sessions/consistency.py): every acknowledged one (default),
# what is ingested now, or that with a bound on how recent the appends it may miss are.
CONSISTENCY_FIELD = "consistency"
MAX_STALENESS_FIELD = "max_staleness_ms"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(min_length=1, max_length=64)
    content: str | list[dict[str, Any]] | None = None

    def as_template_message(self) -> dict[str, Any]:
        """The message as the chat template sees it (text parts joined).

        Raises ValueError for non-text parts (images, audio): sessions are text-only for now."""
        if isinstance(self.content, list):
            if any(not isinstance(p.get("type"), str) for p in self.content):
                raise ValueError("every content part needs a string 'type'")
            kinds = {p.get("type") for p in self.content} - {"text"}
            if kinds:
                raise ValueError(f"content parts of type {sorted(map(str, kinds))} are not supported in sessions")
            if any(not isinstance(p.get("text", ""), str) for p in self.content):
                raise ValueError("a text content part's 'text' must be a string")
        data = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            data["content"] = "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        data.setdefault("content", "")
        return data


def template_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Messages as the chat template sees them; 400 for anything a session cannot render."""
    try:
        return [ChatMessage.model_validate(m).as_template_message() for m in messages]
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise bad_request(str(exc).splitlines()[0][:300], "unsupported_in_session", "messages") from None


def check_token_ids(token_ids: list[int], max_token_id: int, param: str) -> None:
    """Out-of-vocabulary ids are a 400 before anything is acknowledged or queued."""
    bad = next(
        (t for t in token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= max_token_id), None
    )
    if bad is not None:
        raise bad_request(f"token id {bad} is out of vocabulary (0..{max_token_id})", "invalid_token_id", param)


class CreateSessionRequest(_Strict):
    id: str | None = None
    ttl_s: StrictFloat | None = Field(default=None, gt=0)  # bounds from the config are checked by the route
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: str | list[StrictInt] | None = None

    @field_validator("ttl_s")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number of seconds")
        return v

    @model_validator(mode="after")
    def _one_content(self) -> "CreateSessionRequest":
        if self.messages is not None and self.prompt is not None:
            raise ValueError("give either 'messages' or 'prompt', not both")
        if self.prompt is not None and len(self.prompt) == 0:
            raise ValueError("'prompt' must not be empty")
        return self


class AppendRequest(_Strict):
    text: str | None = None
    token_ids: list[StrictInt] | None = None
    messages: list[ChatMessage] | None = None
    wait: StrictBool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> "AppendRequest":
        given = [n for n in ("text", "token_ids", "messages") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'text', 'token_ids', 'messages'")
        if self.token_ids is not None and (not self.token_ids or min(self.token_ids) < 0):
            raise ValueError("'token_ids' must be a non-empty list of non-negative ids")
        if self.text is not None and not self.text:
            raise ValueError("'text' must not be empty")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        return self


class ForkRequest(_Strict):
    id: str | None = None
    ttl_s: StrictFloat | None = Field(default=None, gt=0)

    _finite = field_validator("ttl_s")(CreateSessionRequest._finite.__func__)  # type: ignore[attr-defined]


MAX_VERSION = 2**53  # what every JSON client can represent exactly (and SQLite stores)


class RewindRequest(_Strict):
    version: StrictInt = Field(ge=0, le=MAX_VERSION)


class MoveRequest(_Strict):
    data_parallel_rank: StrictInt = Field(ge=0, le=1 << 16)


class ExportedCheckpoint(_Strict):
    version: StrictInt = Field(ge=0, le=MAX_VERSION)
    n_tokens: StrictInt = Field(ge=0, le=MAX_VERSION)
    n_messages: StrictInt = Field(ge=0, le=MAX_VERSION)
    pending_chat_text: str = ""


class ImportRequest(BaseModel):
    """A session export (``GET /v1/sessions/{id}/export``); unknown fields are ignored, so exports
    of newer servers with extra fields import. Its ``id`` is the new session's id."""

    format: str
    id: str
    version: StrictInt = Field(ge=0, le=MAX_VERSION)
    token_ids: list[StrictInt]
    messages: list[dict[str, Any]] = Field(default_factory=list)
    pending_chat_text: str = ""
    model: str | None = None
    digest: str | None = None
    ttl_s: StrictFloat | StrictInt | None = None
    checkpoints: list[ExportedCheckpoint] = Field(default_factory=list)
