"""Multi-tenant benchmark: N sessions with Poisson appends and queries, vllm-stateful vs stock vLLM.

Both servers serve the same model here, one after the other, with the same block size, KV blocks
(``--num-gpu-blocks-override``), dtype and max-model-len. For each N in ``--sessions``, N sessions
start from one shared system prompt; each then gets appends and read-only queries (random token ids)
as two Poisson processes for ``--duration-s``, from the same seeded plan on both servers.
vllm-stateful: ``POST /v1/sessions``, ``.../append`` (429/503 retried after ``Retry-After``), queries
with ``stateful_commit: false``. Stock vLLM (``--enable-prefix-caching``): a session is a client-side
token list (one completion over the system prompt creates it); an append extends it; a query sends
all of it plus the query. Per query: latency, context, prefilled and re-prefilled tokens; per phase,
from ``/metrics``: scheduler overhead, fragmentation, query wait (``multi_tenant_report``).
Capacity probe, sessions of system prompt + ``--probe-suffix-tokens`` unique ids: vllm-stateful
creates them until it answers 429; stock vLLM adds them, re-querying the least recently used one after
each, until its ``cached_tokens`` drops (LRU eviction). Outputs under ``--out``: ``queries.csv``,
``summary.csv``, ``summary.md``, ``summary.json`` (with CPU model, ISA flags, dtype), ``multi_tenant.png``.

    python benchmarks/multi_tenant.py                        # small model, N = 4,8,16,32 (CPU)
    python benchmarks/multi_tenant.py --quick                # tiny model, N = 2,4, seconds per phase
    python benchmarks/multi_tenant.py --model DIR --sessions 32,64,128,256 --kv-blocks 16384   # GPU
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shlex
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import multi_tenant_report as mt
from harness.config import int_list, override
from harness.http import BenchError, check, retry_after
from harness.machine import cpu_env, detect_device, machine_info, model_dir, serving_dtype
from harness.results import columns_of, command_line, out_path, record_command, write_json, write_rows, write_text
from harness.servers import launched_server

DEFAULT_OUT = "benchmarks/results/multi_tenant"
OPTIONS = (  # flag, type, default, help
    ("--model", str, "small", "tiny|small (demo models) or a model directory"),
    ("--sessions", str, "4,8,16,32", "comma-separated session counts N"),
    ("--duration-s", float, 60.0, "seconds of Poisson load per N"),
    ("--append-rate", float, 0.05, "appends per session per second"),
    ("--query-rate", float, 0.05, "queries per session per second"),
    ("--system-prompt-tokens", int, 512, "shared prefix of every session"),
    ("--append-tokens", int, 64, "tokens per append"),
    ("--query-tokens", int, 16, "prompt tokens per query"),
    ("--query-max-tokens", int, 8, "tokens generated per query"),
    ("--block-size", int, 32, "KV block size (both servers)"),
    ("--kv-blocks", int, 2048, "KV blocks of both servers (--num-gpu-blocks-override); 0 = the server's own"),
    ("--max-model-len", int, 8192, "both servers"),
    ("--probe-suffix-tokens", int, 256, "unique tokens per capacity-probe session"),
    ("--probe-max-sessions", int, 512, "the capacity probe stops here; 0 = no probe"),
    ("--seed", int, 0, "workload seed"),
    ("--server-args", str, "", "extra flags for both servers"),
    ("--servers", str, "stateful,vllm", "which servers, in this order"),
    ("--out", str, DEFAULT_OUT, "output folder"),
)
QUICK = dict(model="tiny", sessions="2,4", duration_s=8.0, append_rate=0.5, query_rate=0.5)
QUICK.update(system_prompt_tokens=128, append_tokens=32, kv_blocks=512, max_model_len=2048)
QUICK.update(probe_suffix_tokens=64, probe_max_sessions=320, out="benchmarks/results/tmp/multi_tenant-quick")
NAMES = {"stateful": mt.OURS, "vllm": mt.STOCK}
SETTLE_S = 2.5  # before the closing scrape: the plugin refreshes its gauges about once a second


class Server:
    """HTTP client of one server; subclasses implement the session operations."""

    name = ""

    def __init__(self, api_base: str, model: str, block_size: int, max_tokens: int):
        self.api, self.root = api_base, api_base.removesuffix("/v1")
        self.model, self.block_size, self.max_tokens = model, block_size, max_tokens
        self.http = httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=512))
        self.retries = 0

    async def post(self, path: str, body: dict, give_up_s: float = 120.0) -> httpx.Response:
        """POST; 429/503 are sent again after ``Retry-After`` (counted in ``retries``) for ``give_up_s``."""
        t0 = time.perf_counter()
        while True:
            resp = await self.http.post(f"{self.api}{path}", json=body)
            if resp.status_code not in (429, 503) or time.perf_counter() - t0 > give_up_s:
                return resp
            self.retries += 1
            await asyncio.sleep(retry_after(resp))

    async def complete(self, prompt: list[int], max_tokens: int, **extra: Any) -> tuple[float, dict]:
        """(latency from the first send, response body) of a greedy completion."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
        t0 = time.perf_counter()
        resp = await self.post("/completions", {**body, "ignore_eos": True})
        return time.perf_counter() - t0, check(resp, 200)

    async def scrape(self) -> mt.Samples | None:
        try:
            resp = await self.http.get(f"{self.root}/metrics")
            return mt.parse_prometheus(resp.text) if resp.status_code == 200 else None
        except httpx.HTTPError:
            return None


class Stateful(Server):
    name = mt.OURS

    async def create(self, sid: str, tokens: list[int]) -> int:
        resp = await self.http.post(f"{self.api}/sessions", json={"id": sid, "prompt": tokens})
        if resp.status_code != 429:
            check(resp, 200, 201)
        return resp.status_code

    async def append(self, sid: str, tokens: list[int]) -> None:
        check(await self.post(f"/sessions/{sid}/append", {"token_ids": tokens}, give_up_s=300), 200, 202)

    async def query(self, sid: str, tokens: list[int]) -> tuple[float, int, int | None, int | None]:
        lat, body = await self.complete(tokens, self.max_tokens, stateful=sid, stateful_commit=False)
        s = body.get("session") or {}
        if "context_tokens" not in s:
            raise BenchError(f"query on {sid} has no session object: not vllm-stateful? {str(body)[:300]}")
        return lat, int(s["context_tokens"]), s.get("new_tokens"), s.get("recomputed_tokens")

    async def close(self, sid: str) -> None:
        await self.http.delete(f"{self.api}/sessions/{sid}")


class Stock(Server):
    """A session is a client-side token list; ``sent`` is how much of it the server has been sent."""

    name = mt.STOCK

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.history: dict[str, list[int]] = {}
        self.sent: dict[str, int] = {}

    async def create(self, sid: str, tokens: list[int]) -> int:
        await self.complete(tokens, 1)
        self.history[sid], self.sent[sid] = list(tokens), len(tokens)
        return 201

    async def append(self, sid: str, tokens: list[int]) -> None:
        self.history[sid] += tokens

    async def query(self, sid: str, tokens: list[int]) -> tuple[float, int, int | None, int | None]:
        hist = self.history[sid]
        fresh = len(hist) - self.sent[sid] + len(tokens)
        self.sent[sid] = len(hist)
        lat, body = await self.complete(hist + tokens, self.max_tokens)
        prompt, cached = cached_tokens(body)
        prefilled = None if cached is None else prompt - cached
        return lat, prompt, prefilled, mt.stock_recomputed(prompt, cached, fresh)

    async def close(self, sid: str) -> None:
        self.history.pop(sid, None)


def cached_tokens(body: dict) -> tuple[int, int | None]:
    usage = body.get("usage") or {}
    return int(usage["prompt_tokens"]), (usage.get("prompt_tokens_details") or {}).get("cached_tokens")


async def run_phase(srv: Server, plan: mt.Plan, n: int) -> tuple[list[mt.QueryRow], mt.PhaseMetrics]:
    """Create N sessions, replay the plan's Poisson events, wait for every query; then delete them."""
    sids = [f"mt-{n}-{i}-{os.urandom(4).hex()}" for i in range(n)]
    codes = await asyncio.gather(*(srv.create(sid, list(plan.system)) for sid in sids))
    if 429 in codes:
        await asyncio.gather(*(srv.close(sid) for sid, code in zip(sids, codes) if code != 429))
        raise BenchError(f"{srv.name}: {codes.count(429)} of {n} sessions refused (429): raise --kv-blocks")
    before, srv.retries = await srv.scrape(), 0
    t0 = time.perf_counter()

    async def one_query(i: int, tokens: list[int]) -> mt.QueryRow | None:
        sent = time.perf_counter() - t0
        try:
            lat, ctx, prefilled, recomputed = await srv.query(sids[i], tokens)
        except (BenchError, httpx.HTTPError) as e:  # counted, and the load goes on
            print(f"[{srv.name}] query failed: {str(e)[:300]}", file=sys.stderr)
            return None
        return mt.QueryRow(srv.name, n, i, round(sent, 3), ctx, lat, prefilled, recomputed)

    async def session(i: int) -> list[mt.QueryRow | None]:
        queries = []
        for ev in plan.sessions[i]:
            await asyncio.sleep(max(0.0, t0 + ev.t_s - time.perf_counter()))
            if ev.kind == "append":
                await srv.append(sids[i], list(ev.token_ids))
            else:
                queries.append(asyncio.create_task(one_query(i, list(ev.token_ids))))
        return list(await asyncio.gather(*queries))

    answers = [r for rs in await asyncio.gather(*(session(i) for i in range(n))) for r in rs]
    await asyncio.sleep(SETTLE_S)
    pm = mt.phase_metrics(before, await srv.scrape(), srv.retries, answers.count(None))
    rows = [r for r in answers if r is not None]
    await asyncio.gather(*(srv.close(sid) for sid in sids))
    return rows, pm


async def probe(srv: Server, system: list[int], suffix_tokens: int, cap: int, vocab: tuple[int, int]) -> dict:
    """How many sessions of ``system`` + a unique suffix fit: see the module docstring."""
    rng = random.Random(f"probe/{suffix_tokens}")
    prompts = [system + list(mt.random_tokens(rng, suffix_tokens, *vocab)) for _ in range(cap)]
    if isinstance(srv, Stateful):
        sids = []
        for k, prompt in enumerate(prompts):
            if await srv.create(sid := f"mt-probe-{k}-{os.urandom(4).hex()}", prompt) == 429:
                break
            sids.append(sid)
        samples = await srv.scrape()
        first = (await srv.query(sids[0], prompts[0][-8:]))[3] if sids else None
        await asyncio.gather(*(srv.close(s) for s in sids))
        found = dict(sessions_fit=len(sids) if len(sids) < cap else None, admitted=len(sids), cap=cap)
        found.update({m: mt.metric(samples, m) for m in ("pinned_blocks", "charged_blocks", "budget_blocks")})
        return {**found, "first_session_recomputed_tokens": first}
    lru: collections.deque[list[int]] = collections.deque()  # client-side model of the LRU order
    for k, prompt in enumerate(prompts, start=1):
        await srv.complete(prompt, 1)
        lru.append(prompt)
        head = lru.popleft()  # least recently used: the first an LRU cache evicts
        _, body = await srv.complete(head, 1)
        lru.append(head)
        n_prompt, cached = cached_tokens(body)
        if cached is None:
            raise BenchError("stock server sent no cached_tokens: serve with --enable-prompt-tokens-details")
        if cached < mt.full_hit_tokens(n_prompt, srv.block_size):
            return dict(sessions_fit=k - 1, first_miss_at=k, recomputed_tokens=n_prompt - cached, cap=cap)
    return dict(sessions_fit=None, first_miss_at=None, cap=cap)


def server_args(a: argparse.Namespace, dtype: str) -> list[str]:
    args = ["--block-size", str(a.block_size), "--max-model-len", str(a.max_model_len), "--dtype", dtype]
    args += ["--enable-prompt-tokens-details", "--enable-prefix-caching", *shlex.split(a.server_args)]
    if getattr(a, "kv_blocks", 0):  # lifecycle.py and scale_out.py have no --kv-blocks
        args += ["--num-gpu-blocks-override", str(a.kv_blocks)]
    return args + (["--enforce-eager"] if detect_device() == "cpu" else [])


def run_server(kind: str, a: argparse.Namespace, model: Path, dtype: str, vocab: tuple, rows: list, phases: dict):
    """Start one server, run every phase (adding to ``rows`` and ``phases``) and the probe (returned)."""
    cls = Stateful if kind == "stateful" else Stock
    system = list(mt.random_tokens(random.Random(a.seed), a.system_prompt_tokens, *vocab))
    log = Path(a.out) / f"server-{cls.name}.log"

    async def scenario(api: str) -> dict:
        srv = cls(api, model.name, a.block_size, a.query_max_tokens)
        try:
            await srv.complete(system, 1)  # warm-up; also caches the shared prompt
            for n in a.n_list:
                args = (a.duration_s, a.append_rate, a.query_rate, a.append_tokens, a.query_tokens)
                plan = mt.make_plan(n, *args, system, vocab, a.seed)
                print(f"[{cls.name}] N={n}: {sum(map(len, plan.sessions))} events", file=sys.stderr, flush=True)
                got, phases[(cls.name, n)] = await run_phase(srv, plan, n)
                rows.extend(got)
            if a.probe_max_sessions <= 0:
                return {}
            print(f"[{cls.name}] capacity probe (at most {a.probe_max_sessions} sessions)", file=sys.stderr)
            return await probe(srv, system, a.probe_suffix_tokens, a.probe_max_sessions, vocab)
        finally:
            await srv.http.aclose()

    with launched_server(kind, str(model), model.name, server_args(a, dtype), log, cpu_env()) as api:
        return asyncio.run(scenario(api))


def write_outputs(a: argparse.Namespace, rows, phases, probes: dict, meta: dict) -> str:
    """CSVs, PNG, summary.md and summary.json under ``a.out``; returns the Markdown table."""
    out = Path(a.out)
    summaries = mt.summarize(rows, phases, {server: p.get("sessions_fit") for server, p in probes.items()})
    write_rows(rows, out / "queries.csv", columns_of(mt.QueryRow))
    write_rows(summaries, out / "summary.csv", columns_of(mt.Summary))
    mt.plot(rows, summaries, out / "multi_tenant.png")
    write_text(mt.markdown_report(summaries, probes, meta), out / "summary.md")
    phase_dump = {f"{server}/{n}": asdict(p) for (server, n), p in phases.items()}
    blob = {**meta, "summaries": [asdict(x) for x in summaries], "probes": probes, "phases": phase_dump}
    write_json(blob, out / "summary.json")
    return mt.markdown_table(summaries)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, typ, default, help_text in OPTIONS:
        ap.add_argument(flag, type=typ, default=None, help=f"{help_text} (default {default})")
    ap.add_argument("--quick", action="store_true", help=f"smoke run, other defaults: {QUICK}")
    a = ap.parse_args(argv)
    defaults = {flag[2:].replace("-", "_"): default for flag, _, default, _ in OPTIONS}
    a = argparse.Namespace(**override({**defaults, **(QUICK if a.quick else {}), "quick": a.quick}, a, defaults))
    a.n_list = int_list(a.sessions)
    if set(a.servers.split(",")) - set(NAMES):
        ap.error(f"--servers: choose from {sorted(NAMES)}")
    a.out = str(out_path(a.out))
    return a


def main(argv: list[str] | None = None) -> int:
    record_command(__file__, argv)
    a = parse_args(argv)
    model, dtype = model_dir(a.model), serving_dtype(a.model)
    vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
    vocab = (min(300, vocab_size // 4), min(vocab_size - 100, 30000))  # clear of special tokens at either end
    meta = dict(command=command_line(), model=str(model), dtype=dtype, machine=machine_info())
    meta.update(server_args=server_args(a, dtype), config=vars(a))
    rows: list[mt.QueryRow] = []
    phases: dict[tuple[str, int], mt.PhaseMetrics] = {}
    probes: dict[str, dict] = {}
    failed: list[str] = []
    for kind in a.servers.split(","):
        try:
            probes[NAMES[kind]] = run_server(kind, a, model, dtype, vocab, rows, phases)
        except Exception:  # noqa: BLE001 - one broken server must not lose the other's results
            traceback.print_exc()
            failed.append(kind)
        table = write_outputs(a, rows, phases, probes, meta)  # after each server: keep partial results
    print(table + f"results in {a.out}")
    if failed:
        print(f"failed servers (see {a.out}/server-*.log): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
