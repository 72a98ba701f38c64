"""Session lifecycle routes of API.md: fork, rewind, move, export and import (see
``server/session_ops.py`` for their contracts). Scoped to the caller's tenant
like every session route."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from vllm_stateful.server.errors import bad_request
from vllm_stateful.server.http import checked_id, guarded, validated
from vllm_stateful.server.protocol import (
    ForkRequest,
    ImportRequest,
    MoveRequest,
    RewindRequest,
    check_token_ids,
    template_messages,
)
from vllm_stateful.server.routes_flash import flash_query_of
from vllm_stateful.server.routes_sessions import check_ttl, claim, own_session, session_body
from vllm_stateful.server.state import StatefulState, stateful_state
from vllm_stateful.sessions.store import Session

router = APIRouter()


@router.post("/v1/sessions/{session_id}/fork", status_code=201)
@guarded
async def fork_session(session_id: str, raw_request: Request) -> Response:
    state = stateful_state(raw_request)
    parent = await own_session(state, raw_request, session_id)
    req = validated(ForkRequest, await session_body(state, raw_request))
    if req.id is not None:
        checked_id(req.id, "id")
        await claim(state, raw_request, parent.tenant, req.id)  # held by another replica: taken, then 409
    check_ttl(state, req.ttl_s)
    child = await state.ops.fork(parent, req.id, req.ttl_s)
    state.service.metrics.refresh(state.service)
    return JSONResponse({**state.service.describe(child), "forked_from": parent.id}, status_code=201)


@router.post("/v1/sessions/{session_id}/rewind")
@guarded
async def rewind_session(session_id: str, raw_request: Request) -> Response:
    state = stateful_state(raw_request)
    session = await own_session(state, raw_request, session_id)
    req = validated(RewindRequest, await session_body(state, raw_request))
    await state.ops.rewind(session, req.version)
    return JSONResponse(state.service.describe(session))


@router.post("/v1/sessions/{session_id}/move")
@guarded
async def move_session(session_id: str, raw_request: Request) -> Response:
    """Rebalancing under data parallelism: the session's KV is rebuilt on another rank."""
    state = stateful_state(raw_request)
    session = await own_session(state, raw_request, session_id)
    req = validated(MoveRequest, await session_body(state, raw_request))
    await state.ops.move(session, req.data_parallel_rank)
    state.service.metrics.refresh(state.service)
    return JSONResponse(state.service.describe(session))


@router.get("/v1/sessions/{session_id}/export")
@guarded
async def export_session(session_id: str, raw_request: Request) -> Response:
    state = stateful_state(raw_request)
    session = await own_session(state, raw_request, session_id)
    return JSONResponse(await state.ops.export(session))


@router.post("/v1/sessions/import", status_code=201)
@guarded
async def import_session(raw_request: Request) -> Response:
    state = stateful_state(raw_request)
    tenant = state.tenancy.tenant_of(raw_request.headers)
    body = await session_body(state, raw_request, "token_ids")
    if isinstance(body.get("id"), str):
        await claim(state, raw_request, tenant, checked_id(body["id"], "id"))  # held elsewhere: taken, then 409
    session = await import_export(state, tenant, body)
    state.service.metrics.refresh(state.service)
    return JSONResponse(state.service.describe(session), status_code=201)


async def import_export(state: StatefulState, tenant: str, body: dict) -> Session:
    """A new session of ``tenant`` from an export (validated here; see ``SessionOps.import_``)."""
    req = validated(ImportRequest, body)
    checked_id(req.id, "id")
    check_token_ids(req.token_ids, state.bridge.max_token_id, "token_ids")
    messages = template_messages(req.messages) if req.messages else []
    ttl = None if req.ttl_s is None else float(req.ttl_s)
    if ttl is not None:
        cfg = state.config
        ttl = min(max(ttl, cfg.min_ttl_s), cfg.max_ttl_s)  # an export's TTL, within this server's bounds
    saved = body.get("flash_queries") or []
    if not isinstance(saved, list) or not all(isinstance(q, dict) for q in saved):
        raise bad_request("'flash_queries' must be a list of flash-query registrations", param="flash_queries")
    queries = [flash_query_of(state, q) for q in saved]  # all validated before anything is created
    data = {**req.model_dump(), "messages": messages, "ttl_s": ttl}

    def register(session) -> None:
        for query in queries:
            state.flash.register(session, query)

    return await state.ops.import_(tenant, data, register)
