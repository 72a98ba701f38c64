"""Inter-turn latency of many concurrent sessions: does a turn get slower as its session grows?

``--sessions`` sessions run at once, one client thread each; every session is ``--turns`` sequential
turns of ``--input-len`` new (seeded random) token ids and ``--gen-len`` generated tokens (greedy,
``ignore_eos``). A turn's latency is the client's wall time of one non-streaming completion request.
Providers, one after another on the same machine, model and server flags:

* ``stateful`` (vllm-stateful): each session is created with ``POST /v1/sessions {"id"}``; a turn
  sends only its new tokens (``"stateful": id``); the session is deleted at the end.
* ``vllm-apc`` (stock vLLM, ``--enable-prefix-caching``): a turn sends the full history, every earlier
  input and generated token id plus the new ones.

Before the timed run, each server gets an untimed round of ``--warmup-turns`` turns of as many
concurrent sessions (other token ids), so one-time costs land in neither window.
Head = mean latency of turns 2..``--head``+1 (turn 1 is skipped: it has no history), tail = mean of
the last ``--tail`` turns, both over all sessions; tail/head near 1 means a turn does not slow down as
the context grows. Correctness: session 0's generated ids must be equal for both providers, turn by
turn (greedy); mismatches are printed, recorded, and make the exit status 1.

Outputs under ``--out-dir``: ``turns.csv`` (every turn), ``summary.md`` and ``summary.json`` (head,
tail, ratios, mismatches, the machine: CPU model and ISA flags), ``latency.png`` (latency by turn,
mean over sessions, one line per provider).

    python benchmarks/session_latency.py                          # tiny model, 8 sessions x 150 turns
    python benchmarks/session_latency.py --sessions 2 --turns 12 --out-dir /tmp/sl
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness.http import post_timed
from harness.machine import cpu_env, machine_info, machine_line, model_dir, serving_dtype, wrapped_slice
from harness.results import (
    command_line,
    out_path,
    pyplot,
    record_command,
    save_figure,
    summary_header,
    write_json,
    write_rows,
)
from harness.servers import launched_server

STATEFUL, APC = "stateful", "vllm-apc"
PROVIDERS = {STATEFUL: ("stateful", []), APC: ("vllm", ["--enable-prefix-caching"])}
COMMON_ARGS = ["--block-size", "32", "--max-model-len", "8192", "--enforce-eager", "--enable-prompt-tokens-details"]
SERVED = "bench"
FIELDS = ["provider", "session", "turn", "context_tokens", "sent_tokens", "cached_tokens", "recomputed_tokens",
          "latency_s"]  # fmt: skip
TOKEN_LOW, TOKEN_HIGH = 100, 3000
WARMUP_OFFSET = 1_000  # warm-up sessions' token ids: seeded as sessions 1000, 1001, ...


@dataclass
class TurnRow:
    """One measured turn; ``output_ids`` (the generated token ids) stays out of the CSV."""

    provider: str
    session: int
    turn: int
    context_tokens: int
    sent_tokens: int
    cached_tokens: int
    recomputed_tokens: int
    latency_s: float
    output_ids: list[int] = field(default_factory=list)


# ---------------------------------------------------------------- pure helpers


def session_chunks(
    seed: int, session: int, turns: int, input_len: int, text: list[int] | None = None
) -> list[list[int]]:
    """The new token ids of every turn of one session, different for every session: consecutive
    slices of ``text`` (token ids of ordinary text, as SGLang's test uses) from a seeded offset, or
    seeded random ids without it. Random ids often end inside a character, which makes vLLM's
    detokenizer decode the whole prompt per request (patches/README.md, note 5): not what text costs."""
    rng = random.Random(seed * 1_000_003 + session)
    if text is None:
        return [[rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(input_len)] for _ in range(turns)]
    ids = wrapped_slice(text, rng.randrange(len(text)), turns * input_len)
    return [ids[i * input_len : (i + 1) * input_len] for i in range(turns)]


def window_turns(turns: int, head: int, tail: int) -> tuple[list[int], list[int]]:
    """(head turns, tail turns), 1-based: head = 2..head+1 (turn 1 skipped), tail = the last ``tail``."""
    head_turns = list(range(2, min(turns, head + 1) + 1))
    tail_turns = list(range(max(1, turns - tail + 1), turns + 1))
    return head_turns, tail_turns


def mean_latency(rows: list[TurnRow], turns: list[int]) -> float | None:
    """Mean latency (s) of ``rows`` whose turn is in ``turns`` (all sessions pooled); None if none."""
    wanted = set(turns)
    picked = [r.latency_s for r in rows if r.turn in wanted]
    return statistics.mean(picked) if picked else None


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def provider_stats(rows: list[TurnRow], turns: int, head: int, tail: int) -> dict[str, dict[str, Any]]:
    """Per provider (in the order first seen): head and tail mean latency, tail/head, token totals."""
    head_turns, tail_turns = window_turns(turns, head, tail)
    stats: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r.provider for r in rows):
        mine = [r for r in rows if r.provider == name]
        head_s, tail_s = mean_latency(mine, head_turns), mean_latency(mine, tail_turns)
        stats[name] = {
            "sessions": len({r.session for r in mine}),
            "turns": len(mine),
            "head_s": head_s,
            "tail_s": tail_s,
            "tail_over_head": ratio(tail_s, head_s),
            "final_context_tokens": max(r.context_tokens for r in mine),
            "recomputed_after_turn_1": sum(r.recomputed_tokens for r in mine if r.turn > 1),
        }
    return stats


def summary_rows(stats: dict[str, dict[str, Any]], baseline: str = APC) -> list[dict[str, Any]]:
    """One row per provider; ``tail_vs_baseline`` = its tail / the baseline's tail (None without one)."""
    base_tail = stats.get(baseline, {}).get("tail_s")
    return [{"provider": name, **s, "tail_vs_baseline": ratio(s["tail_s"], base_tail)} for name, s in stats.items()]


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def summary_table(rows: list[dict[str, Any]], turns: int, head: int, tail: int, baseline: str = APC) -> str:
    """Markdown table of ``summary_rows``."""
    head_turns, tail_turns = window_turns(turns, head, tail)
    hw = f"{head_turns[0]}-{head_turns[-1]}" if head_turns else "-"
    tw = f"{tail_turns[0]}-{tail_turns[-1]}"
    lines = [
        f"| provider | sessions | head ms (turns {hw}) | tail ms (turns {tw}) | tail/head | tail vs {baseline} tail "
        "| final context | recomputed after turn 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['provider']} | {r['sessions']} | {_ms(r['head_s'])} | {_ms(r['tail_s'])} | "
            f"{_times(r['tail_over_head'])} | {_times(r['tail_vs_baseline'])} | {r['final_context_tokens']} | "
            f"{r['recomputed_after_turn_1']} |"
        )
    return "\n".join(lines)


def mean_by_turn(rows: list[TurnRow]) -> dict[str, list[tuple[int, float]]]:
    """Per provider: (turn, mean latency over sessions) sorted by turn."""
    acc: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        acc.setdefault(r.provider, {}).setdefault(r.turn, []).append(r.latency_s)
    return {p: [(t, statistics.mean(v)) for t, v in sorted(by.items())] for p, by in acc.items()}


def output_mismatches(a: list[list[int]], b: list[list[int]]) -> list[int]:
    """1-based turns whose generated ids differ (a missing turn counts as a mismatch)."""
    return [i + 1 for i in range(max(len(a), len(b))) if i >= len(a) or i >= len(b) or a[i] != b[i]]


# ---------------------------------------------------------------- clients


def _post(base: str, path: str, body: dict) -> tuple[float, dict]:
    """(seconds to the full response, its JSON); a connection per request, as a plain client."""
    return post_timed(httpx, base + path, body, 200, 201, timeout=600)


def _cached(body: dict) -> int:
    return ((body.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def _request(prompt: list[int], gen_len: int, **extra: Any) -> dict:
    return {"model": SERVED, "prompt": prompt, "max_tokens": gen_len, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **extra}  # fmt: skip


def stateful_turn(base: str, sid: str, session: int, turn: int, chunk: list[int], gen_len: int) -> TurnRow:
    latency, body = _post(base, "/completions", _request(chunk, gen_len, stateful=sid))
    s = body["session"]
    return TurnRow(STATEFUL, session, turn, s["context_tokens"], len(chunk), _cached(body), s["recomputed_tokens"],
                   latency, list(body["choices"][0]["token_ids"]))  # fmt: skip


def apc_turn(base: str, history: list[int], session: int, turn: int, chunk: list[int], gen_len: int) -> TurnRow:
    """One stateless turn; recomputed = history tokens that had KV before it (all but the last
    generated one) minus what the prefix cache supplied."""
    prompt = history + chunk
    latency, body = _post(base, "/completions", _request(prompt, gen_len))
    cached = _cached(body)
    recomputed = max(0, len(history) - 1 - cached)
    return TurnRow(APC, session, turn, len(prompt), len(prompt), cached, recomputed, latency,
                   list(body["choices"][0]["token_ids"]))  # fmt: skip


def run_session(
    base: str, provider: str, session: int, chunks: list[list[int]], gen_len: int, prefix: str = "latency"
) -> list[TurnRow]:
    """Every turn of one session, in order (a stateful session is named ``{prefix}-{session}``)."""
    rows: list[TurnRow] = []
    if provider == STATEFUL:
        sid = f"{prefix}-{session}"
        _post(base, "/sessions", {"id": sid})
        for turn, chunk in enumerate(chunks, 1):
            rows.append(stateful_turn(base, sid, session, turn, chunk, gen_len))
        httpx.delete(f"{base}/sessions/{sid}", timeout=60).raise_for_status()
        return rows
    history: list[int] = []
    for turn, chunk in enumerate(chunks, 1):
        rows.append(apc_turn(base, history, session, turn, chunk, gen_len))
        history += chunk + rows[-1].output_ids
    return rows


def run_provider(
    base: str, provider: str, chunks: list[list[list[int]]], gen_len: int, prefix: str = "latency"
) -> list[TurnRow]:
    """All sessions at once, one thread each, released together."""
    gate = threading.Barrier(len(chunks))

    def one(session: int) -> list[TurnRow]:
        gate.wait()
        return run_session(base, provider, session, chunks[session], gen_len, prefix)

    with ThreadPoolExecutor(len(chunks)) as pool:
        return [row for rows in pool.map(one, range(len(chunks))) for row in rows]


# ---------------------------------------------------------------- servers and outputs


def warmup_chunks(args: argparse.Namespace) -> list[list[list[int]]]:
    """The untimed warm-up round: as many sessions, ``--warmup-turns`` turns, other token ids."""
    n, size = args.warmup_turns, args.input_len
    return [session_chunks(args.seed, WARMUP_OFFSET + s, n, size, args.text) for s in range(args.sessions)]


def bench_provider(name: str, args: argparse.Namespace, chunks: list[list[list[int]]]) -> list[TurnRow]:
    kind, extra = PROVIDERS[name]
    server_args = [*COMMON_ARGS, "--dtype", serving_dtype(args.model), *extra]
    log = args.out_dir / "logs" / f"{name}.log"
    with launched_server(kind, str(model_dir(args.model)), SERVED, server_args, log, cpu_env()) as base:
        _post(base, "/completions", _request([5, 6, 7], 2))  # warm-up, outside the measured turns
        if args.warmup_turns:
            run_provider(base, name, warmup_chunks(args), args.gen_len, prefix="warmup")
        started = time.perf_counter()
        rows = run_provider(base, name, chunks, args.gen_len)
    print(f"[{name}] {len(rows)} turns in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return rows


def correctness(rows: list[TurnRow], session: int = 0) -> dict[str, Any]:
    """Session ``session``'s generated ids, stateful vs vllm-apc, turn by turn."""
    outs = {p: [r.output_ids for r in sorted(rows, key=lambda r: r.turn) if r.provider == p and r.session == session]
            for p in (STATEFUL, APC)}  # fmt: skip
    if not outs[STATEFUL] or not outs[APC]:
        return {"checked": False, "reason": "needs both stateful and vllm-apc"}
    bad = output_mismatches(outs[STATEFUL], outs[APC])
    details = [{"turn": t, STATEFUL: _at(outs[STATEFUL], t), APC: _at(outs[APC], t)} for t in bad]
    return {"checked": True, "session": session, "turns": len(outs[STATEFUL]), "mismatched_turns": bad,
            "first_mismatch": details[0] if details else None}  # fmt: skip


def _at(outs: list[list[int]], turn: int) -> list[int] | None:
    return outs[turn - 1] if turn <= len(outs) else None


def plot(rows: list[TurnRow], head_turns: list[int], tail_turns: list[int], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    for name, pts in mean_by_turn(rows).items():
        turns, lat = zip(*pts)
        ax.plot(turns, [x * 1000 for x in lat], label=name)
    for window in (head_turns, tail_turns):
        if window:
            ax.axvspan(window[0] - 0.5, window[-1] + 0.5, color="grey", alpha=0.12)
    ax.set_xlabel("turn")
    ax.set_ylabel("turn latency, mean over sessions (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("Inter-turn latency of concurrent sessions (shaded: head and tail windows)")
    ax.legend()
    save_figure(fig, path, dpi=120)


def write_outputs(rows: list[TurnRow], args: argparse.Namespace, verdict: dict[str, Any]) -> str:
    """CSV, PNG, summary.md, summary.json; returns the summary table."""
    out = args.out_dir
    table_rows = summary_rows(provider_stats(rows, args.turns, args.head, args.tail))
    table = summary_table(table_rows, args.turns, args.head, args.tail)
    machine = machine_info()
    write_rows(rows, out / "turns.csv", FIELDS)
    plot(rows, *window_turns(args.turns, args.head, args.tail), out / "latency.png")
    config = {k: v for k, v in vars(args).items() if k != "text"}
    config["text"] = "random ids" if args.text is None else f"{len(args.text)} token ids of the demo corpus"
    write_json({"command": command_line(), "config": config, "machine": machine, "providers": table_rows,
                "correctness": verdict}, out / "summary.json")  # fmt: skip
    title = f"Inter-turn latency, {args.sessions} concurrent sessions x {args.turns} turns"
    details = (f"model `{args.model}` ({serving_dtype(args.model)}); {args.input_len} new tokens + {args.gen_len} "
               "generated (greedy, ignore_eos) per turn.")  # fmt: skip
    head = summary_header(title, details, machine_line(machine))
    (out / "summary.md").write_text(f"{head}{table}\n\n{correctness_line(verdict)}\n")
    return table


def correctness_line(check: dict[str, Any]) -> str:
    if not check.get("checked"):
        return f"Correctness not checked ({check.get('reason')})."
    bad = check["mismatched_turns"]
    if not bad:
        return f"Correctness: session {check['session']}'s generated ids are equal for both, {check['turns']} turns."
    return f"MISMATCH: session {check['session']}, turns {bad} differ (first: {check['first_mismatch']})."


def options(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | small (demo models) or a model directory")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=150)
    p.add_argument("--input-len", type=int, default=16)
    p.add_argument("--gen-len", type=int, default=8)
    p.add_argument("--head", type=int, default=10, help="turns averaged after turn 1")
    p.add_argument("--tail", type=int, default=10, help="last turns averaged")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-ids", action="store_true", help="random token ids instead of slices of text")
    p.add_argument("--warmup-turns", type=int, default=3, help="untimed turns of other sessions first (0: none)")
    p.add_argument("--providers", default=f"{STATEFUL},{APC}", help="comma-separated: " + ", ".join(PROVIDERS))
    p.add_argument("--out-dir", type=Path, default=out_path("benchmarks/results/session_latency"))
    a = p.parse_args(argv)
    a.providers = [x.strip() for x in a.providers.split(",") if x.strip()]
    unknown = [x for x in a.providers if x not in PROVIDERS]
    if unknown or not a.providers:
        p.error(f"unknown providers {unknown}; choose from {list(PROVIDERS)}")
    if a.turns < 2 or a.sessions < 1:
        p.error("need --turns >= 2 and --sessions >= 1")
    a.text = None  # token ids of text to slice turns from (main loads them from the model's tokenizer)
    return a


def main(argv: list[str] | None = None) -> int:
    record_command(__file__, argv)
    args = options(argv)
    from vllm_stateful.demo_model import corpus_token_ids

    args.text = None if args.random_ids else corpus_token_ids(model_dir(args.model))
    chunks = [session_chunks(args.seed, s, args.turns, args.input_len, args.text) for s in range(args.sessions)]
    rows = [row for name in args.providers for row in bench_provider(name, args, chunks)]
    verdict = correctness(rows)
    print(write_outputs(rows, args, verdict))
    print(correctness_line(verdict))
    return 1 if verdict.get("mismatched_turns") else 0


if __name__ == "__main__":
    raise SystemExit(main())
