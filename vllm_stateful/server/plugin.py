"""``vllm.endpoint_plugins`` entry point: the HTTP half of the plugin.

vLLM loads it only when ``VLLM_PLUGINS`` names ``stateful``. It overrides
POST ``/v1/chat/completions`` and ``/v1/completions`` (requests without a
session are handed to vLLM's own handlers, captured here before the
override) and adds the ``/v1/sessions`` routes. vLLM's API-key middleware
wraps these routes like any other ``/v1`` route.
"""

from __future__ import annotations

import asyncio
import logging
from argparse import Namespace
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

logger = logging.getLogger("vllm_stateful")


class StatefulEndpointPlugin:
    name = "stateful"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from vllm_stateful.server.routes import CHAT_PATH, COMPLETIONS_PATH, router

        core: dict[str, Any] = {}
        for route in app.routes:
            if isinstance(route, APIRoute) and route.path in (CHAT_PATH, COMPLETIONS_PATH) and "POST" in route.methods:
                core[route.path] = route.endpoint
        missing = {CHAT_PATH, COMPLETIONS_PATH} - set(core)
        if missing:
            raise RuntimeError(f"vllm-stateful: vLLM routes {sorted(missing)} not found to extend")
        app.state.stateful_core_endpoints = core
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:
            return
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        from vllm_stateful.config import StatefulConfig
        from vllm_stateful.server.bridge import EngineBridge
        from vllm_stateful.server.ingest import Ingestor
        from vllm_stateful.server.metrics import SessionMetrics
        from vllm_stateful.server.service import SessionService
        from vllm_stateful.server.state import StatefulState

        config = StatefulConfig.from_additional_config(getattr(args, "additional_config", None))
        names = getattr(args, "served_model_name", None) or [args.model]
        bridge = EngineBridge(engine_client, names)
        service = SessionService(bridge, config, SessionMetrics())
        stateful = StatefulState(
            bridge=bridge,
            service=service,
            ingestor=Ingestor(service),
            core_endpoints=state.stateful_core_endpoints if hasattr(state, "stateful_core_endpoints") else {},
            chat_request_cls=ChatCompletionRequest,
            completion_request_cls=CompletionRequest,
        )
        state.stateful = stateful
        try:
            await service.start()
        except Exception as exc:
            logger.error("vllm-stateful: sessions disabled: %s", exc)
            return
        stateful.tasks.append(asyncio.get_running_loop().create_task(service.expire_loop()))
        logger.info("vllm-stateful sessions ready: %s, budget %s", config.to_dict(), service.budget)
