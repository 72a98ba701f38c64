"""The API server's authoritative session state (tokens, messages, version).

The token history lives here, next to the tokenizer and chat template; the
engine only holds pinned KV blocks keyed by each session incarnation's
``key`` (see docs/architecture.md). Sessions are scoped to their tenant: the
store maps ``(tenant, id)`` to a session, and nothing here can reach a
session of another tenant. Single-threaded asyncio: no locks beyond the
per-session write lock, which orders turns and ingestion. No vLLM import.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vllm_stateful.sessions.durable import Checkpoint
from vllm_stateful.sessions.events import SessionEvents
from vllm_stateful.sessions.ids import new_incarnation_key, new_session_id

RETRY_AFTER_S = 1.0
OPEN_STATES = ("resident", "offloaded", "cold")


class SessionError(Exception):
    """A refused session operation: ``status`` is the HTTP status to answer."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        retry_after: float | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after
        self.param = param


@dataclass(frozen=True)
class PinView:
    """What the engine pinned of a session's history, as the API server last heard it: the first
    ``tokens`` tokens, at data-parallel rank ``rank``'s sync ``generation`` of the session (-1: not
    known)."""

    generation: int
    tokens: int
    rank: int = 0


@dataclass(eq=False)
class Session:
    id: str
    tenant: str
    ttl_s: float
    key: str = field(default_factory=new_incarnation_key)
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    version: int = 0
    token_ids: list[int] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    # Text the chat template still owes after the last generated reply.
    pending_chat_text: str = ""
    # What the engine pinned at the last sync (kv_tokens: history tokens whose KV the session
    # should reuse; pinned_blocks: blocks it holds now, 0 once the engine dropped them).
    kv_tokens: int = 0
    pinned_blocks: int = 0
    pinned_tokens: int = 0  # of token_ids, the leading ones the engine pins (as of the last sync)
    pin_generation: int = -1  # the engine's sync generation of that pin (-1: not known)
    sync_seq: int = 0
    # resident: KV pinned in the engine; offloaded: spilled out of the KV pool to vLLM's KV
    # offloading tier (full blocks load back, the partial last one is recomputed); cold: only
    # tokens kept (spilled without an offloading tier, restored after a restart, or dropped by a
    # prefix-cache reset or weight update), re-prefilled on next use; failed: acknowledged data
    # could not be ingested or saved, every request is refused until the session is deleted;
    # closed: removed.
    state: str = "resident"
    error: str | None = None
    turn_in_flight: bool = False
    # Engine requests running on this session's KV: client work (turns, queries, ingestion),
    # which counts as use, and background work (flash evaluations), which does not.
    active_request_ids: set[str] = field(default_factory=set)
    # requests waiting for this session's appends (read-your-writes): its ingestion runs at their class
    ingest_waiters: int = 0
    # the last append each waiting request needs ingested (any waiter): a batch stops there
    ingest_needs: list[int] = field(default_factory=list)
    background_request_ids: set[str] = field(default_factory=set)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Read-your-writes: appends acknowledged vs ingested, as sequence numbers.
    acked_seq: int = 0
    ingested_seq: int = 0
    queued_tokens: int = 0
    ingest_cond: asyncio.Condition = field(default_factory=asyncio.Condition)
    # This incarnation's append queue and its drain task (owned by the Ingestor).
    pending_appends: list[Any] = field(default_factory=list)
    # (sequence number, acknowledged at: monotonic) of the appends acknowledged and not yet
    # ingested, oldest first: what a query with bounded staleness waits for (sessions/consistency.py)
    uningested_acks: deque[tuple[int, float]] = field(default_factory=deque)
    ingest_task: asyncio.Task | None = None
    # The newest version whose changes ``token_ids`` holds in full (``version`` also counts appends
    # acknowledged but not yet ingested), and a counter bumped by every change of ``token_ids``
    # (two token states never share it, while a version label can lag behind a turn).
    committed_version: int = 0
    commit_seq: int = 0
    # Flash queries by id (sessions/flash.py) and the session's event stream.
    flash: dict[str, Any] = field(default_factory=dict)
    events: SessionEvents = field(default_factory=lambda: SessionEvents(256, 256, 16))
    # Versions the session can be rewound to (oldest first; see server/session_ops.py).
    checkpoints: list[Checkpoint] = field(default_factory=lambda: [Checkpoint(0, 0, 0, "")])
    # Set on a session restored from the state dir or imported: how its KV came back.
    restored: dict[str, Any] | None = None
    saved: bool = False  # its row and rewind points are in the state dir (see server/durability.py)
    # the newest version whose content ``token_ids`` holds: rewind points below it are no prefixes
    newest_applied: int = 0
    # its creation content is being filled, or a whole-session operation (fork, rewind, export)
    # holds it: appends are refused meanwhile
    exclusive: bool = False
    # the data-parallel rank whose engine holds the session's KV: every request of it runs there
    data_parallel_rank: int = 0
    # bumped by every write of the session to the state dir: with ``key``, names one saved state
    # (a handoff deletes the copy it moved only if it is still that state)
    revision: int = 0

    @property
    def context_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    @property
    def busy(self) -> bool:
        """Work is running or queued on the session: it counts as use (no expiry).

        Appends queued on a failed session will never run, so they do not count."""
        queued = self.is_open and (bool(self.pending_appends) or self.ingested_seq < self.acked_seq)
        return self.turn_in_flight or bool(self.active_request_ids) or queued

    def appends_ingested(self, seq: int) -> None:
        """The appends up to ``seq`` are in ``token_ids`` (or failed): from now no read counts them
        as acknowledged and not yet ingested (``uningested_acks``, ``ingested_seq``)."""
        self.ingested_seq = max(self.ingested_seq, seq)
        while self.uningested_acks and self.uningested_acks[0][0] <= seq:
            self.uningested_acks.popleft()

    def touch(self) -> None:
        self.last_used_at = time.time()

    def pin_view(self) -> PinView:
        """Read it together with ``token_ids`` (no await between): the view describes that history."""
        return PinView(self.pin_generation, min(self.pinned_tokens, len(self.token_ids)), self.data_parallel_rank)

    def note_pin(self, info: dict[str, int]) -> None:
        """Record the engine's answer to a sync-like op (pinned tokens, blocks, generation)."""
        self.pinned_blocks = info["pinned_blocks"]
        self.pinned_tokens = info["pinned_tokens"]
        self.pin_generation = info.get("generation", -1)

    def expired(self, now: float) -> bool:
        """Idle past its TTL. A session whose write lock is held (a create filling it, a turn
        preparing, a whole-session operation) is in use, not idle."""
        idle = not self.busy and not self.write_lock.locked()
        return self.ttl_s > 0 and idle and now - self.last_used_at > self.ttl_s

    def to_public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "session",
            "version": self.version,
            "context_tokens": self.context_tokens,
            "pinned_blocks": self.pinned_blocks,
            "state": self.state,
            **({"error": self.error} if self.error else {}),
            "created_at": int(self.created_at),
            "last_used_at": int(self.last_used_at),
            "ttl_s": self.ttl_s,
            "queued_tokens": self.queued_tokens,
            "flash_queries": list(self.flash),
            "data_parallel_rank": self.data_parallel_rank,
            **({"restored": dict(self.restored)} if self.restored else {}),
        }

    def add_checkpoint(self, point: Checkpoint, window: int) -> None:
        """Record a version the session can return to; versions older than ``window`` before the
        newest are forgotten. A version whose content landed after a later one's (an append
        ingested after a turn that committed first) is no prefix of the history: not recorded."""
        if not self.checkpoints or point.version > self.checkpoints[-1].version:
            self.checkpoints.append(point)
        oldest = self.version - window
        while self.checkpoints and self.checkpoints[0].version < oldest:
            self.checkpoints.pop(0)


class SessionStore:
    """Live sessions by ``(tenant, id)``.

    ``get`` raises 404 (also for another tenant's id), ``create`` raises 409 on
    a taken id and 429 over the session limits.
    """

    def __init__(
        self,
        default_ttl_s: float,
        max_sessions: int = 1 << 30,
        max_per_tenant: int = 1 << 30,
        new_events: Callable[[], SessionEvents] | None = None,
        place: Callable[[list[Session]], int] | None = None,
    ) -> None:
        """``place``: the data-parallel rank for a new session, given the live ones."""
        self.default_ttl_s = default_ttl_s
        self.place = place
        self.new_events = new_events
        self.max_sessions = max_sessions
        self.max_per_tenant = max_per_tenant
        self._sessions: dict[tuple[str, str], Session] = {}
        self._by_key: dict[str, Session] = {}
        self._per_tenant: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def contains(self, tenant: str, session_id: str) -> bool:
        return (tenant, session_id) in self._sessions

    def by_key(self, key: str) -> Session | None:
        return self._by_key.get(key)

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def of_tenant(self, tenant: str) -> list[Session]:
        return [s for (t, _), s in self._sessions.items() if t == tenant]

    def create(self, tenant: str, session_id: str | None = None, ttl_s: float | None = None) -> Session:
        sid = session_id or new_session_id()
        if (tenant, sid) in self._sessions:
            raise SessionError(409, f"session '{sid}' already exists", "session_exists")
        if len(self._sessions) >= self.max_sessions:
            raise SessionError(
                429, f"the server holds its maximum of {self.max_sessions} sessions", "too_many_sessions", RETRY_AFTER_S
            )
        if self._per_tenant.get(tenant, 0) >= self.max_per_tenant:
            raise SessionError(
                429,
                f"this tenant holds its maximum of {self.max_per_tenant} sessions; delete some first",
                "too_many_sessions",
                RETRY_AFTER_S,
            )
        session = Session(id=sid, tenant=tenant, ttl_s=self.default_ttl_s if ttl_s is None else float(ttl_s))
        if self.place is not None:
            session.data_parallel_rank = self.place(self.all())
        if self.new_events is not None:
            session.events = self.new_events()
        self._sessions[(tenant, sid)] = session
        self._by_key[session.key] = session
        self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1
        return session

    def adopt(self, session: Session) -> None:
        """Add a restored session as it is (no limits: it was admitted before the restart)."""
        if (session.tenant, session.id) in self._sessions:
            raise SessionError(409, f"session '{session.id}' already exists", "session_exists")
        if self.new_events is not None:
            session.events = self.new_events()
        self._sessions[(session.tenant, session.id)] = session
        self._by_key[session.key] = session
        self._per_tenant[session.tenant] = self._per_tenant.get(session.tenant, 0) + 1

    def get(self, tenant: str, session_id: str) -> Session:
        session = self._sessions.get((tenant, session_id))
        if session is None:
            raise SessionError(404, f"session '{session_id}' not found", "session_not_found")
        return session

    def remove(self, session: Session) -> bool:
        """Remove exactly this incarnation (a newer one under the same id stays); marks it closed."""
        session.state = "closed"
        if self._sessions.get((session.tenant, session.id)) is not session:
            return False
        del self._sessions[(session.tenant, session.id)]
        self._by_key.pop(session.key, None)
        left = self._per_tenant[session.tenant] - 1
        if left:
            self._per_tenant[session.tenant] = left
        else:
            del self._per_tenant[session.tenant]
        return True

    def expired(self, now: float | None = None) -> list[Session]:
        now = time.time() if now is None else now
        return [s for s in self._sessions.values() if s.expired(now)]
