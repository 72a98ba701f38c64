"""Flash-query benchmark: the streaming market-data feed, with the questions answered three ways.

The seeded feed and questions of ``streaming_report.make_feed`` are replayed at ``--rate`` ticks/s
(``streaming_benchmark.run_provider``: a question is asked right after its tick is acknowledged, the
feed waits until it has been received). Providers, one after another, same feed and questions:

- ``flash`` (vllm-stateful): ticks are appended to a session; every distinct question is registered
  up front as a greedy flash query (``POST /v1/sessions/{id}/flash_queries``, ``ignore_eos``, the
  same ``max_tokens``). Asking = reading the cached answer, ``GET .../flash_queries/{fid}``: latency
  of that GET, and freshness ``versions_behind = version of the last append's 202 - answer version``
  (the read comes right after an append, so at best it finds the version before it: 1 behind).
- ``stateful-query`` (vllm-stateful, same server, its own session without flash queries): the
  question as a streamed read-only completion (``stateful_commit: false``), latency to the last
  byte; streamed queries never hit a flash cache, so this is the stateful-KV path
  (``session.flash_hit`` is recorded).
- ``vllm-prefix-cache``: stock vLLM with prefix caching, prompt = every tick so far + the question.

Context tokens: what the question attends to at ask time (``session.context_tokens`` for stateful
queries, ``usage.prompt_tokens`` for stock vLLM; for flash, the ``/tokenize`` counts of the
session's base, the ticks so far and the question). Latency p50/p95 per provider and feed third,
flash freshness, and the ablation (``flash_report``: speed-up from stateful KV reuse vs from flash
queries, as log-ratio shares of the total) go to ``flash.csv``, ``summary.md``, ``summary.json``
(with the machine: device, CPU model, ISA flags) and ``flash.png`` under ``--out``; the summary
table is printed. Defaults (model, feed, server flags) come from ``configs/bench_streaming.yaml``.

    python benchmarks/flash_benchmark.py                        # small model, the streaming defaults
    python benchmarks/flash_benchmark.py --model tiny --ticks 40 --questions 6
    python benchmarks/flash_benchmark.py --providers flash,stateful-query --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import flash_report as fr
import httpx
import streaming_benchmark as sb
import streaming_report as rep
from harness.config import add_typed_options, load_config, override, select
from harness.http import BenchError, Streamed, check
from harness.machine import cpu_env, detect_device, machine_info, machine_line, model_dir, with_dtype
from harness.results import columns_of, out_path, record_command, summary_header, write_json, write_rows, write_text
from harness.servers import launched_server

DEFAULT_OUT = "benchmarks/results/flash"
COLUMNS = columns_of(fr.FlashRow)


class FlashProvider(sb.StatefulProvider):
    """Appends like ``vllm-stateful``; a question is a read of its flash query's cached answer."""

    async def open(self, feed: rep.Feed) -> None:
        await super().open(feed)  # session, tick token counts, ingest-lag poller
        hooks = self.client.event_hooks
        self.client.event_hooks = {**hooks, "response": [*hooks.get("response", []), self._seen]}
        self.version: int | None = None
        self.extras: dict[int, dict[str, Any]] = {}
        self.evaluations: dict[str, int] = {}
        q_tokens = await self._count_tokens([q.prompt for q in feed.questions])
        self.q_tokens = {q.idx: n for q, n in zip(feed.questions, q_tokens)}
        self.fids: dict[str, str] = {}
        url = f"{self.api_base}/sessions/{self.session_id}/flash_queries"
        for q in feed.questions:
            if q.prompt in self.fids:
                continue
            body = {"name": f"q{q.idx}", "prompt": q.prompt, "max_tokens": self.max_tokens, "ignore_eos": True}
            resp = await self.client.post(url, json=body)
            if resp.status_code == 429:
                raise BenchError(
                    f"{len(self.fids) + 1} flash queries on one session refused ({resp.text[:200]}); serve with "
                    '--additional-config \'{"stateful": {"max_flash_queries_per_session": N}}\' or fewer --questions'
                )
            self.fids[q.prompt] = check(resp, 201)["id"]

    async def _seen(self, resp: httpx.Response) -> None:
        """Response hook: the version each acknowledged append made (its 202 body)."""
        if resp.request.method == "POST" and resp.url.path.endswith("/append") and resp.status_code in (200, 202):
            await resp.aread()
            self.version = int(resp.json()["version"])

    async def ask(self, q: rep.Question, received: Any) -> sb.Answer:
        fid, current = self.fids[q.prompt], self.version
        url = f"{self.api_base}/sessions/{self.session_id}/flash_queries/{fid}"
        t0 = time.perf_counter()
        resp = await self.client.get(url, params={"include_tokens": "true"})
        lat = time.perf_counter() - t0
        received.set()
        body = check(resp, 200)
        self.evaluations[fid] = int(body.get("evaluations") or 0)
        computed = body.get("computed_at")
        self.extras[q.idx] = {
            "current_version": current,
            "answer_version": body.get("version"),
            "versions_behind": fr.versions_behind(current, body.get("version")),
            "stale": bool(body.get("stale")),
            "confidence": body.get("confidence"),
            "answer_age_s": None if computed is None else max(0.0, time.time() - float(computed)),
            "evaluations": self.evaluations[fid],
            "flash_error": body.get("error"),
        }
        ctx = self.base_tokens + sum(self.tick_tokens[: q.after_tick + 1]) + self.q_tokens[q.idx]
        return sb.Answer(ctx, 0, lat, lat, len(body.get("answer_token_ids") or []))


class StatefulQuery(sb.StatefulProvider):
    """``vllm-stateful``'s read-only session query, also recording ``session.flash_hit``."""

    async def open(self, feed: rep.Feed) -> None:
        await super().open(feed)
        self.extras: dict[int, dict[str, Any]] = {}

    async def _complete(self, body: dict[str, Any], received: Any) -> Streamed:
        out = await super()._complete(body, received)
        self._session_obj = out.session or {}
        return out

    async def ask(self, q: rep.Question, received: Any) -> sb.Answer:
        answer = await super().ask(q, received)
        self.extras[q.idx] = {"flash_hit": self._session_obj.get("flash_hit")}
        return answer


def to_rows(run: sb.ProviderRun, extras: dict[int, dict[str, Any]], feed: rep.Feed) -> list[fr.FlashRow]:
    n = len(feed.ticks)
    return [
        fr.FlashRow(**asdict(r), after_tick=q.after_tick, third=fr.third_of(q.after_tick, n), **extras.get(q.idx, {}))
        for r, q in zip(run.rows, feed.questions)
    ]


def run_all(cfg: dict[str, Any], wanted: list[str], feed: rep.Feed, base_url: str | None, model_name: str | None):
    """Run the wanted providers (stateful ones on one server); yields (name, run, extras, provider)."""
    srv = cfg["server"]
    args = {p["name"]: p.get("args", []) for p in cfg["providers"]}
    env = cpu_env(overrides=srv.get("cpu_env"))
    log_dir = out_path(Path(cfg["log_dir"]).parent / "flash")

    def launch(kind: str, name: str, extra: list[str]):
        model = model_dir(str(cfg["model"]))
        argv, log = with_dtype([*srv["common_args"], *extra], str(cfg["model"])), log_dir / f"server-{name}.log"
        return launched_server(kind, str(model), model.name, argv, log, env, srv["startup_timeout_s"])

    def one(name: str, api_base: str, model: str | None):
        cls = {fr.FLASH: FlashProvider, fr.STATEFUL_QUERY: StatefulQuery}.get(name)
        if cls is None:
            prov = sb.make_provider("stateless", name, api_base, model, cfg["max_tokens"])
        else:
            prov = cls(name, api_base, model, cfg["max_tokens"])
            prov.poll_interval_s = cfg["poll_interval_s"]
        print(f"[{name}] {len(feed.ticks)} ticks at {cfg['rate']}/s, {len(feed.questions)} questions", file=sys.stderr)
        run = sb.run_provider_sync(prov, feed, cfg["rate"], log=True)
        return name, run, getattr(prov, "extras", {}), prov

    stateful = [p for p in (fr.FLASH, fr.STATEFUL_QUERY) if p in wanted]
    if stateful and base_url:
        for p in stateful:
            yield one(p, base_url, model_name)
    elif stateful:
        distinct = len({q.prompt for q in feed.questions})
        cap = ["--additional-config", json.dumps({"stateful": {"max_flash_queries_per_session": max(8, distinct)}})]
        extra = [*args.get("vllm-stateful", []), *(cap if fr.FLASH in stateful else [])]
        with launch("stateful", "vllm-stateful", extra) as api_base:
            for p in stateful:
                yield one(p, api_base, None)
    if fr.PREFIX_CACHE in wanted:
        with launch("vllm", fr.PREFIX_CACHE, args.get(fr.PREFIX_CACHE, ["--enable-prefix-caching"])) as api_base:
            yield one(fr.PREFIX_CACHE, api_base, None)


def write_outputs(rows: list[fr.FlashRow], runs: dict[str, Any], cfg: dict, machine: dict, out: Path) -> str:
    write_rows(rows, out / "flash.csv", COLUMNS)
    rep.plot_latency(rows, out / "flash.png", title="Answer latency vs context (streaming feed)")
    stats = fr.latency_table(rows)
    fresh, abl = fr.freshness(rows), fr.ablation_table(stats)
    table = fr.markdown_report(stats, fresh, abl, machine_line(machine))
    details = f"{cfg['ticks']} ticks at {cfg['rate']}/s, {cfg['questions']} questions, max_tokens {cfg['max_tokens']}"
    write_text(summary_header("Flash-query benchmark (streaming feed)", details) + table, out / "summary.md")
    summary = {
        "config": cfg,
        "machine": machine,
        "latency": [asdict(s) for s in stats],
        "freshness": asdict(fresh),
        "ablation": [asdict(a) for a in abl],
        "runs": runs,
    }
    write_json(summary, out / "summary.json")
    return table


def main(argv: list[str] | None = None) -> int:
    record_command(__file__, argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=None, help=f"YAML defaults (default {sb.DEFAULT_CONFIG})")
    add_typed_options(ap, (("model", str), ("seed", int), ("ticks", int), ("questions", int), ("rate", float)))
    ap.add_argument("--max-tokens", dest="max_tokens", type=int, default=None, help="per answer (flash: 1-256)")
    ap.add_argument("--out", dest="out_dir", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--providers", default=",".join(fr.PROVIDERS), help="comma-separated subset of %(default)s")
    ap.add_argument("--base-url", default=None, help="running vllm-stateful server (…/v1) for flash/stateful-query")
    ap.add_argument("--model-name", default=None, help="served model name with --base-url (default: first listed)")
    a = ap.parse_args(argv)
    keys = ("model", "seed", "ticks", "questions", "rate", "max_tokens", "out_dir")
    cfg = override(load_config(a.config or sb.DEFAULT_CONFIG, detect_device()), a, keys)
    wanted = select(fr.PROVIDERS, a.providers)
    feed = rep.make_feed(cfg["ticks"], cfg["questions"], cfg["seed"], jitter=cfg["question_jitter"])
    out, machine = out_path(cfg["out_dir"]), machine_info()
    rows: list[fr.FlashRow] = []
    runs: dict[str, Any] = {}
    for name, run, extras, prov in run_all(cfg, wanted, feed, a.base_url, a.model_name):
        rows += to_rows(run, extras, feed)
        runs[name] = {
            "wall_s": run.wall_s,
            "append_retries": run.append_retries,
            "token_accounting": run.token_accounting,
            "flash_evaluations": sum(getattr(prov, "evaluations", {}).values()) or None,
            "flash_hits": sum(bool(e.get("flash_hit")) for e in extras.values()) if name == fr.STATEFUL_QUERY else None,
        }
        write_rows(rows, out / "flash.csv", COLUMNS)  # keep partial results
    print(write_outputs(rows, runs, cfg, machine, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
