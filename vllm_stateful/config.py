"""Plugin settings, read from vLLM's own ``--additional-config '{"stateful": {...}}'``.

One frozen dataclass, validated once. Unknown keys are an error (a typo must
not silently fall back to a default). No vLLM import.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

ADMISSION_MODES = ("reject", "offload")
RESTORE_MODES = ("lazy", "eager")
STATE_DIR_OFF = "off"


@dataclass(frozen=True)
class StatefulConfig:
    """Defaults are what ``vllm-stateful serve`` runs with.

    cell_budget: KV token slots all sessions together may pin and reserve;
        ``None`` means 90% of the KV cache, capped so that one ``max_model_len``
        request always fits beside the pinned sessions (see ``Budget.for_engine``).
        Counted in whole blocks.
    session_quota: most tokens one session may hold; ``None`` means max_model_len.
    admission: what happens over budget. ``reject`` answers 429 with
        Retry-After; ``offload`` makes the least recently used idle sessions
        leave the KV pool (``offloaded`` or ``cold``) until the request fits, and
        answers 429 only when nothing idle is left to spill.
    state_dir: where durable session state lives (SQLite); ``None`` means
        ``$XDG_CACHE_HOME/vllm-stateful/state/<model tag>``, ``":memory:"``
        keeps it in memory (nothing survives), ``"off"`` disables it.
    restore: how restored sessions get their KV back after a restart:
        ``lazy`` (re-prefilled on first use) or ``eager`` (in the background,
        at ingestion priority, most recently used first).
    rewind_window: versions behind the newest a session can be rewound to.
    shared_state_root: replicas behind a session-affinity router: a directory on
        a volume every replica mounts, holding one state dir per replica
        (``state_dir`` must be directly inside it). A session this replica does
        not hold is taken over from the replica that does (``server/handoff.py``).
    session_header: one more header naming a request's session, beside
        ``X-Stateful-Session``: the header a session-affinity router hashes
        (``X-Session-ID`` for vllm-router's ``consistent_hash``), so a client
        names its session once. It must agree with a body ``stateful`` (400).
    advertise_url: where other replicas reach this one (e.g.
        ``http://10.0.0.5:8000``), for pulling a session from a live replica;
        default ``http://<host>:<port>`` of this server.
    default_ttl_s: idle seconds before a session expires; 0 disables expiry
        (an operator's choice: clients cannot ask for "never").
    min_ttl_s / max_ttl_s: bounds on a client's ``ttl_s``.
    max_flash_queries_per_session / max_flash_queries: registered flash
        queries per session and in all; beyond them 429.
    flash_max_wait_s: the largest ``wait_s`` a flash-query read may ask for.
    max_event_subscribers_per_session: open ``/events`` streams per session;
        beyond it 429.
    event_replay: events a session keeps for resuming with ``Last-Event-ID``.
    event_buffer: undelivered events kept per subscriber; a slower client
        loses the oldest and is told so by a ``lagged`` event.
    max_ingest_queue_tokens: per-session bound on appended-but-not-ingested
        tokens; beyond it appends get 429, and one append larger than it 413.
    max_sessions / max_sessions_per_tenant: live sessions in all and per
        tenant (``None``: same as ``max_sessions``); beyond them 429.
    max_request_body_bytes: largest body a session request or session route
        accepts (413 beyond it, checked before anything is parsed or tokenized).
    ingest_wait_timeout_s: longest a request waits for earlier appends to be
        ingested (read-your-writes) before it is answered 503 with Retry-After.
    tenant_header: when set, the tenant is also read from this header (set it
        only behind a gateway that sets and strips it); see ``sessions/tenants.py``.
    debug_routes: serve ``GET /v1/stateful/debug/integrity`` (off by default).
    ingest_share_tokens: ingestion tokens per engine step while session queries
        or other foreground work run: ingestion's minimum share, and the most a
        foreground step carries (see ``engine/work_classes.py``).
    max_ingest_hold_steps: consecutive steps ingestion may be held back while
        foreground requests wait to be admitted (then it gets its share).
    ingest_yield_steps: ingestion is held back in the first this many steps
        of a run of steps with foreground requests running or waiting (e.g.
        an answer being admitted and decoding), so a short answer's steps
        carry no ingestion; the rest of a longer run shares as with 0 (a share
        in every step beside foreground). Ingestion a query waits for is not
        held (it runs in the query class).
    ingest_step_tokens: the most tokens of an engine step that runs ingestion
        and no admittable foreground work (0: vLLM's whole step budget;
        ignored without chunked prefill). A query that arrives while an
        ingestion step runs waits for that step, so this bounds the wait;
        smaller steps cost ingestion some throughput (each step reads every
        weight once).
    ingest_step_target_ms: a wall-time target for those steps (0: none):
        their token bound follows the measured time per token of recent
        ones (``engine/ingest_step.py``), from ``ingest_share_tokens`` up to
        ``ingest_step_tokens``; so a query's wait for a running ingestion
        step is about this long once steps are measured, on whatever
        machine, at some cost in ingestion throughput where a step's fixed
        cost is a large part of it. Not below one ``ingest_share_tokens``
        step; and a step may overrun it once where tokens got dearer (a
        longer context) while only short steps ran, which are not measures.
    prefix_references: session requests send only the tokens after the
        engine's pinned prefix, which the engine splices back in (see
        ``engine/prefix_refs.py``); false sends every prompt whole (for A/B
        measurements; the answers are the same).
    """

    cell_budget: int | None = None
    session_quota: int | None = None
    admission: str = "reject"
    default_ttl_s: float = 3600.0
    min_ttl_s: float = 1.0
    max_ttl_s: float = 86400.0
    max_flash_queries_per_session: int = 8
    max_flash_queries: int = 1024
    flash_max_wait_s: float = 60.0
    max_event_subscribers_per_session: int = 16
    event_replay: int = 256
    event_buffer: int = 256
    max_ingest_queue_tokens: int = 8192
    max_sessions: int = 4096
    max_sessions_per_tenant: int | None = None
    max_request_body_bytes: int = 4 * 1024 * 1024
    ingest_wait_timeout_s: float = 120.0
    tenant_header: str | None = None
    debug_routes: bool = False
    ingest_share_tokens: int = 64
    max_ingest_hold_steps: int = 1
    ingest_yield_steps: int = 8
    ingest_step_tokens: int = 512
    ingest_step_target_ms: int = 0
    prefix_references: bool = True
    state_dir: str | None = None
    restore: str = "lazy"
    rewind_window: int = 64
    shared_state_root: str | None = None
    session_header: str | None = None
    advertise_url: str | None = None

    def __post_init__(self) -> None:
        if self.admission not in ADMISSION_MODES:
            raise ValueError(f"stateful.admission must be one of {ADMISSION_MODES}, got {self.admission!r}")
        if self.restore not in RESTORE_MODES:
            raise ValueError(f"stateful.restore must be one of {RESTORE_MODES}, got {self.restore!r}")
        if self.state_dir is not None and (not isinstance(self.state_dir, str) or not self.state_dir):
            raise ValueError("stateful.state_dir must be a directory path, ':memory:', 'off' or null")
        if self.shared_state_root is not None:
            if not isinstance(self.shared_state_root, str) or not self.shared_state_root:
                raise ValueError("stateful.shared_state_root must be a directory path or null")
            if self.state_dir in (None, ":memory:", STATE_DIR_OFF):
                raise ValueError(
                    "stateful.shared_state_root needs this replica's own state_dir inside it "
                    "(e.g. --state-dir ROOT/replica-0 --shared-state-root ROOT)"
                )
        if self.session_header is not None and (
            not isinstance(self.session_header, str) or not self.session_header.strip()
        ):
            raise ValueError("stateful.session_header must be a header name or null")
        if self.advertise_url is not None and (
            not isinstance(self.advertise_url, str) or not self.advertise_url.startswith(("http://", "https://"))
        ):
            raise ValueError("stateful.advertise_url must be an http(s) URL or null")
        for name in ("cell_budget", "session_quota", "max_sessions_per_tenant"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ValueError(f"stateful.{name} must be a positive integer or null, got {value!r}")
        for name in (
            "max_flash_queries_per_session",
            "max_flash_queries",
            "max_event_subscribers_per_session",
            "event_replay",
            "event_buffer",
            "max_ingest_queue_tokens",
            "max_sessions",
            "ingest_share_tokens",
            "rewind_window",
        ):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"stateful.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not _positive_int(self.max_request_body_bytes) or self.max_request_body_bytes < 1024:
            raise ValueError("stateful.max_request_body_bytes must be an integer >= 1024")
        for name in ("default_ttl_s", "min_ttl_s", "max_ttl_s", "ingest_wait_timeout_s", "flash_max_wait_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"stateful.{name} must be a finite number >= 0, got {value!r}")
        if not 0 < self.min_ttl_s <= self.max_ttl_s:
            raise ValueError("stateful.min_ttl_s must be > 0 and <= max_ttl_s")
        if self.default_ttl_s != 0 and not self.min_ttl_s <= self.default_ttl_s <= self.max_ttl_s:
            raise ValueError("stateful.default_ttl_s must be 0 (never) or within [min_ttl_s, max_ttl_s]")
        if self.ingest_wait_timeout_s <= 0:
            raise ValueError("stateful.ingest_wait_timeout_s must be positive")
        if self.tenant_header is not None and (not isinstance(self.tenant_header, str) or not self.tenant_header):
            raise ValueError("stateful.tenant_header must be a header name or null")
        if not _positive_int(self.max_ingest_hold_steps) or self.max_ingest_hold_steps > 1000:
            raise ValueError("stateful.max_ingest_hold_steps must be an integer in [1, 1000]")
        steps = self.ingest_yield_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= 1000:
            raise ValueError("stateful.ingest_yield_steps must be an integer in [0, 1000]")
        cap = self.ingest_step_tokens
        if not isinstance(cap, int) or isinstance(cap, bool) or not 0 <= cap <= 1 << 20:
            raise ValueError("stateful.ingest_step_tokens must be an integer in [0, 1048576]")
        target = self.ingest_step_target_ms
        if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target <= 600_000:
            raise ValueError("stateful.ingest_step_target_ms must be an integer in [0, 600000]")
        for name in ("debug_routes", "prefix_references"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"stateful.{name} must be true or false")

    @property
    def tenant_session_limit(self) -> int:
        return self.max_sessions_per_tenant or self.max_sessions

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "StatefulConfig":
        """Parse vLLM's additional_config (a dict or JSON string); missing -> defaults."""
        if additional_config is None or additional_config == "":
            return cls()
        if isinstance(additional_config, str):
            additional_config = json.loads(additional_config)
        if not isinstance(additional_config, dict):
            raise ValueError("additional_config must be a JSON object")
        section = additional_config.get("stateful", {}) or {}
        if not isinstance(section, dict):
            raise ValueError("additional_config.stateful must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"unknown stateful config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**section)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
