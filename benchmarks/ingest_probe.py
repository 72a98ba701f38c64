"""Ingest and query costs of one session as its context grows (vllm-stateful only, no feed timing).

Separates the two costs that a streaming run mixes: how long appending N tokens takes
(`wait: true`, so the time includes the prefill), and how long a read-only question takes once the
data is in. Grows one session to each target context, then measures appends of several sizes and a
query with 1 and with `--max-tokens` generated tokens. Then, across sessions: the latency of an
append (`wait: true`) on one session while another session is idle, and while `--query-threads`
clients keep asking that other session read-only questions (the engine's work classes decide what
this costs; before them, ingestion waited up to 2 s for any query). Writes CSV + summary.md to --out-dir.

    python benchmarks/ingest_probe.py [--model small] [--contexts 1000,3000,6000]
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from pathlib import Path

import httpx
from harness.config import int_list
from harness.http import append_wait, check, post_timed
from harness.machine import cpu_env, machine_info, machine_line, model_dir
from harness.results import out_path, record_command, summary_header, write_rows, write_text
from harness.servers import launched_server

COLUMNS = ("context_tokens", "op", "tokens", "seconds")


def probe(base: str, contexts: list[int], append_sizes: list[int], query_tokens: int, max_tokens: int) -> list[dict]:
    rng = random.Random(0)
    with httpx.Client(timeout=600) as client:
        return _probe(client, base, rng, contexts, append_sizes, query_tokens, max_tokens)


def _probe(client: httpx.Client, base: str, rng: random.Random, contexts: list[int], append_sizes: list[int],
           query_tokens: int, max_tokens: int) -> list[dict]:  # fmt: skip
    sid = "ingest-probe"
    check(client.post(f"{base}/sessions", json={"id": sid}), 200, 201)

    def ids(n: int) -> list[int]:
        return [rng.randrange(100, 3000) for _ in range(n)]

    rows, context = [], 0
    for target in contexts:
        while context < target:
            _, body = append_wait(client, f"{base}/sessions/{sid}/append", ids(500))
            context = body["context_tokens"]
        for n in append_sizes:
            secs, body = append_wait(client, f"{base}/sessions/{sid}/append", ids(n))
            rows.append({"context_tokens": context, "op": f"append {n}", "tokens": n, "seconds": secs})
            context = body["context_tokens"]
        for gen in (1, max_tokens):
            query = {"model": "bench", "prompt": ids(query_tokens), "max_tokens": gen, "temperature": 0,
                     "ignore_eos": True, "stateful": sid, "stateful_commit": False}  # fmt: skip
            secs, body = post_timed(client, f"{base}/completions", query)
            assert body["session"]["recomputed_tokens"] == 0
            rows.append({"context_tokens": context, "op": f"query {query_tokens}+{gen}", "tokens": query_tokens,
                         "seconds": secs})  # fmt: skip
    client.delete(f"{base}/sessions/{sid}")
    return rows


def cross_session(base: str, append_tokens: int, threads: int, max_tokens: int, repeats: int = 5) -> list[dict]:
    """Append latency on session B, with session A idle, then with A under continuous queries."""
    rng = random.Random(1)
    with httpx.Client(timeout=600) as client:
        return _cross_session(client, base, rng, append_tokens, threads, max_tokens, repeats)


def _cross_session(client: httpx.Client, base: str, rng: random.Random, append_tokens: int, threads: int,
                   max_tokens: int, repeats: int) -> list[dict]:  # fmt: skip
    for sid in ("probe-a", "probe-b"):
        prompt = [rng.randrange(100, 3000) for _ in range(500)]
        check(client.post(f"{base}/sessions", json={"id": sid, "prompt": prompt}), 200, 201)
    query = {"model": "bench", "prompt": [5, 6, 7], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    query |= {"stateful": "probe-a", "stateful_commit": False}
    stop = threading.Event()

    def ask() -> None:
        with httpx.Client(timeout=600) as c:
            while not stop.is_set():
                check(c.post(f"{base}/completions", json=query))

    rows = []
    for label, load in (("other session idle", 0), (f"other session queried ({threads} clients)", threads)):
        workers = [threading.Thread(target=ask) for _ in range(load)]
        for w in workers:
            w.start()
        time.sleep(1.0 if load else 0.0)
        for _ in range(repeats):
            ids = [rng.randrange(100, 3000) for _ in range(append_tokens)]
            secs, _ = append_wait(client, f"{base}/sessions/probe-b/append", ids)
            rows.append({"context_tokens": 0, "op": f"append {append_tokens}, {label}", "tokens": append_tokens,
                         "seconds": secs})  # fmt: skip
        stop.set()
        for w in workers:
            w.join()
        stop.clear()
    for sid in ("probe-a", "probe-b"):
        client.delete(f"{base}/sessions/{sid}")
    return rows


def main(argv: list[str] | None = None) -> int:
    record_command(__file__, argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="tiny | small | a model directory")
    p.add_argument("--contexts", type=int_list, default="1000,3000,6000")
    p.add_argument("--append-sizes", type=int_list, default="17,70,300")
    p.add_argument("--query-tokens", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--query-threads", type=int, default=3, help="clients querying the other session")
    p.add_argument("--out-dir", type=Path, default=out_path("benchmarks/results/ingest_probe"))
    args = p.parse_args(argv)
    common = ["--block-size", "32", "--max-model-len", "8192", "--enforce-eager"]
    model = str(model_dir(args.model))
    with launched_server("stateful", model, "bench", common, args.out_dir / "server.log", cpu_env()) as base:
        rows = probe(base, args.contexts, args.append_sizes, args.query_tokens, args.max_tokens)
        rows += cross_session(base, 70, args.query_threads, args.max_tokens)
    write_rows(rows, args.out_dir / "ingest_probe.csv", COLUMNS)
    lines = ["| context tokens | operation | seconds | tokens/s |", "|---:|---|---:|---:|"]
    lines += [
        f"| {r['context_tokens']} | {r['op']} | {r['seconds']:.3f} | {r['tokens'] / r['seconds']:.0f} |" for r in rows
    ]
    head = summary_header("Ingest and query cost vs context", f"model `{args.model}`", machine_line(machine_info()))
    write_text(head + "\n".join(lines) + "\n", args.out_dir / "summary.md")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
