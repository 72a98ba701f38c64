"""``vllm.general_plugins`` entry point: the engine-side half of the plugin.

vLLM's endpoint-plugin contract (``vllm/plugins/endpoint_plugins/interface.py``)
says an endpoint plugin that needs engine-side behaviour pairs with a general
plugin that installs the engine-side method. This installs two things on
``vllm.v1.engine.core.EngineCore`` (both documented in patches/README.md):

1. ``EngineCore.stateful_call(op, args)``, reached from the API server with
   ``engine_client.engine_core.call_utility_async("stateful_call", op, args)``.
2. A wrapper around ``EngineCore.collective_rpc`` that, before a worker method
   that changes model weights runs (``WEIGHT_CHANGING_RPCS``), releases every
   pinned session and evicts its blocks from the prefix cache: KV computed with
   old weights must not be served. vLLM's
   weight-update paths call workers directly and never tell the scheduler.

Both only act when the scheduler is ours (``--scheduler-cls
vllm_stateful.StatefulScheduler``); with vLLM's stock scheduler
``stateful_call`` raises and the wrapper passes every call through unchanged.
Installing the package therefore changes no behaviour of a deployment that
does not switch it on.
"""

from __future__ import annotations

import functools
from typing import Any

ENGINE_METHOD = "stateful_call"

# Worker methods (vLLM 0.32, v1/worker/gpu_worker.py, inherited by the CPU
# worker) after which KV computed before them is stale.
WEIGHT_CHANGING_RPCS = frozenset(
    {
        "start_weight_update",
        "start_draft_weight_update",
        "update_weights",
        "finish_weight_update",
        "reload_weights",
        "reset_weights",
        "load_weights",
    }
)


class StatefulNotEnabled(RuntimeError):
    pass


def _stateful_call(self, op: str, args: dict[str, Any] | None = None) -> Any:
    handler = getattr(self.scheduler, "handle_stateful_call", None)
    if handler is None:
        raise StatefulNotEnabled(
            "this engine runs vLLM's stock scheduler; start it with --scheduler-cls vllm_stateful.StatefulScheduler"
        )
    return handler(op, args or {})


def _drops_sessions_before_weight_changes(collective_rpc):
    @functools.wraps(collective_rpc)
    def wrapper(self, method, *args: Any, **kwargs: Any):
        control = getattr(getattr(self, "scheduler", None), "session_control", None)
        if control is not None and isinstance(method, str) and method in WEIGHT_CHANGING_RPCS:
            control.drop_all("weights_updated", evict=True)
        return collective_rpc(self, method, *args, **kwargs)

    wrapper._vllm_stateful_wrapped = True  # type: ignore[attr-defined]
    return wrapper


def register_engine_hooks() -> None:
    """Install the engine-side hooks (idempotent; loaded in every vLLM process)."""
    from vllm.v1.engine.core import EngineCore

    if getattr(EngineCore, ENGINE_METHOD, None) is not _stateful_call:
        setattr(EngineCore, ENGINE_METHOD, _stateful_call)
    if not getattr(EngineCore.collective_rpc, "_vllm_stateful_wrapped", False):
        EngineCore.collective_rpc = _drops_sessions_before_weight_changes(EngineCore.collective_rpc)
