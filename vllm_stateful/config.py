"""Plugin settings, read from vLLM's own ``--additional-config '{"stateful": {...}}'``.

One frozen dataclass, validated once. Unknown keys are an error (a typo must
not silently fall back to a default). No vLLM import.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

ADMISSION_MODES = ("reject", "offload")


@dataclass(frozen=True)
class StatefulConfig:
    """Defaults are what ``vllm-stateful serve`` runs with.

    cell_budget: KV token slots all sessions together may pin; ``None`` means
        90% of the engine's KV cache. Pinned tokens are counted in whole blocks.
    session_quota: most tokens one session may hold; ``None`` means max_model_len.
    admission: what happens over budget. ``reject`` answers 429 with
        Retry-After; ``offload`` (spill to CPU) is reserved and refused for now.
    default_ttl_s: idle seconds before a session expires; 0 disables expiry.
    max_flash_queries_per_session: reserved for flash queries.
    max_ingest_queue_tokens: per-session bound on appended-but-not-ingested
        tokens; beyond it appends get 429 (nothing is dropped).
    """

    cell_budget: int | None = None
    session_quota: int | None = None
    admission: str = "reject"
    default_ttl_s: float = 3600.0
    max_flash_queries_per_session: int = 8
    max_ingest_queue_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.admission not in ADMISSION_MODES:
            raise ValueError(f"stateful.admission must be one of {ADMISSION_MODES}, got {self.admission!r}")
        if self.admission == "offload":
            raise ValueError("stateful.admission='offload' (spill to CPU) is not implemented yet; use 'reject'")
        for name in ("cell_budget", "session_quota"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"stateful.{name} must be a positive integer or null, got {value!r}")
        if self.default_ttl_s < 0:
            raise ValueError("stateful.default_ttl_s must be >= 0")
        if self.max_ingest_queue_tokens <= 0:
            raise ValueError("stateful.max_ingest_queue_tokens must be positive")

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
        known = {f.name for f in fields(cls)}
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"unknown stateful config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**section)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
