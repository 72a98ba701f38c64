"""Replicas behind a session-affinity router: taking over a session another replica holds.

Setup: every replica keeps its durable state in its own directory under one root
on a volume they all mount (``state_dir = shared_state_root/<replica>``), and
says where it answers (``advertise_url``, written to ``peer.json`` in its state
dir). The router sends each session to one replica; when the ring changes (a
replica left, or came back), a session's requests reach a replica that does not
hold it. Before answering "not found" or creating the session anew, that replica
claims it here:

* from a replica that is gone (its state dir's lock is free): the session's
  stored record is copied into this replica's store, then deleted from the
  other's, with the other's lock held throughout (no two replicas take one
  session, and the dead one cannot restart half-way);
* from a live replica (its lock is held): pulled over HTTP with the caller's
  own credentials: ``GET /v1/sessions/{id}/export`` there, import here (saved),
  then ``DELETE /v1/sessions/{id}?if_revision=R`` there, which refuses if the
  session changed after the export (any saved change bumps its revision); then
  the copy here is dropped and the caller gets 409 ``session_moving`` (retry:
  the next claim sees the newer state). Both requests carry ``X-Stateful-Handoff``,
  so the other replica answers from what it holds and never claims back.

Either way the session keeps its tokens, messages, version, rewind points, flash
queries and acknowledged appends; its KV is rebuilt on first use
(``restored.from: "replica"``, ``recomputed_tokens``). Contract: a session is in
at most one replica's store once a claim returns, and a claim never loses an
acknowledged change (copy first, delete second; a crash in between leaves two
copies of the same state, the gone replica's never served again unless it
restarts before its sessions are claimed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from vllm_stateful.sessions.durable import DB_NAME, DurableStore, SessionRecord, StateDirInUse
from vllm_stateful.sessions.store import Session, SessionError

logger = logging.getLogger(__name__)

PEER_FILE = "peer.json"
# marks a replica's handoff request (export, delete) to another: answered from what that replica
# holds, never by claiming the session itself (which would pull it back)
HANDOFF_HEADER = "x-stateful-handoff"
# headers of the caller forwarded to the replica a session is pulled from (its credentials)
FORWARDED = ("authorization",)

Adopt = Callable[[SessionRecord, dict[str, Any]], Awaitable[Session]]  # a taken record -> live session here
Import = Callable[[str, dict[str, Any]], Awaitable[Session]]  # (tenant, export) -> live session here
Close = Callable[[Session], Awaitable[Any]]


class Handoff:
    def __init__(
        self,
        own: DurableStore,
        root: str,
        advertise_url: str | None,
        adopt: Adopt,
        import_: Import,
        close: Close,
        tenant_header: str | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        own_dir = Path(own.path).resolve()
        self.root = Path(root).resolve()
        if own_dir.parent != self.root:
            raise ValueError(
                f"stateful.state_dir ({own_dir}) must be a directory directly inside stateful.shared_state_root "
                f"({self.root}), one per replica"
            )
        self.own = own
        self.own_dir = own_dir
        self.adopt = adopt
        self.import_ = import_
        self.close = close
        self.forwarded = FORWARDED + ((tenant_header.lower(),) if tenant_header else ())
        self.timeout = httpx.Timeout(timeout_s, connect=3.0)
        # one claim per session at a time; one takeover per gone replica at a time
        self._claims: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}  # lock, claims using it
        self._peers: dict[Path, asyncio.Lock] = {}
        self.taken = 0
        self.pulled = 0
        self._write_peer_file(advertise_url)

    def _write_peer_file(self, url: str | None) -> None:
        tmp = self.own_dir / (PEER_FILE + ".new")
        tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        os.replace(tmp, self.own_dir / PEER_FILE)

    def peers(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p != self.own_dir and (p / DB_NAME).exists())

    async def claim(
        self, tenant: str, session_id: str, headers: Mapping[str, str], present: Callable[[], bool]
    ) -> bool:
        """Bring session ``session_id`` of ``tenant`` here from another replica if one holds it;
        True when it is here now. ``present()``: whether this replica holds it already. 409/503
        ``session_moving`` (retry) when a move could not finish; the session is then where it was."""
        key = (tenant, session_id)
        lock, users = self._claims.get(key, (asyncio.Lock(), 0))
        self._claims[key] = (lock, users + 1)
        try:
            async with lock:
                if present():
                    return True
                live: list[Path] = []
                for peer in self.peers():
                    try:
                        if await self._take_from_gone(peer, tenant, session_id):
                            return True
                    except StateDirInUse:
                        live.append(peer)
                    except ValueError:  # another model's state dir under the root: never holds ours
                        continue
                    except Exception:
                        logger.exception("vllm-stateful: could not read the state dir of replica %s", peer.name)
                for peer in live:
                    if await self._pull_from_live(peer, tenant, session_id, headers):
                        return True
                return False
        finally:
            lock, users = self._claims[key]
            if users == 1:
                del self._claims[key]
            else:
                self._claims[key] = (lock, users - 1)

    async def _take_from_gone(self, peer: Path, tenant: str, session_id: str) -> bool:
        async with self._peers.setdefault(peer, asyncio.Lock()):
            store = await asyncio.to_thread(DurableStore, str(peer), self.own.identity)  # StateDirInUse: alive
            try:
                record = await store.run(store.find, tenant, session_id)
                if record is None:
                    return False
                await self.own.run(self.own.put, record)  # saved here first: a crash now leaves two copies
                await store.run(store.delete_all_of, tenant, session_id)  # older incarnations too
            finally:
                await asyncio.to_thread(store.close)
        await self.adopt(record, {"from": "replica", "replica": peer.name})
        self.taken += 1
        logger.info("vllm-stateful: took over session %s from gone replica %s", session_id, peer.name)
        return True

    async def _pull_from_live(self, peer: Path, tenant: str, session_id: str, headers: Mapping[str, str]) -> bool:
        if not await asyncio.to_thread(_holds, peer, tenant, session_id):
            return False
        url = _peer_url(peer)
        if url is None:
            raise SessionError(
                409, f"session '{session_id}' is held by replica {peer.name}, which advertises no URL "
                "(stateful.advertise_url); send it there", "session_elsewhere",
            )  # fmt: skip
        forwarded = {k: v for k, v in headers.items() if k.lower() in self.forwarded}
        path = f"/v1/sessions/{_path_segment(session_id)}"
        session: Session | None = None
        try:
            async with httpx.AsyncClient(
                base_url=url, headers={**forwarded, HANDOFF_HEADER: "1"}, timeout=self.timeout
            ) as client:
                got = await client.get(path + "/export")
                if got.status_code == 404:
                    return False  # closed there meanwhile
                if got.status_code != 200:
                    raise _moving(session_id, peer, f"its export answered {got.status_code}")
                export = got.json()
                if export.get("id") != session_id or not isinstance(export.get("revision"), str):
                    raise _moving(session_id, peer, "its export is not of this session")
                session = await self.import_(tenant, export)
                dropped = await client.delete(path, params={"if_revision": export["revision"]})
        except httpx.HTTPError as exc:
            if session is not None:
                await self.close(session)
            raise _moving(session_id, peer, f"it did not answer ({type(exc).__name__})", 503) from exc
        except BaseException:
            if session is not None:
                await self.close(session)
            raise
        if dropped.status_code == 200:
            session.restored = {"from": "replica", "replica": peer.name, "kv": "pending"}
            self.pulled += 1
            logger.info("vllm-stateful: pulled session %s from live replica %s", session_id, peer.name)
            return True
        await self.close(session)  # the other copy changed, moved on or was closed: it decides
        raise _moving(session_id, peer, f"it changed there meanwhile ({dropped.status_code})")


def _moving(session_id: str, peer: Path, why: str, status: int = 409) -> SessionError:
    return SessionError(
        status, f"session '{session_id}' is moving from replica {peer.name} and could not be moved here: {why}; "
        "retry", "session_moving", retry_after=1.0,
    )  # fmt: skip


def _path_segment(session_id: str) -> str:
    """``session_id`` as one URL path segment (ids are A-Za-z0-9._:-; '.' and '..' would be
    collapsed by URL normalization)."""
    return "%2E" * len(session_id) if session_id in (".", "..") else session_id


def _holds(peer: Path, tenant: str, session_id: str) -> bool:
    """Whether a live replica's store holds the session (read-only, beside its writer)."""
    import sqlite3

    db = sqlite3.connect(f"file:{peer / DB_NAME}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT 1 FROM sessions WHERE tenant = ? AND id = ? LIMIT 1", (tenant, session_id))
        return row.fetchone() is not None
    finally:
        db.close()


def _peer_url(peer: Path) -> str | None:
    try:
        return json.loads((peer / PEER_FILE).read_text()).get("url") or None
    except (OSError, ValueError):
        return None
