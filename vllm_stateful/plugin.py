"""``vllm.general_plugins`` entry point: the engine-side half of the plugin.

vLLM's endpoint-plugin contract (``vllm/plugins/endpoint_plugins/interface.py``)
says an endpoint plugin that needs engine-side behaviour pairs with a general
plugin that installs the engine-side method. This is that method:
``EngineCore.stateful_call(op, args)``, reached from the API server with
``engine_client.engine_core.call_utility_async("stateful_call", op, args)``.

It only forwards to the scheduler when the scheduler is ours
(``--scheduler-cls vllm_stateful.StatefulScheduler``); with vLLM's stock
scheduler it raises, and nothing else in vLLM calls it. Installing the package
therefore changes no behaviour of a deployment that does not switch it on.
See patches/README.md for why this is a method and not a diff, and when it can go.
"""

from __future__ import annotations

from typing import Any

ENGINE_METHOD = "stateful_call"


class StatefulNotEnabled(RuntimeError):
    pass


def _stateful_call(self, op: str, args: dict[str, Any] | None = None) -> Any:
    handler = getattr(self.scheduler, "handle_stateful_call", None)
    if handler is None:
        raise StatefulNotEnabled(
            "this engine runs vLLM's stock scheduler; start it with --scheduler-cls vllm_stateful.StatefulScheduler"
        )
    return handler(op, args or {})


def register_engine_hooks() -> None:
    """Install ``EngineCore.stateful_call`` (idempotent; loaded in every vLLM process)."""
    from vllm.v1.engine.core import EngineCore

    if getattr(EngineCore, ENGINE_METHOD, None) is not _stateful_call:
        setattr(EngineCore, ENGINE_METHOD, _stateful_call)
