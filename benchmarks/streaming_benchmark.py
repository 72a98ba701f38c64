"""Streaming benchmark: a market-data feed appended to a session while questions arrive.

A seeded feed of tick lines (``09:30:01 BTC 64123.55 +0.12%``) is replayed at ``--rate`` ticks per
second; after the ticks chosen by ``streaming_report.make_feed`` a question is asked. Providers, one
server at a time, same feed and questions:

- ``vllm-stateful``: each tick is ``POST /v1/sessions/{id}/append`` (202, ingested in the background;
  429 is retried after ``Retry-After``, nothing is dropped); a question is a read-only
  (``stateful_commit: false``) completion over the whole session.
- ``vllm-prefix-cache`` / ``vllm-no-cache``: stock vLLM; a question is a completion whose prompt is
  every tick so far plus the question.

Alignment: when a question is due, the feed waits until the previous question has finished and the
new one has been received by the server (response headers), so every provider answers question i over
exactly ticks 0..after_tick. Measured per question: latency (send to last byte, streamed), TTFT,
prompt tokens sent (``usage.prompt_tokens``), and context tokens: the prompt-side tokens the answer
attended to (feed so far + question). Stateless, that is ``usage.prompt_tokens``; stateful, the
response's ``session.context_tokens`` as the server reports it (vllm-stateful counts the query's own
tokens in it, so both agree to the token). Ingest lag (stateful): per append, from its
202 to the first ``GET /v1/sessions/{id}`` sample (polled every ``poll_interval_s``) whose
``context_tokens`` covers it; targets come from ``/tokenize`` of each tick, so a lag is an upper
bound by one poll interval plus a round trip. A question row carries the lag of the tick before it.

    python benchmarks/streaming_benchmark.py                      # every provider in the config, small model
    python benchmarks/streaming_benchmark.py --model tiny --ticks 60 --questions 6
    python benchmarks/streaming_benchmark.py --providers vllm-stateful --base-url http://127.0.0.1:8000/v1

Outputs (``--out``): ``streaming.csv``, ``streaming.png``, ``summary.md``, ``summary.json``; server
logs under ``log_dir``; the summary line goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import streaming_report as rep
from harness import REPO_ROOT
from harness.config import add_typed_options, load_config, override, select
from harness.http import BenchError, Streamed, astream_completion, check, retry_after
from harness.machine import cpu_env, machine_info, machine_line, model_dir, with_dtype
from harness.results import command_line, out_path, record_command, summary_header, write_json, write_text
from harness.servers import launched_server

DEFAULT_CONFIG = REPO_ROOT / "configs" / "bench_streaming.yaml"


@dataclass
class Answer:
    context_tokens: int
    prompt_tokens_sent: int
    latency_s: float
    ttft_s: float | None
    completion_tokens: int
    recomputed_tokens: int | None = None


@dataclass
class ProviderRun:
    """Everything one provider produced; ``append_lags`` is per tick (stateful only)."""

    provider: str
    rows: list[rep.QueryRow]
    append_lags: list[float | None] = field(default_factory=list)
    recomputed_tokens: list[int | None] = field(default_factory=list)
    append_retries: int = 0
    token_accounting: str = ""
    wall_s: float = 0.0
    warm_requests: int = 0  # stateless-warming: prefix-cache warming requests sent
    versions_behind: list[int] = field(default_factory=list)  # stateful-ingested: per answer
    staleness_ms: list[int] = field(default_factory=list)  # stateful-ingested: per answer (known ages only)


class _Provider:
    """HTTP client for one provider on one server. ``api_base`` ends in ``/v1``."""

    def __init__(
        self,
        name: str,
        api_base: str,
        model: str | None = None,
        max_tokens: int = 8,
        timeout_s: float = 900,
        api_key: str | None = None,
    ):
        self.name, self.model, self.max_tokens = name, model, max_tokens
        self.api_base = api_base.rstrip("/")
        self.root = self.api_base.removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=32), headers=headers)

    async def open(self, feed: rep.Feed) -> None:
        """Resolve the model name, warm the server up (one unrecorded completion)."""
        if self.model is None:
            self.model = check(await self.client.get(f"{self.api_base}/models"))["data"][0]["id"]
        await self._complete({"prompt": "warm up", "max_tokens": 2}, None)

    async def close(self) -> None:
        await self.client.aclose()

    async def _complete(self, body: dict[str, Any], received: asyncio.Event | None) -> Streamed:
        """Stream one completion (greedy, ``ignore_eos``); sets ``received`` on response headers."""
        return await astream_completion(self.client, self.api_base, body, self.model, received)

    async def append(self, tick: rep.Tick) -> None:
        raise NotImplementedError

    async def ask(self, q: rep.Question, received: asyncio.Event) -> Answer:
        raise NotImplementedError

    async def finish(self, run: ProviderRun) -> None:
        """Called once after the last answer; fills provider-specific fields of ``run``."""


class StatelessProvider(_Provider):
    """Stock vLLM: every question carries the full accumulated feed as its prompt."""

    async def open(self, feed: rep.Feed) -> None:
        await super().open(feed)
        self.feed = feed

    async def append(self, tick: rep.Tick) -> None:
        pass  # the feed lives on the client; the prompt is rebuilt from it per question

    async def ask(self, q: rep.Question, received: asyncio.Event) -> Answer:
        prompt = self.feed.text_through(q.after_tick) + q.prompt
        out = await self._complete({"prompt": prompt, "max_tokens": self.max_tokens}, received)
        sent = int(out.usage["prompt_tokens"])
        return Answer(sent, sent, out.latency_s, out.ttft_s, int(out.usage["completion_tokens"]))


class WarmingStatelessProvider(StatelessProvider):
    """Stock vLLM used carefully: as ticks arrive, every ``warm_every`` of them, a ``max_tokens: 1``
    request with the feed so far keeps vLLM's prefix cache warm (one in flight at a time; a batch
    that arrives while one runs is covered by the next), so a question prefills only its tail."""

    warm_every = 4

    async def open(self, feed: rep.Feed) -> None:
        await super().open(feed)
        self.seen = 0
        self.warm_requests = 0
        self._warming: asyncio.Task | None = None

    async def append(self, tick: rep.Tick) -> None:
        self.seen += 1
        if self.seen % self.warm_every == 0 and (self._warming is None or self._warming.done()):
            text = self.feed.text_through(tick.idx)
            self._warming = asyncio.create_task(self._complete({"prompt": text, "max_tokens": 1}, None))
            self.warm_requests += 1

    async def finish(self, run: ProviderRun) -> None:
        if self._warming is not None:
            await self._warming
        run.warm_requests = self.warm_requests


class StatefulProvider(_Provider):
    """vllm-stateful: ticks are appended to one session; questions are read-only session queries."""

    poll_interval_s = 0.05
    settle_s = 3.0
    consistency: str | None = None  # "ingested": questions do not wait for the append backlog
    max_staleness_ms: float | None = None  # with "ingested": they wait for appends older than this

    async def open(self, feed: rep.Feed) -> None:
        await super().open(feed)
        self.session_id = f"stream-bench-{uuid.uuid4().hex[:16]}"
        check(await self.client.post(f"{self.api_base}/sessions", json={"id": self.session_id}), 200, 201)
        self.base_tokens = (await self._sample())[1]
        self.tick_tokens = await self._count_tokens([t.line for t in feed.ticks])
        self.acks: list[float] = []
        self.samples: list[tuple[float, int]] = []
        self.retries = 0
        self.versions_behind: list[int] = []  # consistency "ingested": appends each answer did not see
        self.staleness_ms: list[int] = []  # ... and the age of the oldest of them when it read
        self._poller = asyncio.create_task(self._poll())

    async def _count_tokens(self, texts: list[str]) -> list[int]:
        sem = asyncio.Semaphore(8)

        async def one(text: str) -> int:
            async with sem:
                body = {"model": self.model, "prompt": text, "add_special_tokens": False}
                return int(check(await self.client.post(f"{self.root}/tokenize", json=body), 200)["count"])

        return list(await asyncio.gather(*(one(t) for t in texts)))

    async def _sample(self) -> tuple[float, int]:
        body = check(await self.client.get(f"{self.api_base}/sessions/{self.session_id}"), 200)
        return time.perf_counter(), int(body["context_tokens"])

    async def _poll(self) -> None:
        while True:
            self.samples.append(await self._sample())
            await asyncio.sleep(self.poll_interval_s)

    async def append(self, tick: rep.Tick, give_up_s: float = 300.0) -> None:
        """Append one tick; on 429/503 wait ``Retry-After`` and resend the same tick (never dropped)."""
        deadline = time.perf_counter() + give_up_s
        url = f"{self.api_base}/sessions/{self.session_id}/append"
        while True:
            resp = await self.client.post(url, json={"text": tick.line})
            if resp.status_code in (200, 202):
                self.acks.append(time.perf_counter())
                return
            if resp.status_code not in (429, 503) or time.perf_counter() > deadline:
                check(resp, 202)
            self.retries += 1
            await asyncio.sleep(retry_after(resp))

    async def ask(self, q: rep.Question, received: asyncio.Event) -> Answer:
        body = {
            "prompt": q.prompt,
            "max_tokens": self.max_tokens,
            "stateful": self.session_id,
            "stateful_commit": False,
            **({"consistency": self.consistency} if self.consistency else {}),
            **({"max_staleness_ms": self.max_staleness_ms} if self.max_staleness_ms is not None else {}),
        }
        out = await self._complete(body, received)
        session, usage = out.session, out.usage
        if not session:
            raise BenchError(f"completion on session {self.session_id} has no 'session' object: not vllm-stateful?")
        if "versions_behind" in session:
            self.versions_behind.append(int(session["versions_behind"]))
        if session.get("staleness_ms") is not None:
            self.staleness_ms.append(int(session["staleness_ms"]))
        return Answer(
            int(session["context_tokens"]),
            int(usage["prompt_tokens"]),
            out.latency_s,
            out.ttft_s,
            int(usage["completion_tokens"]),
            session.get("recomputed_tokens"),
        )

    async def finish(self, run: ProviderRun, timeout_s: float = 300.0) -> None:
        """Poll until the session covers every tick (or stops growing), then compute per-append lags."""
        expected = self.base_tokens + sum(self.tick_tokens)
        t_end, last_change = time.perf_counter() + timeout_s, time.perf_counter()
        while time.perf_counter() < t_end:
            prev = self.samples[-1][1] if self.samples else -1
            self.samples.append(await self._sample())
            if self.samples[-1][1] >= expected:
                break
            if self.samples[-1][1] != prev:
                last_change = time.perf_counter()
            elif time.perf_counter() - last_change > self.settle_s:
                break
            await asyncio.sleep(self.poll_interval_s)
        self._poller.cancel()
        self.samples.sort()
        final = self.samples[-1][1]
        # Exact when the server counts each append as its own tokenization; otherwise spread the
        # difference evenly over appends (a fixed per-append overhead) and say so.
        extra = (final - expected) / len(self.acks) if final != expected else 0.0
        run.token_accounting = "exact" if extra == 0 else f"off by {final - expected} tokens; spread per append"
        cum, targets = 0, []
        for k, n in enumerate(self.tick_tokens):
            cum += n
            targets.append(self.base_tokens + cum + extra * (k + 1))
        run.append_lags = rep.ingest_lags(self.acks, targets, self.samples)
        run.append_retries = self.retries
        if self.versions_behind:
            run.versions_behind = list(self.versions_behind)
        run.staleness_ms = list(self.staleness_ms)

    async def close(self) -> None:
        if getattr(self, "_poller", None):
            self._poller.cancel()
        if getattr(self, "session_id", None):
            try:
                await self.client.delete(f"{self.api_base}/sessions/{self.session_id}")
            except httpx.HTTPError:
                pass
        await super().close()


async def _until_received(received: asyncio.Event, task: asyncio.Task) -> None:
    waiter = asyncio.ensure_future(received.wait())
    try:
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        task.result()  # re-raise a failure before headers


async def run_provider(provider: _Provider, feed: rep.Feed, rate: float, log: bool = False) -> ProviderRun:
    """Replay ``feed`` at ``rate`` ticks/s against ``provider``; one row per question, in order.
    Questions run one at a time; the feed waits at a question point for the previous question."""
    run = ProviderRun(provider.name, [])
    answers: list[Answer] = []
    due = {q.after_tick: q for q in feed.questions}
    pending: asyncio.Task | None = None
    try:
        await provider.open(feed)
        t0 = time.perf_counter()
        for tick in feed.ticks:
            await asyncio.sleep(max(0.0, t0 + tick.idx / rate - time.perf_counter()))
            await provider.append(tick)
            q = due.get(tick.idx)
            if q is None:
                continue
            if pending is not None:
                answers.append(await pending)
            received = asyncio.Event()
            pending = asyncio.create_task(provider.ask(q, received))
            await _until_received(received, pending)
        if pending is not None:
            answers.append(await pending)
            pending = None
        run.wall_s = time.perf_counter() - t0
        await provider.finish(run)
    finally:
        if pending is not None:
            pending.cancel()
        await provider.close()
    for q, a in zip(feed.questions, answers):
        lag = run.append_lags[q.after_tick] if run.append_lags else None
        run.rows.append(
            rep.QueryRow(
                provider.name,
                q.idx,
                a.context_tokens,
                a.prompt_tokens_sent,
                a.latency_s,
                a.ttft_s,
                a.completion_tokens,
                lag,
            )
        )
        run.recomputed_tokens.append(a.recomputed_tokens)
        if log:
            print(
                f"[{provider.name}] q{q.idx} ctx={a.context_tokens} sent={a.prompt_tokens_sent} "
                f"latency={a.latency_s:.3f}s",
                file=sys.stderr,
            )
    return run


def run_provider_sync(provider: _Provider, feed: rep.Feed, rate: float, log: bool = False) -> ProviderRun:
    """``run_provider`` in a fresh event loop (the provider's client binds to it on first use)."""
    return asyncio.run(run_provider(provider, feed, rate, log))


def make_provider(
    kind: str,
    name: str,
    api_base: str,
    model: str | None,
    max_tokens: int,
    poll_interval_s: float = 0.05,
    api_key: str | None = None,
    max_staleness_ms: float | None = None,
) -> _Provider:
    if max_staleness_ms is not None and kind != "stateful-ingested":
        raise ValueError(f"provider {name!r}: max_staleness_ms needs kind stateful-ingested")
    if kind in ("stateful", "stateful-ingested"):
        p = StatefulProvider(name, api_base, model, max_tokens, api_key=api_key)
        p.poll_interval_s = poll_interval_s
        p.consistency = "ingested" if kind == "stateful-ingested" else None
        p.max_staleness_ms = max_staleness_ms
        return p
    if kind == "stateless":
        return StatelessProvider(name, api_base, model, max_tokens, api_key=api_key)
    if kind == "stateless-warming":
        return WarmingStatelessProvider(name, api_base, model, max_tokens, api_key=api_key)
    raise ValueError(f"unknown provider kind {kind!r} (stateful|stateful-ingested|stateless|stateless-warming)")


def write_outputs(runs: list[ProviderRun], cfg: dict[str, Any], out_dir: Path) -> str:
    """CSV, PNG, summary.md, summary.json under ``out_dir``; returns the summary line."""
    rows = [r for run in runs for r in run.rows]
    rep.write_csv(rows, out_dir / "streaming.csv")
    rep.plot_latency(rows, out_dir / "streaming.png")
    lags = {run.provider: [x for x in run.append_lags if x is not None] for run in runs}
    summaries, largest = rep.summarize(rows, lags, cfg["ref_tokens"], cfg["nearest_k"])
    table = rep.bucket_table(rows, cfg["bucket_edges"])
    machine = machine_info()
    details = f"{cfg['ticks']} ticks at {cfg['rate']}/s, {cfg['questions']} questions, max_tokens {cfg['max_tokens']}"
    header = summary_header("Streaming market-data benchmark", details, machine_line(machine))
    write_text(
        header + rep.markdown_report(table, summaries, largest, cfg["baseline"]) + run_notes(runs),
        out_dir / "summary.md",
    )
    speed = rep.speedups(summaries, cfg["baseline"]) if any(s.provider == cfg["baseline"] for s in summaries) else {}
    summary = {
        "config": cfg,
        "command": command_line(),
        "machine": machine,
        "largest_context": largest,
        "providers": [asdict(s) for s in summaries],
        "speedups_of_baseline": speed,
        "buckets": [asdict(b) for b in table],
        "runs": {run.provider: run_details(run) for run in runs},
    }
    write_json(summary, out_dir / "summary.json")
    return rep.summary_line(summaries, largest, cfg["baseline"])


def run_notes(runs: list[ProviderRun]) -> str:
    """Lines under the summary table for the providers that warmed a cache or answered behind."""
    notes = [
        f"{run.provider}: {run.warm_requests} prefix-cache warming requests (max_tokens 1, the feed so far)"
        for run in runs
        if run.warm_requests
    ] + [
        f"{run.provider}: answers were {statistics.median(run.versions_behind)} versions behind the acknowledged "
        f"feed at the median, {max(run.versions_behind)} at most (consistency: ingested)"
        + (
            f"; the oldest append an answer missed was {statistics.median(run.staleness_ms) / 1000:.1f} s old "
            f"at the median, {max(run.staleness_ms) / 1000:.1f} s at most"
            if run.staleness_ms
            else ""
        )
        for run in runs
        if run.versions_behind
    ]
    return "".join(f"\n{n}\n" for n in notes)


def run_details(run: ProviderRun) -> dict[str, Any]:
    recomputed = run.recomputed_tokens if any(x is not None for x in run.recomputed_tokens) else None
    out: dict[str, Any] = {
        "append_retries": run.append_retries,
        "wall_s": run.wall_s,
        "token_accounting": run.token_accounting,
        "appends_never_covered": sum(x is None for x in run.append_lags),
        "recomputed_tokens": recomputed,
    }
    if run.warm_requests:
        out["warm_requests"] = run.warm_requests
    if run.versions_behind:
        out.update(versions_behind=run.versions_behind, versions_behind_max=max(run.versions_behind))
    if run.staleness_ms:
        out.update(staleness_ms=run.staleness_ms, staleness_ms_max=max(run.staleness_ms))
    return out


def main(argv: list[str] | None = None) -> int:
    record_command(__file__, argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"YAML defaults (default {DEFAULT_CONFIG})")
    keys = ("model", "seed", "ticks", "questions", "rate", "max_tokens", "out_dir")
    add_typed_options(ap, zip(keys, (str, int, int, int, float, int, str)))
    ap.add_argument(
        "--providers", default=None, help="comma-separated provider names to run (default: all in the config)"
    )
    ap.add_argument("--base-url", default=None, help="use this running server (…/v1) for the one selected provider")
    ap.add_argument(
        "--model-name", default=None, help="served model name with --base-url (default: first of /v1/models)"
    )
    a = ap.parse_args(argv)
    cfg = override(load_config(a.config), a, keys)
    names = select([p["name"] for p in cfg["providers"]], a.providers)
    providers = [p for p in cfg["providers"] if p["name"] in names]
    if a.base_url and len(providers) != 1:
        raise SystemExit("--base-url needs exactly one provider (--providers NAME)")
    feed = rep.make_feed(cfg["ticks"], cfg["questions"], cfg["seed"], jitter=cfg["question_jitter"])
    out_dir, srv = out_path(cfg["out_dir"]), cfg["server"]
    runs: list[ProviderRun] = []
    for p in providers:
        print(
            f"[{p['name']}] {len(feed.ticks)} ticks at {cfg['rate']}/s, {len(feed.questions)} questions",
            file=sys.stderr,
        )

        def once(api_base: str, model: str | None, p: dict[str, Any] = p) -> ProviderRun:
            prov = make_provider(p["kind"], p["name"], api_base, model, cfg["max_tokens"], cfg["poll_interval_s"],
                                 max_staleness_ms=p.get("max_staleness_ms"))  # fmt: skip
            return run_provider_sync(prov, feed, cfg["rate"], log=True)

        if a.base_url:
            runs.append(once(a.base_url, a.model_name))
        else:
            model = model_dir(str(cfg["model"]))
            log_path = out_path(cfg["log_dir"]) / f"server-{p['name']}.log"
            kind = "stateful" if p["server"] == "stateful" else "vllm"
            args = with_dtype([*srv["common_args"], *p.get("args", [])], str(cfg["model"]))
            env = cpu_env(overrides=srv.get("cpu_env"))
            with launched_server(kind, str(model), model.name, args, log_path, env, srv["startup_timeout_s"]) as api:
                runs.append(once(api, model.name))
        rep.write_csv([r for run in runs for r in run.rows], out_dir / "streaming.csv")  # keep partial results
    print(write_outputs(runs, cfg, out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
