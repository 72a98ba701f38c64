"""Pydantic models for the session routes (API.md), and how a session request
names its session on the OpenAI endpoints."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

SESSION_BODY_FIELDS = ("stateful", "ark_stateful")
SESSION_HEADER = "x-stateful-session"
COMMIT_BODY_FIELD = "stateful_commit"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def as_template_message(self) -> dict[str, Any]:
        """The message as the chat template sees it (text parts joined).

        Raises ValueError for non-text parts (images, audio): sessions are text-only for now."""
        if isinstance(self.content, list):
            kinds = {p.get("type") for p in self.content} - {"text"}
            if kinds:
                raise ValueError(f"content parts of type {sorted(map(str, kinds))} are not supported in sessions")
        data = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            data["content"] = "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        data.setdefault("content", "")
        return data


class CreateSessionRequest(_Strict):
    id: str | None = None
    ttl_s: float | None = Field(default=None, ge=0)
    messages: list[ChatMessage] | None = None
    prompt: str | list[int] | None = None

    @model_validator(mode="after")
    def _one_content(self) -> "CreateSessionRequest":
        if self.messages is not None and self.prompt is not None:
            raise ValueError("give either 'messages' or 'prompt', not both")
        return self


class AppendRequest(_Strict):
    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    wait: bool = False

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


class AppendAccepted(BaseModel):
    id: str
    version: int
    queued_tokens: int
