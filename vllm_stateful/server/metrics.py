"""Prometheus metrics for sessions, served on vLLM's own ``/metrics``.

Registered once per process in prometheus_client's default registry, which
vLLM's ``/metrics`` route exposes.
"""

from __future__ import annotations

from collections import Counter as Counter_

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

CLASS_LABELS = ("query", "plain", "ingest", "flash")  # engine/work_classes.WorkClass, lower-cased


class SessionMetrics:
    _instance: "SessionMetrics | None" = None

    def __new__(cls) -> "SessionMetrics":
        if cls._instance is None:  # prometheus forbids registering a name twice
            cls._instance = super().__new__(cls)
            cls._instance._create()
        return cls._instance

    def _create(self) -> None:
        p = "vllm_stateful:"
        self.sessions = Gauge(p + "sessions", "Live stateful sessions", registry=REGISTRY)
        self.pinned_blocks = Gauge(p + "pinned_blocks", "KV blocks pinned by live sessions", registry=REGISTRY)
        self.turns = Counter(p + "turns", "Committed session turns", registry=REGISTRY)
        self.recomputed = Counter(p + "recomputed_tokens", "Session tokens prefilled again", registry=REGISTRY)
        self.reused = Counter(p + "reused_tokens", "Session tokens served from pinned KV", registry=REGISTRY)
        self.closed = Counter(p + "sessions_closed", "Sessions closed", ["reason"], registry=REGISTRY)
        self.ingested = Counter(p + "ingested_tokens", "Tokens ingested by appends", registry=REGISTRY)
        self.ingest_batches = Counter(
            p + "ingest_batches", "Prefills run by ingestion (appends coalesced)", registry=REGISTRY
        )
        self.ingest_queued = Gauge(p + "ingest_queued_tokens", "Appended tokens not yet ingested", registry=REGISTRY)
        self.ingest_lag = Gauge(
            p + "ingest_lag_seconds", "Seconds from acknowledgement to ingestion of the last batch", registry=REGISTRY
        )
        self.query_latency = Histogram(
            p + "query_latency_seconds",
            "Latency of read-only session queries",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=REGISTRY,
        )

        self.ingest_failures = Counter(
            p + "ingest_failures", "Append batches that could not be ingested (session failed)", registry=REGISTRY
        )
        self.background_errors = Counter(
            p + "background_errors", "Errors in background tasks (they keep running)", ["task"], registry=REGISTRY
        )
        self.cold_sessions = Gauge(p + "cold_sessions", "Sessions whose KV the engine dropped", registry=REGISTRY)
        self.session_states = Gauge(p + "session_states", "Live sessions by state", ["state"], registry=REGISTRY)
        self.spilled = Counter(
            p + "spilled_sessions", "Idle sessions spilled out of the KV pool (admission: offload)", registry=REGISTRY
        )
        self.restored = Counter(p + "restored_sessions", "Sessions restored from the state dir", registry=REGISTRY)
        self.forks = Counter(p + "forks", "Sessions forked", registry=REGISTRY)
        self.moves = Counter(p + "moves", "Sessions moved to another data-parallel rank", registry=REGISTRY)
        self.rewinds = Counter(p + "rewinds", "Sessions rewound", registry=REGISTRY)
        self.charged_blocks = Gauge(
            p + "charged_blocks", "Blocks charged to sessions (pinned or reserved)", registry=REGISTRY
        )
        self.budget_blocks = Gauge(p + "budget_blocks", "The cell budget in blocks", registry=REGISTRY)
        self.engine = Gauge(
            p + "engine_events",
            "Engine-side session events: forged_tags (unsigned tags ignored), faults, dropped_* (sessions "
            "whose KV was released by a cache reset or weight update), flash_held_steps (steps that held "
            "flash evaluations back for foreground work), flash_shared_steps (steps that batched both), "
            "ingest_held_steps / ingest_yield_steps / ingest_share_steps (steps that held ingestion back, "
            "those of them that yielded to running foreground work, steps that gave it its share), "
            "ingest_bounded_steps / ingest_bounded_tokens (ingestion-only steps cut to ingest_step_tokens or "
            "to ingest_step_target_ms's bound, and their tokens), "
            "ingest_capped_admission_steps (admission steps under KV pressure that capped a running "
            "ingestion's chunk and admitted a waiting request beside it), "
            "referenced_tokens (history tokens spliced in from pins instead of sent), unresolved_references "
            "(requests whose pin had changed: resent whole)",
            ["event"],
            registry=REGISTRY,
        )

        self.flash_queries = Gauge(p + "flash_queries", "Registered flash queries", registry=REGISTRY)
        self.flash_evaluations = Counter(p + "flash_evaluations", "Flash-query answers computed", registry=REGISTRY)
        self.flash_superseded = Counter(
            p + "flash_superseded",
            "Session changes whose flash evaluation was skipped for a newer version",
            registry=REGISTRY,
        )
        self.flash_hits = Counter(
            p + "flash_hits", "Read-only queries answered from a flash query's cache", registry=REGISTRY
        )
        self.flash_answer_age = Histogram(
            p + "flash_answer_age_versions",
            "Versions behind the session of each flash answer read",
            buckets=(0, 1, 2, 4, 8, 16, 64),
            registry=REGISTRY,
        )
        self.event_subscribers = Gauge(p + "event_subscribers", "Open /events streams", registry=REGISTRY)

        # the engine's scheduler (engine/work_classes.py), refreshed from its ``info`` every second
        self.free_blocks = Gauge(p + "free_blocks", "KV blocks free in the engine's pool", registry=REGISTRY)
        self.fragmentation = Gauge(
            p + "fragmentation", "Unused token slots in pinned blocks / all pinned slots", registry=REGISTRY
        )
        self.queue_depth = Gauge(
            p + "class_queue_depth", "Engine requests per queue and work class", ["queue", "class"], registry=REGISTRY
        )
        self.class_wait = Gauge(
            p + "class_wait_seconds_sum", "Seconds requests waited for admission, by work class", ["class"],
            registry=REGISTRY,
        )  # fmt: skip
        self.class_wait_count = Gauge(
            p + "class_wait_count", "Requests admitted, by work class", ["class"], registry=REGISTRY
        )
        self.class_tokens = Gauge(
            p + "class_scheduled_tokens", "Tokens scheduled, by work class", ["class"], registry=REGISTRY
        )
        self.grouped_saved = Gauge(
            p + "grouped_prefill_tokens_saved",
            "Session prompt tokens served from blocks other requests computed (shared prefixes)",
            registry=REGISTRY,
        )
        self.scheduler_seconds = Gauge(
            p + "scheduler_seconds", "Seconds the engine spent in schedule()", registry=REGISTRY
        )
        self.step_seconds = Gauge(
            p + "step_seconds", "Wall seconds of engine steps that scheduled work", registry=REGISTRY
        )
        # per data-parallel rank (one rank: rank "0" only)
        self.rank_pinned_blocks = Gauge(
            p + "rank_pinned_blocks", "KV blocks pinned by sessions, per data-parallel rank", ["rank"],
            registry=REGISTRY,
        )  # fmt: skip
        self.rank_free_blocks = Gauge(
            p + "rank_free_blocks", "KV blocks free in the pool, per data-parallel rank", ["rank"], registry=REGISTRY
        )
        self.rank_sessions = Gauge(
            p + "rank_sessions", "Live sessions placed on each data-parallel rank", ["rank"], registry=REGISTRY
        )

    def refresh(self, service) -> None:
        store = service.store
        self.sessions.set(len(store))
        self.cold_sessions.set(sum(1 for s in store.all() if s.state == "cold"))
        by_state = Counter_(s.state for s in store.all())
        for state in ("resident", "offloaded", "cold", "failed"):
            self.session_states.labels(state=state).set(by_state.get(state, 0))
        if service.ledger is not None:
            self.charged_blocks.set(service.ledger.charged_blocks())
            self.budget_blocks.set(service.ledger.budget_blocks)
        per_rank = Counter_(s.data_parallel_rank for s in store.all())
        for rank in range(service.bridge.dp_size):
            self.rank_sessions.labels(rank=str(rank)).set(per_rank.get(rank, 0))

    def engine_counters(self, infos: list[dict]) -> None:
        """The engines' ``info``, one per data-parallel rank: totals, and pool gauges per rank."""
        for rank, one in enumerate(infos):
            self.rank_pinned_blocks.labels(rank=str(rank)).set(one.get("pinned_blocks", 0))
            self.rank_free_blocks.labels(rank=str(rank)).set(one.get("free_blocks", 0))
        info = combined(infos)
        for name, value in info.items():
            if name in ENGINE_EVENTS or name.startswith(("dropped_", "flash_", "ingest_")):
                self.engine.labels(event=name).set(value)
        self.pinned_blocks.set(info.get("pinned_blocks", 0))
        self.free_blocks.set(info.get("free_blocks", 0))
        self.fragmentation.set(info.get("fragmentation", 0.0))
        depth = info.get("depth", {})
        for label in CLASS_LABELS:
            for queue in ("running", "waiting"):
                self.queue_depth.labels(queue=queue, **{"class": label}).set(depth.get(f"{queue}_{label}", 0))
            self.class_wait.labels(**{"class": label}).set(info.get(f"wait_s_{label}", 0.0))
            self.class_wait_count.labels(**{"class": label}).set(info.get(f"wait_n_{label}", 0))
            self.class_tokens.labels(**{"class": label}).set(info.get(f"tokens_{label}", 0))
        self.grouped_saved.set(info.get("shared_prefix_tokens", 0))
        self.scheduler_seconds.set(info.get("schedule_s", 0.0))
        self.step_seconds.set(info.get("step_s", 0.0))


ENGINE_EVENTS = frozenset(
    {"forged_tags", "faults", "referenced_tokens", "unresolved_references", "prompts_sent_as_arrays"}
)
_PER_ENGINE = frozenset({"rank", "kv_epoch", "block_size", "max_model_len", "token_budget"})


def combined(infos: list[dict]) -> dict:
    """Several ranks' ``info`` as one: numbers and queue depths summed, fragmentation averaged."""
    if len(infos) == 1:
        return infos[0]
    out: dict = {}
    for info in infos:
        for name, value in info.items():
            if name == "depth":
                depth = out.setdefault("depth", {})
                for k, v in value.items():
                    depth[k] = depth.get(k, 0) + v
            elif name in _PER_ENGINE:
                out.setdefault(name, value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = out.get(name, 0) + value
    out["fragmentation"] = sum(i.get("fragmentation", 0.0) for i in infos) / len(infos)
    return out
