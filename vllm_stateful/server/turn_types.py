"""What a request adds to a session, and what it reports back (HTTP-free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm_stateful.sessions.store import PinView, Session


@dataclass
class TurnInput:
    """What a request adds to its session."""

    token_ids: list[int]
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat only
    is_chat: bool = False
    # the session history the input was built on (None: the history when the request runs)
    history: list[int] | None = None
    # what the engine pinned of ``history``, read with it (see ``Session.pin_view``)
    pin: PinView | None = None
    # ingestion: (version, tokens of this input, messages of this input) after each append in it
    boundaries: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class TurnResult:
    """Filled in as the turn runs; final once ``finished``."""

    session: Session
    prompt_tokens: int  # every token the request attends to: session history + its new tokens
    kv_tokens_before: int
    output_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cached_tokens: int = 0
    finished: bool = False
    version: int = 0  # the version the request read, or, once committed, the one it made
    read_seq: int = 0  # the session's commit_seq when the request read it
    read_tokens: int = 0  # how many of the session's tokens it read (its history)
    flash_hit: bool | None = None  # read-only queries: answered from a flash query's cache
    versions_behind: int | None = None  # consistency "ingested": acknowledged versions the answer does not see
    # consistency "ingested": age of the oldest of those when it read (None: unknown, see sessions/consistency.py)
    staleness_ms: int | None = None

    @property
    def new_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def recomputed_tokens(self) -> int:
        return max(0, min(self.kv_tokens_before, self.prompt_tokens - 1) - self.cached_tokens)

    def session_field(self) -> dict[str, Any]:
        return {
            "id": self.session.id,
            "version": self.version,
            "context_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            **({} if self.flash_hit is None else {"flash_hit": self.flash_hit}),
            **({} if self.versions_behind is None else {"versions_behind": self.versions_behind}),
            **({} if self.versions_behind is None else {"staleness_ms": self.staleness_ms}),
        }

    def usage(self) -> dict[str, Any]:
        n_out = len(self.output_token_ids)
        return {
            "prompt_tokens": self.new_tokens,
            "completion_tokens": n_out,
            "total_tokens": self.new_tokens + n_out,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }
