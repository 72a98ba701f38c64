"""Per-app state of the endpoint plugin (``app.state.stateful``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from vllm_stateful.config import StatefulConfig
from vllm_stateful.server.bridge import EngineBridge
from vllm_stateful.server.flash_runner import FlashRunner
from vllm_stateful.server.handoff import Handoff
from vllm_stateful.server.ingest import Ingestor
from vllm_stateful.server.service import SessionService
from vllm_stateful.server.session_ops import SessionOps
from vllm_stateful.sessions.store import SessionError
from vllm_stateful.sessions.tenants import Tenancy


@dataclass
class StatefulState:
    config: StatefulConfig
    tenancy: Tenancy
    bridge: EngineBridge
    service: SessionService
    ingestor: Ingestor
    flash: FlashRunner
    ops: SessionOps
    # vLLM's own handlers for the paths this plugin overrides, by path.
    core_endpoints: dict[str, Callable[..., Awaitable[Any]]]
    chat_request_cls: type
    completion_request_cls: type
    tasks: list[Any] = field(default_factory=list)
    handoff: Handoff | None = None  # replicas sharing a state root (server/handoff.py)


def stateful_state(raw_request: Request, require_ready: bool = True) -> StatefulState:
    """The plugin's state; 503 while sessions are not ready (or were refused at startup)."""
    state = getattr(raw_request.app.state, "stateful", None)
    if state is None or (require_ready and not state.service.ready):
        raise SessionError(503, "stateful sessions are not ready", "not_ready", retry_after=5.0)
    return state
