"""Aggregate session turns/s: one engine vs two data-parallel ranks vs two replicas, one run.

Every setup serves the same model with the same flags and gets the same load: ``--sessions``
sessions, each a closed loop of ``--turns`` turns (``--turn-tokens`` new tokens, ``--max-tokens``
greedy output) after a first turn of ``--prompt-tokens``; all sessions run at once. Setups:

* ``1 engine``: one server, one engine using every core (``VLLM_CPU_OMP_THREADS_BIND=0-(n-1)``);
* ``1 engine, 1 core``: the same bound to one core: what one rank of the next two gets;
* ``2 DP ranks``: one server, ``--data-parallel-size 2`` (one core list per rank);
* ``2 replicas``: two servers, one core each, behind vllm-router (``consistent_hash`` on
  ``X-Session-ID``), each with its own state dir under a shared root.

Reported per setup: turns/s over the timed turns (the first turns are not timed), p50/p95 turn
latency, how the sessions were spread, and the follow-ups that recomputed anything (0 expected).
Ratios are against ``1 engine``. Outputs under ``--out``: ``scale_out.csv``, ``summary.md``,
``summary.json``, ``scale_out.png``; the machine (CPU model, ISA flags) with every figure.

    python benchmarks/scale_out.py            # tiny model, 16 sessions x 12 turns
    python benchmarks/scale_out.py --quick    # 8 sessions x 4 turns
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import multi_tenant as mt
from harness.http import check
from harness.machine import machine_info, machine_line, model_dir, serving_dtype
from harness.results import out_path, pyplot, save_figure, summary_header, write_json, write_rows, write_text
from harness.servers import ManagedServer, free_port, launched_server

HEADER = "X-Session-ID"
FIELDS = ["setup", "engines", "cores_per_engine", "turns", "seconds", "wall_s", "turns_per_s", "ratio", "p50_s",
          "p95_s", "recomputing_follow_ups", "sessions_per_engine", "cpu_seconds"]  # fmt: skip


def options() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny|small (demo models) or a model directory")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--turns", type=int, default=12, help="timed turns per session")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--turn-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--setups", default="1 engine,1 engine 1 core,2 DP ranks,2 replicas")
    p.add_argument("--server-args", default="", help="extra flags for every server")
    p.add_argument("--out", default="benchmarks/results/scale_out")
    p.add_argument("--quick", action="store_true", help="8 sessions x 4 turns")
    a = p.parse_args()
    if a.quick:
        a.sessions, a.turns = 8, 4
    return a


class Load:
    """The closed-loop session load, the same for every setup."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    async def run(self, url: str) -> dict[str, Any]:
        a = self.args
        wall = time.perf_counter()
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            await asyncio.gather(
                *(self._turn(client, s, self._tokens(s, 0, a.prompt_tokens)) for s in range(a.sessions))
            )
            start = time.perf_counter()
            results = await asyncio.gather(*(self._loop(client, s) for s in range(a.sessions)))
            seconds = time.perf_counter() - start
        latencies = sorted(x for r in results for x, _ in r)
        recomputing = sum(1 for r in results for _, rec in r if rec)
        turns = len(latencies)
        return {"turns": turns, "seconds": round(seconds, 3), "wall_s": round(time.perf_counter() - wall, 3),
                "turns_per_s": round(turns / seconds, 3),
                "p50_s": round(statistics.median(latencies), 4),
                "p95_s": round(latencies[min(turns - 1, int(0.95 * turns))], 4),
                "recomputing_follow_ups": recomputing}  # fmt: skip

    async def _loop(self, client: httpx.AsyncClient, s: int) -> list[tuple[float, int]]:
        out = []
        for t in range(1, self.args.turns + 1):
            start = time.perf_counter()
            session = await self._turn(client, s, self._tokens(s, t, self.args.turn_tokens))
            out.append((time.perf_counter() - start, session["recomputed_tokens"]))
        return out

    async def _turn(self, client: httpx.AsyncClient, s: int, prompt: list[int]) -> dict[str, Any]:
        sid = f"scale-{s}"
        body = {"model": "m", "prompt": prompt, "max_tokens": self.args.max_tokens, "temperature": 0,
                "ignore_eos": True, "stateful": sid}  # fmt: skip
        return check(await client.post("/completions", json=body, headers={HEADER: sid}))["session"]

    @staticmethod
    def _tokens(s: int, t: int, n: int) -> list[int]:
        rng = random.Random(s * 1000 + t)
        return [rng.randrange(10, 3000) for _ in range(n)]


class Setups:
    """Starts each setup's servers (and router) for one ``with`` block; yields the URL to load."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.out = out
        self.model = str(model_dir(args.model))
        self.common = mt.server_args(args, serving_dtype(args.model)) + ["--session-header", HEADER]
        self.cores = os.cpu_count() or 1
        self.groups: list[int] = []  # process groups of the current setup's servers and router

    def start(self, name: str, stack: ExitStack) -> tuple[str, list[str], int, int]:
        """(URL to load, the servers' URLs, engines, cores per engine) of setup ``name``; its
        processes are owned by ``stack``."""
        all_cores = f"0-{self.cores - 1}"
        if name in ("1 engine", "1 engine 1 core", "2 DP ranks"):
            tag, extra, bind, engines = {
                "1 engine": ("one", [], all_cores, 1),
                "1 engine 1 core": ("one-core", [], "0", 1),
                "2 DP ranks": ("dp2", ["--data-parallel-size", "2"], f"0|{1 % self.cores}", 2),
            }[name]
            url = self._server(stack, tag, extra, bind)
            return url, [url], engines, self.cores if name == "1 engine" else max(1, self.cores // 2)
        if name == "2 replicas":
            root = Path(tempfile.mkdtemp(prefix="vllm-stateful-replicas-"))
            stack.callback(shutil.rmtree, root, True)
            urls = []
            for i in range(2):
                extra = ["--state-dir", str(root / f"replica-{i}"), "--shared-state-root", str(root)]
                urls.append(self._server(stack, f"replica-{i}", extra, str(i % self.cores)))
            return self._router(stack, urls), urls, 2, max(1, self.cores // 2)
        raise SystemExit(f"unknown setup {name!r}")

    def _server(self, stack: ExitStack, tag: str, extra: list[str], bind: str) -> str:
        # the setup's own core binding, whatever the environment says (harness cpu_env would let it win)
        env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": bind}
        log = self.out / "logs" / f"{tag}.log"
        argv = [*self.common, *extra]
        return stack.enter_context(launched_server("stateful", self.model, "m", argv, log, env, 900, pids=self.groups))

    def _router(self, stack: ExitStack, urls: list[str]) -> str:
        binary = shutil.which("vllm-router") or str(Path(sys.executable).with_name("vllm-router"))
        port = free_port()
        argv = [binary, "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port()),
                "--worker-urls", *(u.rsplit("/v1", 1)[0] for u in urls), "--policy", "consistent_hash",
                "--health-check-interval-secs", "1", "--disable-circuit-breaker", "--log-level", "error"]  # fmt: skip
        router = stack.enter_context(
            ManagedServer(argv, {}, self.out / "logs" / "router.log", f"http://127.0.0.1:{port}/v1")
        )
        router.wait_ready(60)
        self.groups.append(router.pid)
        return router.base_url


ROLES = (("VLLM::Worker", "model worker"), ("VLLM::EngineCor", "engine core"), ("VLLM::DPCoordin", "DP coordinator"),
         ("router", "router"), ("", "API server"))  # fmt: skip


def cpu_seconds(groups: list[int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the processes of ``groups``, by role."""
    import psutil

    out: dict[str, float] = {}
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if os.getpgid(proc.pid) not in groups:
                continue
            times = proc.cpu_times()
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
        role = next(r for prefix, r in ROLES if prefix in (proc.info["name"] or ""))
        out[role] = out.get(role, 0.0) + times.user + times.system
    return out


def spread(servers: list[str], engines: int) -> list[int]:
    """Sessions per engine (data-parallel rank, or replica) as the servers report them."""
    lists = [check(httpx.get(u + "/sessions", timeout=30))["data"] for u in servers]
    if len(servers) == 1:
        return [sum(1 for s in lists[0] if s["data_parallel_rank"] == r) for r in range(engines)]
    return [len(one) for one in lists]


def main() -> None:
    args = options()
    out = out_path(args.out)
    setups = Setups(args, out)
    load = Load(args)
    rows: list[dict[str, Any]] = []
    for name in [s.strip() for s in args.setups.split(",") if s.strip()]:
        with ExitStack() as stack:
            url, servers, engines, cores = setups.start(name, stack)
            print(f"[scale-out] {name}: {args.sessions} sessions x {args.turns} turns ...", flush=True)
            before = cpu_seconds(setups.groups)
            result = asyncio.run(load.run(url))
            after = cpu_seconds(setups.groups)
            setups.groups.clear()
            per_engine = spread(servers, engines)
        # CPU seconds per role during the load (first turns included), as a share of the run's wall time
        busy = {k: round(after.get(k, 0.0) - before.get(k, 0.0), 2) for k in after}
        rows.append({"setup": name, "engines": engines, "cores_per_engine": cores, **result,
                     "sessions_per_engine": "/".join(map(str, per_engine)), "cpu_seconds": busy})  # fmt: skip
        print(f"[scale-out] {name}: {result['turns_per_s']} turns/s, p50 {result['p50_s']} s", flush=True)
    base = next((r["turns_per_s"] for r in rows if r["setup"] == "1 engine"), rows[0]["turns_per_s"])
    for r in rows:
        r["ratio"] = round(r["turns_per_s"] / base, 3)
    write_outputs(rows, args, out)


def write_outputs(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> None:
    machine = machine_info()
    write_rows(rows, out / "scale_out.csv", FIELDS)
    write_json({"config": vars(args), "machine": machine, "rows": rows}, out / "summary.json")
    load = (
        f"model `{args.model}`; {args.sessions} sessions at once, each {args.turns} timed turns of "
        f"{args.turn_tokens} tokens in, {args.max_tokens} out, after a {args.prompt_tokens}-token first turn"
    )
    lines = [
        "| setup | engines x cores | turns/s | vs 1 engine | p50 turn (s) | p95 turn (s) | sessions per engine "
        "| follow-ups that recomputed | CPU-s by role during the load (wall s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = ", ".join(f"{k} {v}" for k, v in sorted(r["cpu_seconds"].items(), key=lambda kv: -kv[1]))
        lines.append(
            f"| {r['setup']} | {r['engines']} x {r['cores_per_engine']} | {r['turns_per_s']} | {r['ratio']}x "
            f"| {r['p50_s']} | {r['p95_s']} | {r['sessions_per_engine']} | {r['recomputing_follow_ups']} "
            f"| {cpu} ({r['wall_s']}) |"
        )
    text = summary_header("Scale-out: aggregate session turns/s", load, machine_line(machine)) + "\n".join(lines) + "\n"
    write_text(text, out / "summary.md")
    try:
        fig, ax = pyplot().subplots(figsize=(7, 3.5))
        ax.bar([r["setup"] for r in rows], [r["turns_per_s"] for r in rows], color="#4c72b0")
        ax.set_ylabel("session turns/s")
        ax.set_title(f"Scale-out on {machine.get('cores')} cores ({args.model})")
        save_figure(fig, out / "scale_out.png", dpi=120)
    except ImportError:  # matplotlib is in the `bench` extra; the table and CSV do not need it
        pass
    print(text, end="")


if __name__ == "__main__":
    main()
