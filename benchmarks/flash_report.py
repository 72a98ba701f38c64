"""Pure helpers for the flash-query benchmark (``flash_benchmark.py``): rows, latency per context
third, answer freshness, the two-factor ablation and the Markdown summary.

Nothing here talks to a server or imports vLLM; tested in ``tests/unit/test_flash_report.py``.

Ablation: with p50 latencies ``pc`` (stock vLLM, prefix cache), ``sq`` (stateful read-only query)
and ``fl`` (flash answer read), the total speed-up ``pc/fl`` is the product of ``pc/sq`` (stateful
KV reuse) and ``sq/fl`` (flash queries), so on a log scale the shares add up to one:
``share_kv = log(pc/sq) / log(pc/fl)``, ``share_flash = log(sq/fl) / log(pc/fl)``. A share can be
negative (that factor slowed things down) or above one; shares are None when there is no total
speed-up to split (``pc/fl <= 1``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

from streaming_report import QueryRow, percentile

FLASH, STATEFUL_QUERY, PREFIX_CACHE = "flash", "stateful-query", "vllm-prefix-cache"
PROVIDERS = (FLASH, STATEFUL_QUERY, PREFIX_CACHE)
THIRDS = ("early", "middle", "late")


@dataclass
class FlashRow(QueryRow):
    """A streaming ``QueryRow`` plus where in the feed it was asked and, for ``flash``, how fresh the
    cached answer was: ``versions_behind = current_version (last append's 202) - answer_version``."""

    after_tick: int = -1
    third: str = ""
    current_version: int | None = None
    answer_version: int | None = None
    versions_behind: int | None = None
    stale: bool | None = None
    confidence: float | None = None
    answer_age_s: float | None = None
    evaluations: int | None = None  # times the flash query had been answered when read
    flash_error: str | None = None  # the flash query's last evaluation error, if any
    flash_hit: bool | None = None


def third_of(after_tick: int, n_ticks: int) -> str:
    """``early``/``middle``/``late``: which third of the feed tick ``after_tick`` falls in."""
    if not 0 <= after_tick < n_ticks:
        raise ValueError(f"tick {after_tick} outside a feed of {n_ticks}")
    return THIRDS[min(2, 3 * after_tick // n_ticks)]


def versions_behind(current: int | None, answer: int | None) -> int | None:
    return None if current is None or answer is None else current - answer


@dataclass(frozen=True)
class LatencyStat:
    provider: str
    third: str  # a THIRDS label, or "all"
    n: int
    ctx_min: int
    ctx_max: int
    p50_s: float
    p95_s: float


def latency_table(rows: Sequence[FlashRow]) -> list[LatencyStat]:
    """p50/p95 latency per (provider, third) and per provider over all questions ("all" last)."""
    out = []
    for p in dict.fromkeys(r.provider for r in rows):
        mine = [r for r in rows if r.provider == p]
        for label in (*THIRDS, "all"):
            rs = [r for r in mine if label in ("all", r.third)]
            if rs:
                lat, ctx = [r.latency_s for r in rs], [r.context_tokens for r in rs]
                out.append(LatencyStat(p, label, len(rs), min(ctx), max(ctx), percentile(lat, 50), percentile(lat, 95)))
    return out


@dataclass(frozen=True)
class Freshness:
    n: int
    answered: int  # reads that found an answer at all
    mean_behind: float | None
    max_behind: int | None
    share_fresh: float | None  # answered reads 0 versions behind
    share_stale: float | None  # reads the server flagged stale (unanswered included)
    answer_age_p50_s: float | None


def freshness(rows: Sequence[FlashRow]) -> Freshness:
    """Freshness of the flash answers read (rows of other providers are ignored)."""
    rs = [r for r in rows if r.provider == FLASH]
    behind = [r.versions_behind for r in rs if r.versions_behind is not None]
    ages = [r.answer_age_s for r in rs if r.answer_age_s is not None]
    return Freshness(
        len(rs),
        len(behind),
        statistics.fmean(behind) if behind else None,
        max(behind) if behind else None,
        sum(b == 0 for b in behind) / len(behind) if behind else None,
        sum(bool(r.stale) for r in rs) / len(rs) if rs else None,
        percentile(ages, 50) if ages else None,
    )


@dataclass(frozen=True)
class Ablation:
    third: str
    pc_s: float
    sq_s: float
    fl_s: float
    speedup_total: float  # pc / fl
    speedup_kv: float  # pc / sq: stateful KV reuse
    speedup_flash: float  # sq / fl: flash queries
    share_kv: float | None
    share_flash: float | None


def ablation(pc_s: float, sq_s: float, fl_s: float, third: str = "all") -> Ablation:
    """Split the total speed-up ``pc/fl`` into its two factors (log-ratio shares, see module doc)."""
    if min(pc_s, sq_s, fl_s) <= 0:
        raise ValueError("latencies must be positive")
    total, kv, fl = pc_s / fl_s, pc_s / sq_s, sq_s / fl_s
    if total <= 1:
        return Ablation(third, pc_s, sq_s, fl_s, total, kv, fl, None, None)
    return Ablation(
        third, pc_s, sq_s, fl_s, total, kv, fl, math.log(kv) / math.log(total), math.log(fl) / math.log(total)
    )


def ablation_table(stats: Sequence[LatencyStat]) -> list[Ablation]:
    """One ``Ablation`` of p50 latencies per third (and "all") where all three providers have rows."""
    p50 = {(s.provider, s.third): s.p50_s for s in stats}
    out = []
    for label in (*THIRDS, "all"):
        keys = [(p, label) for p in (PREFIX_CACHE, STATEFUL_QUERY, FLASH)]
        if all(k in p50 for k in keys):
            out.append(ablation(*(p50[k] for k in keys), third=label))
    return out


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def markdown_report(stats: Sequence[LatencyStat], fresh: Freshness, abl: Sequence[Ablation], machine: str) -> str:
    """Latency per provider and third, flash freshness, the ablation, and the machine line."""
    lines = ["| provider | feed third | n | context tokens | p50 (s) | p95 (s) |", "|---|---|---:|---|---:|---:|"]
    lines += [
        f"| {s.provider} | {s.third} | {s.n} | {s.ctx_min}-{s.ctx_max} | {s.p50_s:.4f} | {s.p95_s:.4f} |" for s in stats
    ]
    if fresh.n:
        lines += [
            "",
            f"flash answer freshness (versions behind the last acknowledged append): answered {fresh.answered}/"
            f"{fresh.n}, mean {_f(fresh.mean_behind, '.2f')}, max {fresh.max_behind}, 0 behind "
            f"{_pct(fresh.share_fresh)}, flagged stale {_pct(fresh.share_stale)}, "
            f"answer age p50 {_f(fresh.answer_age_p50_s)}s",
        ]
    if abl:
        lines += [
            "",
            "| feed third | prefix-cache p50 (s) | stateful-query p50 (s) | flash p50 (s) | KV reuse x | flash x "
            "| total x | share KV | share flash |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {a.third} | {a.pc_s:.4f} | {a.sq_s:.4f} | {a.fl_s:.4f} | {a.speedup_kv:.1f} | {a.speedup_flash:.1f} "
            f"| {a.speedup_total:.1f} | {_f(a.share_kv, '.2f')} | {_f(a.share_flash, '.2f')} |"
            for a in abl
        ]
    lines += ["", machine]
    return "\n".join(lines) + "\n"
