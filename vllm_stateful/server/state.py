"""Per-app state of the endpoint plugin (``app.state.stateful``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from vllm_stateful.server.bridge import EngineBridge
from vllm_stateful.server.ingest import Ingestor
from vllm_stateful.server.service import SessionService


@dataclass
class StatefulState:
    bridge: EngineBridge
    service: SessionService
    ingestor: Ingestor
    # vLLM's own handlers for the paths this plugin overrides, by path.
    core_endpoints: dict[str, Callable[..., Awaitable[Any]]]
    chat_request_cls: type
    completion_request_cls: type
    tasks: list[Any] = field(default_factory=list)
