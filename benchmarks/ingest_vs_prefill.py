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
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
from flash_benchmark import machine_info
from flash_report import machine_line
from servers import detect_device, launched_server

REPO = Path(__file__).resolve().parent.parent


def text_ids(corpus: list[int], n: int, offset: int) -> list[int]:
    """``n`` token ids of ordinary text starting ``offset`` tokens into ``corpus`` (repeated)."""
    ids = corpus
    start = offset % len(ids)
    return (ids * ((start + n) // len(ids) + 1))[start : start + n]


def _post(client: httpx.Client, url: str, body: dict) -> float:
    start = time.perf_counter()
    r = client.post(url, json=body)
    seconds = time.perf_counter() - start
    r.raise_for_status()
    return seconds


def ours(base: str, history: list[int], chunk: list[int], sid: str) -> float:
    """Seconds to append ``chunk`` (wait for it) to a session holding ``history``."""
    with httpx.Client(base_url=base, timeout=600) as c:
        c.post("/sessions", json={"id": sid}).raise_for_status()
        for i in range(0, len(history), 4000):
            _post(c, f"/sessions/{sid}/append", {"token_ids": history[i : i + 4000], "wait": True})
        seconds = _post(c, f"/sessions/{sid}/append", {"token_ids": chunk, "wait": True})
        c.delete(f"/sessions/{sid}")
    return seconds


def stock(base: str, history: list[int], chunk: list[int]) -> float:
    """Seconds for stock vLLM to prefill ``chunk`` after a cached ``history`` (and sample one token)."""
    with httpx.Client(base_url=base, timeout=600) as c:
        body = {"model": "bench", "max_tokens": 1, "temperature": 0}
        _post(c, "/completions", {**body, "prompt": history})  # caches the history's full blocks
        return _post(c, "/completions", {**body, "prompt": history + chunk})


def run(kind: str, base: str, cases: list[tuple[int, int, int]], corpus: list[int]) -> list[dict]:
    rows = []
    for i, (context, size, repeat) in enumerate(cases):
        tokens = text_ids(corpus, context + size, offset=7919 * (i + 1))
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="tiny | small | a model directory")
    p.add_argument("--contexts", default="1000,6000")
    p.add_argument("--chunks", default="17,128,512,2048")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results" / "ingest_vs_prefill")
    args = p.parse_args(argv)
    from vllm_stateful.demo_model import corpus_token_ids, ensure_demo_model, serving_dtype

    model_path = str(ensure_demo_model(args.model)) if args.model in ("tiny", "small") else args.model
    contexts, chunks = [int(c) for c in args.contexts.split(",")], [int(s) for s in args.chunks.split(",")]
    cases = [(c, s, r) for c in contexts for s in chunks for r in range(args.repeats)]
    dtype = serving_dtype(args.model) if args.model in ("tiny", "small") else "auto"
    common = ["--block-size", "32", "--max-model-len", "10240", "--enforce-eager", "--dtype", dtype]
    env = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1"} if detect_device() == "cpu" else {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    corpus = corpus_token_ids(model_path)
    rows = []
    for kind, extra in (("stateful", []), ("vllm", ["--enable-prefix-caching"])):
        log = args.out_dir / "logs" / f"{kind}.log"
        with launched_server(kind, model_path, "bench", common + extra, log, env) as base:
            rows += run(kind, base, cases, corpus)
    with open(args.out_dir / "ingest_vs_prefill.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    info = machine_info()
    (args.out_dir / "machine.json").write_text(json.dumps(info, indent=2))
    summary = (
        f"# Ingestion vs stock prefill ({args.model}, {dtype}, median of {args.repeats})\n\n"
        f"Command: `python benchmarks/ingest_vs_prefill.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
        f"{table(rows)}\n\n{machine_line(info)}\n"
    )
    (args.out_dir / "summary.md").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
