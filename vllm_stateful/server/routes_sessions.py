"""The ``/v1/sessions`` routes of API.md, scoped to the caller's tenant: an id
the caller does not own is a 404, exactly like an id nobody owns."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from vllm_stateful.engine.session_pins import token_digest
from vllm_stateful.server.errors import bad_request
from vllm_stateful.server.handoff import HANDOFF_HEADER
from vllm_stateful.server.http import cancel_on_disconnect, checked_id, guarded, parse_object, read_body, validated
from vllm_stateful.server.lifecycle import Maintenance
from vllm_stateful.server.protocol import AppendRequest, CreateSessionRequest, check_token_ids, template_messages
from vllm_stateful.server.session_kv import finish_then_cancel
from vllm_stateful.server.session_ops import revision_tag
from vllm_stateful.server.state import StatefulState, stateful_state
from vllm_stateful.server.turn_types import TurnInput
from vllm_stateful.sessions.store import Session, SessionError

router = APIRouter()

INTEGRITY_PATH = "/v1/stateful/debug/integrity"


async def session_body(state: StatefulState, raw_request: Request, ids_field: str | None = None) -> dict:
    """The JSON body; a token-id list that cannot fit the context is a 413 before any validation."""
    body = await parse_object(
        await read_body(raw_request, state.config.max_request_body_bytes) or b"{}", state.bridge.parse_json
    )
    ids = body.get(ids_field) if ids_field else None
    if isinstance(ids, list) and len(ids) > state.bridge.max_model_len:
        raise SessionError(
            413, f"{len(ids)} token ids exceed the model's context length of {state.bridge.max_model_len}",
            "context_length_exceeded", param=ids_field,
        )  # fmt: skip
    return body


async def own_session(state: StatefulState, raw_request: Request, session_id: str) -> Session:
    """The caller's session ``session_id`` (taken over from another replica if one holds it); 404."""
    tenant = state.tenancy.tenant_of(raw_request.headers)
    session_id = checked_id(session_id, "session_id")
    await claim(state, raw_request, tenant, session_id)
    return state.service.store.get(tenant, session_id)


async def claim(state: StatefulState, raw_request: Request, tenant: str, session_id: str) -> None:
    """With replicas (``shared_state_root``): a session this replica does not hold is taken over
    from the replica that does (``server/handoff.py``) before anything looks it up or creates it.
    Not for another replica's handoff requests (they ask what this one holds), and never stopped
    half-way by a client leaving."""
    store = state.service.store
    if state.handoff is None or store.contains(tenant, session_id):
        return
    if HANDOFF_HEADER in raw_request.headers and raw_request.method in ("GET", "DELETE"):
        return  # another replica's export or delete: about what this one holds (never a create)
    claimed = state.handoff.claim(tenant, session_id, raw_request.headers, lambda: store.contains(tenant, session_id))
    await finish_then_cancel(claimed)


def check_ttl(state: StatefulState, ttl_s: float | None) -> None:
    cfg = state.config
    if ttl_s is not None and not cfg.min_ttl_s <= ttl_s <= cfg.max_ttl_s:
        raise bad_request(f"ttl_s must be between {cfg.min_ttl_s} and {cfg.max_ttl_s} seconds", param="ttl_s")


@router.post("/v1/sessions", status_code=201)
@guarded
async def create_session(raw_request: Request) -> Response:
    state = stateful_state(raw_request)
    tenant = state.tenancy.tenant_of(raw_request.headers)
    req = validated(CreateSessionRequest, await session_body(state, raw_request, "prompt"))
    if req.id is not None:
        checked_id(req.id, "id")
    check_ttl(state, req.ttl_s)
    msgs = template_messages(req.messages) if req.messages else None
    if isinstance(req.prompt, list):
        check_token_ids(req.prompt, state.bridge.max_token_id, "prompt")
    service = state.service
    if req.id is not None:
        await claim(state, raw_request, tenant, req.id)  # held by another replica: taken, then 409
    session = service.store.create(tenant, req.id, req.ttl_s)
    try:
        if msgs or req.prompt is not None:
            # appends are refused (409) until the content is in, from before the first await: one
            # landing meanwhile would take version 1 while the content, ahead of it, took 2
            session.exclusive = True  # kept by a session that fails: it is closed below
            await cancel_on_disconnect(raw_request, _fill(state, session, msgs, req.prompt))
            if session.committed_version == 0:  # the client left before the content was ingested
                raise SessionError(499, "client closed the request", "client_closed")
            session.exclusive = False
        else:
            await service.durable.put(session)
    except BaseException:
        await service.close(session, reason="failed")
        raise
    service.metrics.refresh(service)
    return JSONResponse(service.describe(session), status_code=201)


async def _fill(state: StatefulState, session: Session, msgs, prompt) -> Response:
    """Put the creation content in as version 1 (the caller holds ``session.exclusive``)."""
    service = state.service
    assert service.ledger is not None
    async with session.write_lock:
        if msgs:
            turn_input = await service.chat_input(session, msgs, add_generation_prompt=False)
        elif isinstance(prompt, str):
            turn_input = await service.text_input(session, prompt)
        else:
            turn_input = TurnInput(list(prompt))
        reservation = await service.admit(
            session, len(turn_input.token_ids), 1, "this session's content", turn_input.token_ids
        )
        session.version += 1  # saved with the content, in one write (a failure closes the session)
        turn_input.boundaries = [(session.version, len(turn_input.token_ids), len(turn_input.messages))]
        try:
            await service.ingest(session, turn_input, [reservation], session.version)
        finally:
            service.ledger.cancel(reservation)  # no-op once settled
    return Response()


@router.get("/v1/sessions")
@guarded
async def list_sessions(raw_request: Request) -> Response:
    state = stateful_state(raw_request)
    tenant = state.tenancy.tenant_of(raw_request.headers)
    sessions = state.service.store.of_tenant(tenant)
    return JSONResponse({"object": "list", "data": [state.service.describe(s) for s in sessions]})


@router.get("/v1/sessions/{session_id}")
@guarded
async def get_session(session_id: str, raw_request: Request) -> Response:
    """``?include_tokens=true`` adds the session's token history (``token_ids``); owner only, like every route."""
    state = stateful_state(raw_request)
    session = await own_session(state, raw_request, session_id)
    body = state.service.describe(session)
    if raw_request.query_params.get("include_tokens", "").lower() in ("1", "true"):
        body["token_ids"] = list(session.token_ids)
    return JSONResponse(body)


@router.delete("/v1/sessions/{session_id}")
@guarded
async def delete_session(session_id: str, raw_request: Request) -> Response:
    state = stateful_state(raw_request)
    session = await own_session(state, raw_request, session_id)
    if_revision = raw_request.query_params.get("if_revision")
    if if_revision is not None and revision_tag(session) != if_revision:  # no await until close removes it
        raise SessionError(409, f"session '{session_id}' changed since revision {if_revision}", "revision_changed")
    return JSONResponse(await state.service.close(session))


@router.post("/v1/sessions/{session_id}/append")
@guarded
async def append(session_id: str, raw_request: Request) -> Response:
    state = stateful_state(raw_request)
    session = await own_session(state, raw_request, session_id)
    req = validated(AppendRequest, await session_body(state, raw_request, "token_ids"))
    messages = template_messages(req.messages) if req.messages else None
    if req.token_ids is not None:
        check_token_ids(req.token_ids, state.bridge.max_token_id, "token_ids")
    item = await state.ingestor.append(session, req.text, req.token_ids, messages)
    accepted = {"id": session.id, "version": item.version, "queued_tokens": session.queued_tokens}
    if not req.wait:
        return JSONResponse(accepted, status_code=202)
    try:
        await cancel_on_disconnect(raw_request, _wait_ingested(state, session, item.seq))
    except SessionError as err:
        if err.code != "session_backlog":
            raise
        return JSONResponse({**accepted, "ingested": False}, status_code=202)  # acknowledged, still queued
    return JSONResponse(state.service.describe(session), status_code=200)


async def _wait_ingested(state: StatefulState, session: Session, seq: int) -> Response:
    await state.service.wait_ingested(session, seq, inherit=False)  # the append's own class
    return Response()


@router.get(INTEGRITY_PATH)
@guarded
async def integrity(raw_request: Request) -> Response:
    """Engine pin table vs. the API's sessions (tests and operators; ``debug_routes`` only).

    Checks, per session: the engine pins a prefix of the API's committed
    history (same tokens: digests compared) and no more blocks than the API
    believes; the engine pins nothing the API does not know; the ledger adds up.
    """
    state = stateful_state(raw_request)
    if not state.config.debug_routes:
        raise SessionError(404, "debug routes are off (stateful.debug_routes)", "not_found")
    tenant = state.tenancy.tenant_of(raw_request.headers)
    per_rank = await state.bridge.call_all("integrity", digests=True)
    drops_noticed = [r for r, one in enumerate(per_rank) if one["kv_epoch"] != state.service.kv_epochs[r]]
    if drops_noticed:
        # a drop (cache reset, weight update) the background loop has not noticed yet is not a problem:
        # notice it now, as that loop would, and look again
        await Maintenance(state.service).notice_kv_drops()
        per_rank = await state.bridge.call_all("integrity", digests=True)
    engine = _merge_ranks(per_rank)
    sessions = state.service.store.all()
    by_key = {s.key: s for s in sessions}

    def name(s: Session) -> str:  # other tenants' ids are not the caller's to see
        return f"session {s.id}" if s.tenant == tenant else "a session of another tenant"

    def redact(problem: str) -> str:  # engine-side reports name sessions by their secret keys
        for key, s in by_key.items():
            problem = problem.replace(f"session {key}", name(s))
        return re.sub(r"session [0-9a-f]{32}", "a session the API does not know", problem)

    assert state.service.ledger is not None
    problems = [redact(p) for p in engine["problems"] + state.service.ledger.check_integrity()]

    for key, pin in engine["sessions"].items():
        s = by_key.get(key)
        if s is None:
            problems.append(f"engine pins {pin['blocks']} blocks for a session the API does not know")
        elif pin["tokens"] > s.context_tokens or pin["digest"] != token_digest(s.token_ids[: pin["tokens"]]):
            problems.append(f"{name(s)}: engine pins {pin['tokens']} tokens that are not its committed history")
        elif pin["rank"] != s.data_parallel_rank:
            problems.append(f"{name(s)}: pinned on rank {pin['rank']}, placed on rank {s.data_parallel_rank}")
        elif pin["blocks"] != s.pinned_blocks and not s.busy:
            problems.append(f"{name(s)}: engine pins {pin['blocks']} blocks, API view {s.pinned_blocks}")
    problems += _sharing_problems(state, engine["sessions"], by_key, name)
    for s in sessions:
        if s.key not in engine["sessions"] and s.pinned_blocks and not s.busy:
            problems.append(f"{name(s)}: API view {s.pinned_blocks} pinned blocks, engine none")
    own = {s.key: s for s in state.service.store.of_tenant(tenant)}
    body = {
        "problems": problems,
        "pinned_blocks": engine["pinned_blocks"],
        "free_blocks": engine["free_blocks"],
        "running": engine["running"],
        "waiting": engine["waiting"],
        "kv_epoch": engine["kv_epoch"],
        "drops_noticed": drops_noticed,  # ranks whose KV drop this report noticed before the background loop
        "counters": engine["counters"],
        "sessions": sorted(s.id for s in own.values() if s.key in engine["sessions"]),
        "api_sessions": {s.id: s.pinned_blocks for s in own.values()},
        "ingest_waiters": {s.id: s.ingest_waiters for s in own.values() if s.ingest_waiters},
        "charged_blocks": state.service.ledger.charged_blocks(),
        "fragmentation": engine.get("fragmentation"),
        "waits": engine["waits"],
        "budget_blocks": state.service.ledger.budget_blocks,
        "ranks": [
            {
                "rank": r,
                "pinned_blocks": one["pinned_blocks"],
                "free_blocks": one["free_blocks"],
                "sessions": sorted(s.id for s in own.values() if s.key in one["sessions"]),
                "charged_blocks": state.service.ledger.charged_blocks_of_rank(r),
            }
            for r, one in enumerate(per_rank)
        ],
    }
    return JSONResponse(body)


def _merge_ranks(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The engines' integrity reports as one; each pin says its rank, each problem names it."""
    merged: dict[str, Any] = {"problems": [], "sessions": {}, "waits": [], "counters": {}}
    for rank, one in enumerate(per_rank):
        prefix = f"rank {rank}: " if len(per_rank) > 1 else ""
        merged["problems"] += [prefix + p for p in one["problems"]]
        for key, pin in one["sessions"].items():
            if key in merged["sessions"]:
                merged["problems"].append(f"{prefix}session {key} is pinned on two ranks")
            merged["sessions"][key] = {**pin, "rank": rank}
        merged["waits"] += one["waits"]
        for name, value in one["counters"].items():
            merged["counters"][name] = merged["counters"].get(name, 0) + value
        for name in ("pinned_blocks", "free_blocks", "running", "waiting"):
            merged[name] = merged.get(name, 0) + one[name]
    merged["kv_epoch"] = [one["kv_epoch"] for one in per_rank] if len(per_rank) > 1 else per_rank[0]["kv_epoch"]
    return merged


def _sharing_problems(state: StatefulState, pins: dict[str, Any], by_key: dict[str, Session], name) -> list[str]:
    """The ledger charges a block content once per tenant: the engine must pin it in one block."""
    ledger = state.service.ledger
    assert ledger is not None
    bs = ledger.budget.block_size
    first: dict[tuple[int, str, bytes], int] = {}
    problems = []
    for key, pin in pins.items():
        s = by_key.get(key)
        if s is None or s.busy:
            continue
        full = pin["tokens"] // bs
        for i, (digest, block_id) in enumerate(zip(ledger.block_keys(key)[:full], pin["block_ids"])):
            seen = first.setdefault((pin["rank"], s.tenant, digest), block_id)
            if seen != block_id:
                problems.append(f"{name(s)}: block {i} is charged once but pinned in blocks {seen} and {block_id}")
    return problems
