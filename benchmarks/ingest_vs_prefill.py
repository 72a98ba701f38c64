"""Ingestion speed vs stock vLLM's prefill of the same tokens at the same context length.

For each context length L in ``--contexts`` and chunk size C in ``--chunks``: vllm-stateful appends C
tokens to a session holding L tokens (``wait: true``: acknowledged, prefilled, committed); stock vLLM
(prefix caching on) gets the same L tokens once, untimed, so its cache holds them, then the prompt L + C
with ``max_tokens: 1`` (it prefills the C new tokens and samples one). Both on the same model, one server
after the other. tokens/s = C / seconds; the ratio is ours ÷ stock (≥ 1: we ingest as fast).
Each cell is the median of ``--repeats`` runs, each on a fresh context (a new session / a new prefix).

    python benchmarks/ingest_vs_prefill.py [--model small] [--contexts 1000,6000] [--chunks 17,128,512,2048]

Writes ``ingest_vs_prefill.csv``, ``summary.md`` and ``machine.json`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import httpx
from harness.config import int_list
from harness.http import append_wait, check, post_timed
from harness.machine import corpus_ids, cpu_env, machine_info, machine_line, model_dir, serving_dtype
from harness.results import out_path, record_command, summary_header, write_json, write_rows, write_text
from harness.servers import launched_server

COLUMNS = ("provider", "context", "chunk", "repeat", "seconds")


def ours(base: str, history: list[int], chunk: list[int], sid: str) -> float:
    """Seconds to append ``chunk`` (wait for it) to a session holding ``history``."""
    with httpx.Client(base_url=base, timeout=600) as c:
        check(c.post("/sessions", json={"id": sid}), 200, 201)
        for i in range(0, len(history), 4000):
            append_wait(c, f"/sessions/{sid}/append", history[i : i + 4000])
        seconds, _ = append_wait(c, f"/sessions/{sid}/append", chunk)
        c.delete(f"/sessions/{sid}")
    return seconds


def stock(base: str, history: list[int], chunk: list[int]) -> float:
    """Seconds for stock vLLM to prefill ``chunk`` after a cached ``history`` (and sample one token)."""
    with httpx.Client(base_url=base, timeout=600) as c:
        body = {"model": "bench", "max_tokens": 1, "temperature": 0}
        post_timed(c, "/completions", {**body, "prompt": history})  # caches the history's full blocks
        return post_timed(c, "/completions", {**body, "prompt": history + chunk})[0]


def run(kind: str, base: str, cases: list[tuple[int, int, int]], model: str) -> list[dict]:
    rows = []
    for i, (context, size, repeat) in enumerate(cases):
        tokens = corpus_ids(model, context + size, offset=7919 * (i + 1))
        history, chunk = tokens[:context], tokens[context:]
        secs = ours(base, history, chunk, f"ivp-{i}") if kind == "stateful" else stock(base, history, chunk)
        rows.append({"provider": kind, "context": context, "chunk": size, "repeat": repeat, "seconds": secs})
        print(f"[{kind}] context {context} chunk {size}: {size / secs:.0f} tokens/s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    cells: dict[tuple[int, int], dict[str, float]] = {}
    for r in rows:
        cells.setdefault((r["context"], r["chunk"]), {}).setdefault(r["provider"], [])
        cells[(r["context"], r["chunk"])][r["provider"]].append(r["seconds"])
    lines = ["| context | chunk | stateful tok/s | stock tok/s | ratio |", "|---|---|---|---|---|"]
    for (context, size), by in sorted(cells.items()):
        ours_s, stock_s = statistics.median(by["stateful"]), statistics.median(by["vllm"])
        lines.append(f"| {context} | {size} | {size / ours_s:.0f} | {size / stock_s:.0f} | {stock_s / ours_s:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    record_command(__file__, argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="tiny | small | a model directory")
    p.add_argument("--contexts", default="1000,6000")
    p.add_argument("--chunks", default="17,128,512,2048")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-dir", type=Path, default=out_path("benchmarks/results/ingest_vs_prefill"))
    p.add_argument(
        "--stateful-config",
        default=None,
        help='the stateful server\'s --additional-config, e.g. \'{"stateful": {"ingest_step_target_ms": 1000}}\'',
    )
    args = p.parse_args(argv)
    model, dtype = str(model_dir(args.model)), serving_dtype(args.model)
    contexts, chunks = int_list(args.contexts), int_list(args.chunks)
    cases = [(c, s, r) for c in contexts for s in chunks for r in range(args.repeats)]
    common = ["--block-size", "32", "--max-model-len", "10240", "--enforce-eager", "--dtype", dtype]
    rows: list[dict] = []
    own = ["--additional-config", args.stateful_config] if args.stateful_config else []
    for kind, extra in (("stateful", own), ("vllm", ["--enable-prefix-caching"])):
        log = args.out_dir / "logs" / f"{kind}.log"
        with launched_server(kind, model, "bench", common + extra, log, cpu_env()) as base:
            rows += run(kind, base, cases, model)
    write_rows(rows, args.out_dir / "ingest_vs_prefill.csv", COLUMNS)
    info = machine_info()
    write_json(info, args.out_dir / "machine.json")
    title = f"Ingestion vs stock prefill ({args.model}, {dtype}, median of {args.repeats})"
    summary = summary_header(title) + f"{table(rows)}\n\n{machine_line(info)}\n"
    write_text(summary, args.out_dir / "summary.md")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
