"""``vllm.endpoint_plugins`` entry point: the HTTP half of the plugin.

vLLM loads it only when ``VLLM_PLUGINS`` names ``stateful``. It overrides
POST ``/v1/chat/completions`` and ``/v1/completions`` (requests without a
session are handed to vLLM's own handlers, captured here before the
override) and adds the ``/v1/sessions`` routes (flash queries and events included). vLLM's API-key middleware
wraps these routes like any other ``/v1`` route.

Startup fails, with a message saying what is supported, when the setup cannot
serve sessions (several API servers or data-parallel ranks, an engine that
does not run the plugin's scheduler, a KV cache too small for the headroom).
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
        from vllm_stateful.server.routes_flash import router as flash_router
        from vllm_stateful.server.routes_lifecycle import router as lifecycle_router
        from vllm_stateful.server.routes_openai import CHAT_PATH, COMPLETIONS_PATH
        from vllm_stateful.server.routes_openai import router as openai_router
        from vllm_stateful.server.routes_sessions import router as sessions_router

        core: dict[str, Any] = {}
        for route in app.routes:
            if isinstance(route, APIRoute) and route.path in (CHAT_PATH, COMPLETIONS_PATH) and "POST" in route.methods:
                core[route.path] = route.endpoint
        missing = {CHAT_PATH, COMPLETIONS_PATH} - set(core)
        if missing:
            raise RuntimeError(f"vllm-stateful: vLLM routes {sorted(missing)} not found to extend")
        app.state.stateful_core_endpoints = core
        app.include_router(openai_router)
        app.include_router(sessions_router)
        app.include_router(flash_router)
        app.include_router(lifecycle_router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:
            return
        from vllm import envs
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        from vllm_stateful.config import StatefulConfig
        from vllm_stateful.engine.support import unsupported_reason
        from vllm_stateful.server import detokenizer_prime
        from vllm_stateful.server.bridge import EngineBridge
        from vllm_stateful.server.durability import Durability
        from vllm_stateful.server.flash_runner import FlashRunner
        from vllm_stateful.server.ingest import Ingestor
        from vllm_stateful.server.lifecycle import Maintenance
        from vllm_stateful.server.metrics import SessionMetrics
        from vllm_stateful.server.restore import restore_sessions
        from vllm_stateful.server.routes_flash import restore_flash_query
        from vllm_stateful.server.service import SessionService
        from vllm_stateful.server.session_ops import SessionOps
        from vllm_stateful.server.state import StatefulState
        from vllm_stateful.sessions.tenants import Tenancy

        config = StatefulConfig.from_additional_config(getattr(args, "additional_config", None))
        reason = _unsupported_frontend(args, unsupported_reason)
        if reason:
            raise RuntimeError(f"vllm-stateful: {reason}")
        detokenizer_prime.install()  # O(tail), not O(context), per request (patches/README.md, note 5)
        api_keys = [k for k in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if k]
        names = getattr(args, "served_model_name", None) or [args.model]
        bridge = EngineBridge(engine_client, names, *_chat_template(args))
        durable = open_state_dir(config, args.model, bridge.tokenizer)
        tenancy = Tenancy.from_settings(api_keys, config.tenant_header, durable_secret(durable))
        service = SessionService(bridge, config, SessionMetrics(), tenancy)
        service.durable = Durability(durable, config.rewind_window)
        stateful = StatefulState(
            config=config,
            tenancy=tenancy,
            bridge=bridge,
            service=service,
            ingestor=Ingestor(service),
            flash=FlashRunner(service),
            ops=SessionOps(service),
            core_endpoints=getattr(state, "stateful_core_endpoints", {}),
            chat_request_cls=ChatCompletionRequest,
            completion_request_cls=CompletionRequest,
        )
        state.stateful = stateful
        await service.start()

        def restore_flash(session, fid, saved) -> None:
            restore_flash_query(stateful, session, fid, saved)

        restored, rebuild = await restore_sessions(service, stateful.ingestor, restore_flash, config.restore)
        if config.shared_state_root is not None:
            stateful.handoff = _handoff(stateful, durable, args, restore_flash)
        stateful.tasks += [t for t in (rebuild,) if t is not None]
        stateful.tasks.append(asyncio.get_running_loop().create_task(Maintenance(service).run()))
        logger.info(
            "vllm-stateful sessions ready: %s, budget %s, %s, state dir %s (%d sessions restored)",
            config.to_dict(),
            service.budget,
            f"{len(api_keys)} API-key tenants" if api_keys else "single tenant",
            durable.path if durable is not None else "off",
            restored,
        )


def _handoff(stateful: Any, durable: Any, args: Namespace, restore_flash: Any) -> Any:
    """Taking sessions over from other replicas under ``shared_state_root`` (server/handoff.py)."""
    import socket

    from vllm_stateful.server.handoff import Handoff
    from vllm_stateful.server.restore import restore_record
    from vllm_stateful.server.routes_lifecycle import import_export

    config, service = stateful.config, stateful.service
    url = config.advertise_url
    if url is None:
        host = getattr(args, "host", None)
        host = socket.getfqdn() if host in (None, "", "0.0.0.0", "::") else host
        url = f"http://{host}:{getattr(args, 'port', 8000)}"

    async def adopt(record, source):
        return await restore_record(service, stateful.ingestor, restore_flash, record, source)

    async def import_(tenant, export):
        return await import_export(stateful, tenant, export)

    async def close(session):
        return await service.close(session, reason="moved")

    return Handoff(durable, config.shared_state_root, url, adopt, import_, close, config.tenant_header)


def open_state_dir(config: Any, model: str, tokenizer: Any) -> Any:
    """The durable store for ``config.state_dir`` (None when ``"off"``). Its identity is the
    tokenizer's vocabulary: token ids saved under one vocabulary are refused under another."""
    import hashlib
    import json
    import time

    from vllm_stateful.config import STATE_DIR_OFF
    from vllm_stateful.sessions.durable import DurableStore, StateDirInUse, default_state_dir

    if config.state_dir == STATE_DIR_OFF:
        return None
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    identity = {"vocabulary": hashlib.sha256(vocab).hexdigest()[:32]}
    path = config.state_dir or default_state_dir(f"{model}\0{identity['vocabulary']}")
    # replicas: another one may hold this dir's lock for a moment while taking a session over
    attempts = 15 if config.shared_state_root is not None else 1
    for attempt in range(attempts):
        try:
            return DurableStore(path, identity)
        except StateDirInUse:
            if attempt == attempts - 1:
                raise
            time.sleep(1.0)


def durable_secret(durable: Any) -> bytes | None:
    """The tag and cache-salt secret kept in the state dir (created once, mode 0600)."""
    import os
    import secrets
    from pathlib import Path

    if durable is None or durable.path == ":memory:":
        return None
    path = Path(durable.path) / "secret"
    if not path.exists() or path.stat().st_size != 32:
        tmp = path.with_suffix(".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path.read_bytes()


def _unsupported_frontend(args: Namespace, unsupported_reason) -> str | None:
    from vllm_stateful.engine.support import KVGroupShape

    return unsupported_reason(
        [KVGroupShape("FullAttentionSpec")],  # the engine checks the model itself
        prefix_caching=True,
        api_server_count=int(getattr(args, "api_server_count", 1) or 1),
    )


def _chat_template(args: Namespace) -> tuple[str | None, dict[str, Any]]:
    """The server's ``--chat-template`` and ``--default-chat-template-kwargs``, resolved as vLLM does."""
    from vllm.entrypoints.launchers.cli_args import resolve_default_chat_template_kwargs
    from vllm.renderers.chat_utils import load_chat_template

    return load_chat_template(getattr(args, "chat_template", None)), resolve_default_chat_template_kwargs(args)
