"""Soak: many sessions x many turns under churn, then exact accounting.

N session slots (ids ``soak-<i>``) are driven concurrently for T turns each,
with 1-3 random token ids per turn (greedy, 1-2 generated tokens), while:

* random DELETEs end an incarnation and the same id is reused (the first
  response of the new incarnation must say ``version == 1``); an incarnation
  is also deleted once its history passes ``HISTORY_CAP`` tokens;
* some incarnations are created with ``POST /v1/sessions {"ttl_s": 1}`` and
  left idle past their TTL: either the client polls until the session is gone
  (it must expire) or the next turn re-creates it (``version == 1``). A
  session vanishing is accepted only for a TTL incarnation that the server can
  have seen idle for its TTL (see ``Soak.may_have_expired``: a sound bound from
  the client's send/receive times, however slow the server); a session without
  a short TTL must never vanish;
* some turns are streamed and the client hangs up after the first chunk. Once
  no turn is in flight on the session (a probe that is 409 ``session_busy``
  while one is, 413 otherwise) the turn has either rolled back (tokens and
  version unchanged) or committed in full (version + 1, history + new + all
  requested tokens): nothing else is accepted. Some hang-ups are followed at
  once by a DELETE, so the close races the aborting turn;
* bursts of stateless requests with long prompts overfill the free KV pool, so
  vLLM preempts (running session turns included);
* a few turns ask for more than the session quota: 429, session unchanged.
  429s for the cell budget are allowed too; any other error fails the test.

The client keeps its own expected history per incarnation, and checks it
against the server before every DELETE and idle, after every 429 and at the
end. Afterwards every surviving session's tokens equal it exactly and its
version counts its commits; every generated token of every incarnation
(surviving or retired) is the greedy choice of an independent stock vLLM
engine (prefix caching off) given everything before it, and a corrupted
control history must be caught; the engine's pins match the API's view
(integrity report); after deleting everything the free KV blocks are back to
the baseline (0 leaked). The figures are printed in one line starting with
``SOAK``.

Size: ``SOAK_SESSIONS`` (default 64) x ``SOAK_TURNS`` (default 200), the
issue's size, which drives for about 2 minutes on a 2-core machine (about
3 minutes with the server start and the reference check; 4-5 minutes when
the machine is shared with other work). ``SOAK_SEED`` picks each slot's
action sequence, ``SOAK_PRESSURE_PAUSE_S`` the pause between stateless
bursts. A quick run while developing:

    SOAK_SESSIONS=8 SOAK_TURNS=30 .venv/bin/python -m pytest tests/e2e/test_soak.py -x -q -s
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from tests.e2e.conftest import BLOCK_SIZE, KEY_A, MAX_MODEL_LEN, SESSION_QUOTA

pytestmark = pytest.mark.e2e

N_SESSIONS = int(os.environ.get("SOAK_SESSIONS", "64"))
N_TURNS = int(os.environ.get("SOAK_TURNS", "200"))
SEED = int(os.environ.get("SOAK_SEED", "20240917"))
PRESSURE_PAUSE_S = float(os.environ.get("SOAK_PRESSURE_PAUSE_S", "4"))

HISTORY_CAP = 224  # an incarnation whose history passes this is deleted (far below the 1536-token quota)
P_DELETE = 0.03
P_STREAM = 0.04
P_OVER_QUOTA = 0.01  # a turn asking for more tokens than the session quota: must be a 429, session unchanged
P_TTL_INCARNATION = 0.4  # share of new incarnations created with POST /v1/sessions {"ttl_s": 1}
P_IDLE = 0.06  # per turn of a TTL incarnation: leave it idle past its TTL first
P_DELETE_MID_TURN = 0.25  # share of disconnects followed at once by a DELETE
TTL_S = 1.0
IDLE_S = TTL_S + 2.0
STREAM_MAX_TOKENS = (50, 50, 50, 2)  # a short one may commit before the hang-up is noticed
# Stateless bursts: enough requests of 1200 + 400 tokens (38 blocks admitted, 51 at the end) that the
# running ones cannot all grow in the free pool, so vLLM preempts. vLLM admits requests in order, so a
# burst also holds back the session turns queued behind it: bursts, then a pause.
PRESSURE_PROMPT, PRESSURE_MAX_TOKENS = 1200, 400
BURST_MAX = 16
AUTH = {"Authorization": f"Bearer {KEY_A}"}


def _tokens(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randrange(10, 3000) for _ in range(rng.randint(lo, hi))]


@dataclass
class Incarnation:
    sid: str
    number: int
    ttl: float | None
    history: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)  # positions in history the server generated
    version: int = 0
    turns: int = 0
    created_with_content: bool = False
    alive: bool = True
    end: str = ""  # why it was retired

    def commit(self, new: list[int], gen: list[int]) -> None:
        start = len(self.history) + len(new)
        self.history += new + gen
        self.generated += range(start, start + len(gen))
        self.version += 1
        self.turns += 1

    def check_version(self) -> None:
        assert self.version == self.turns + int(self.created_with_content), self


@dataclass
class Slot:
    index: int
    rng: random.Random
    inc: Incarnation | None = None
    retired: list[Incarnation] = field(default_factory=list)
    # When the client sent the last request that touched the session (the server
    # touched it after receiving that request): the server's idle clock started later.
    touch_sent: float = field(default_factory=time.monotonic)
    idling: bool = False  # deliberately left idle past its TTL, until the next turn
    log: list[str] = field(default_factory=list)

    @property
    def sid(self) -> str:
        return f"soak-{self.index}"

    @property
    def alive(self) -> bool:
        return self.inc is not None and self.inc.alive

    def note(self, what: str) -> None:
        self.log.append(f"{time.monotonic():.2f} {what}")

    def trail(self) -> str:
        return f"(seed {SEED}; last actions of {self.sid}: {self.log[-6:]})"


class Soak:
    def __init__(self, http: httpx.AsyncClient, oa: openai.AsyncOpenAI, server_log) -> None:
        self.http = http
        self.oa = oa
        self.server_log = server_log
        self.figures: Counter = Counter()
        self.codes_429: Counter = Counter()
        self.max_rollback_wait = 0.0
        self.turn_latencies: list[float] = []

    # --- helpers -----------------------------------------------------------------

    async def get(self, sid: str) -> httpx.Response:
        return await self.http.get(f"/v1/sessions/{sid}", params={"include_tokens": "true"})

    @staticmethod
    def may_have_expired(slot: Slot, seen_at: float, since: float | None = None) -> bool:
        """Whether the server can have seen the alive incarnation idle for its TTL before it
        answered a request whose answer the client got at ``seen_at``.

        The server's idle clock started after the last touching request was sent
        (``since``, default ``touch_sent``) and the server expired the session before
        it answered: it was idle at most ``seen_at - since``, however slow the server.
        """
        inc = slot.inc
        since = slot.touch_sent if since is None else since
        return inc is not None and inc.alive and inc.ttl is not None and seen_at - since >= inc.ttl

    def expired(self, slot: Slot, seen_by: str, windows: list[tuple[float, float]] | None = None) -> None:
        """The server says the alive incarnation is gone: only a TTL expiry may do that, within one
        of the ``(since, seen_at)`` windows (default: since the last touch until now)."""
        inc = slot.inc
        windows = windows or [(slot.touch_sent, time.monotonic())]
        assert any(self.may_have_expired(slot, seen_at, since) for since, seen_at in windows), (
            f"{slot.sid}: session gone (seen by {seen_by}) at most {[round(b - a, 2) for a, b in windows]}s after "
            f"it was last used, ttl {inc.ttl if inc else None} {slot.trail()}"
        )
        slot.note(f"expired, seen by {seen_by}")
        self.retire(slot, f"expired (seen by {seen_by})")
        self.figures["expiries"] += 1
        self.figures[f"expiries_seen_by_{seen_by}"] += 1
        if not slot.idling:
            self.figures["expiries_unplanned"] += 1

    async def check_matches(self, slot: Slot, what: str) -> dict | None:
        """The server's session equals the client's expected incarnation exactly; None if it expired."""
        inc = slot.inc
        assert inc is not None and inc.alive
        r = await self.get(slot.sid)
        if r.status_code == 404:
            self.expired(slot, "get")
            return None
        assert r.status_code == 200, f"{slot.sid} ({what}): {r.status_code} {r.text} {slot.trail()}"
        body = r.json()
        assert body["token_ids"] == inc.history, f"{slot.sid} ({what}): history differs {slot.trail()}"
        assert body["version"] == inc.version, f"{slot.sid} ({what}): version {body['version']} != {inc.version}"
        assert body["context_tokens"] == len(inc.history) and body["state"] == "resident", body
        inc.check_version()
        return body

    async def check_unchanged_or_absent(self, slot: Slot, what: str) -> None:
        if slot.alive:
            await self.check_matches(slot, what)
        else:  # a refused first request leaves no session behind
            r = await self.get(slot.sid)
            assert r.status_code == 404, f"{slot.sid} ({what}): {r.status_code} {r.text} {slot.trail()}"

    def new_incarnation(self, slot: Slot, ttl: float | None) -> Incarnation:
        previous = slot.inc
        assert previous is None or not previous.alive
        number = 0 if previous is None else previous.number + 1
        if number:
            self.figures["id_reuses"] += 1
        slot.inc = Incarnation(slot.sid, number, ttl)
        self.figures["incarnations"] += 1
        return slot.inc

    def retire(self, slot: Slot, why: str) -> None:
        inc = slot.inc
        assert inc is not None and inc.alive
        inc.alive, inc.end = False, why
        slot.retired.append(inc)

    def server_errors(self) -> str:
        """The server log's last unexpected-error traceback, for failure messages."""
        text = self.server_log.read_text(errors="replace")
        at = max(text.rfind("Traceback"), text.rfind("vllm-stateful: unexpected error"))
        return text[at : at + 6000] if at >= 0 else "(no traceback in the server log)"

    def refused(self, slot: Slot, status: int, body: str, what: str) -> None:
        """A refusal is allowed only as a 429 (cell budget or session quota)."""
        if status >= 500:
            raise AssertionError(f"{slot.sid} ({what}): {status} {body} {slot.trail()}\n{self.server_errors()}")
        assert status == 429, f"{slot.sid} ({what}): {status} {body} {slot.trail()}"
        code = json.loads(body)["error"]["code"]
        assert code in ("cell_budget_exceeded", "session_quota_exceeded"), body
        slot.note(f"{what}: 429 {code}")
        self.figures["rejected_429"] += 1
        self.codes_429[code] += 1

    # --- actions -------------------------------------------------------------------

    async def turn(self, slot: Slot) -> None:
        rng = slot.rng
        new, max_tokens = _tokens(rng, 1, 3), rng.randint(1, 2)
        over_quota = rng.random() < P_OVER_QUOTA
        if over_quota:
            max_tokens = SESSION_QUOTA  # new + max_tokens is always over the quota, never over the context
        sent_at = time.monotonic()
        try:
            r = await self.oa.completions.create(
                model="tiny",
                prompt=new,
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"stateful": slot.sid, "return_token_ids": True},
            )
        except openai.APIStatusError as err:
            received_at = time.monotonic()
            self.refused(slot, err.status_code, err.response.text, "turn")
            expected = "session_quota_exceeded" if over_quota else "cell_budget_exceeded"
            assert err.response.json()["error"]["code"] == expected, (err.response.text, slot.trail())
            # had the session expired, the request met a new one, which its refusal removed again
            if self.may_have_expired(slot, received_at) and (await self.get(slot.sid)).status_code == 404:
                self.expired(slot, "turn", [(slot.touch_sent, received_at)])
            else:
                slot.touch_sent = sent_at
                await self.check_unchanged_or_absent(slot, "after a 429")
            if not over_quota:
                await asyncio.sleep(0.2)  # the budget frees up as other sessions are deleted
            return
        received_at = time.monotonic()
        assert not over_quota, f"{slot.sid}: a turn over the session quota was accepted {slot.trail()}"
        self.turn_latencies.append(received_at - sent_at)
        s = r.model_extra["session"]
        gen = list(r.choices[0].model_extra["token_ids"])
        assert 1 <= len(gen) <= max_tokens and r.usage.completion_tokens == len(gen), r
        inc = slot.inc
        if slot.alive and s["version"] == 1 and inc.version >= 1:  # a new session under the id
            self.expired(slot, "turn", [(slot.touch_sent, received_at)])
        if not slot.alive:  # a new incarnation: first use after DELETE / expiry (or the very first)
            assert s["version"] == 1 and s["context_tokens"] == len(new), (s, slot.trail())
            inc = self.new_incarnation(slot, None)
        else:
            assert s["version"] == inc.version + 1, (s, inc.version, slot.trail())
            assert s["context_tokens"] == len(inc.history) + len(new), (s, len(inc.history), slot.trail())
            assert s["recomputed_tokens"] == 0, (s, slot.trail())
        slot.touch_sent = sent_at
        inc.commit(new, gen)
        slot.note(f"turn -> v{inc.version}")
        self.figures["turns_committed"] += 1

    async def create_ttl(self, slot: Slot) -> None:
        """A new incarnation through POST /v1/sessions, with a 1 s TTL and some content."""
        content = _tokens(slot.rng, 4, 24)
        sent_at = time.monotonic()
        r = await self.http.post("/v1/sessions", json={"id": slot.sid, "ttl_s": TTL_S, "prompt": content})
        if r.status_code != 201:
            self.refused(slot, r.status_code, r.text, "create")
            await self.check_unchanged_or_absent(slot, "after a refused create")
            return
        body = r.json()
        assert body["version"] == 1 and body["context_tokens"] == len(content) and body["ttl_s"] == TTL_S, body
        inc = self.new_incarnation(slot, TTL_S)
        inc.history, inc.version, inc.created_with_content = list(content), 1, True
        slot.touch_sent = sent_at
        slot.note("created with ttl")
        self.figures["ttl_incarnations"] += 1

    async def delete(self, slot: Slot) -> None:
        before = await self.check_matches(slot, "before DELETE")
        if before is None:
            return
        r = await self.http.delete(f"/v1/sessions/{slot.sid}")
        if r.status_code == 404:
            self.expired(slot, "delete")
            return
        assert r.status_code == 200, f"{r.text} {slot.trail()}"
        assert r.json()["deleted"] is True and r.json()["freed_blocks"] == before["pinned_blocks"], (
            r.json(),
            before["pinned_blocks"],
        )
        slot.note("deleted")
        self.retire(slot, "deleted")
        self.figures["deletes"] += 1

    async def idle_past_ttl(self, slot: Slot) -> None:
        """Leave a TTL incarnation idle past its TTL; half the time wait until it is gone."""
        if await self.check_matches(slot, "before idling") is None:
            return
        slot.idling = True
        slot.note("idling")
        await asyncio.sleep(IDLE_S)
        self.figures["ttl_idles"] += 1
        if slot.rng.random() < 0.5:
            return  # the next turn finds it expired (or, rarely, not yet): both are accepted
        deadline = time.monotonic() + 15
        while (r := await self.get(slot.sid)).status_code == 200:
            assert time.monotonic() < deadline, f"{slot.sid}: ttl {TTL_S}s, still there after {IDLE_S + 15}s idle"
            await asyncio.sleep(0.2)
        assert r.status_code == 404, r.text
        self.expired(slot, "get")

    async def stream_and_hang_up(self, slot: Slot) -> None:
        """A streamed turn whose client hangs up after the first chunk."""
        rng = slot.rng
        new, max_tokens = _tokens(rng, 1, 3), rng.choice(STREAM_MAX_TOKENS)
        was_alive = slot.alive
        before_hist = list(slot.inc.history) if was_alive else []
        before_version = slot.inc.version if was_alive else 0
        body = {
            "model": "tiny",
            "prompt": new,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
            "stateful": slot.sid,
            "return_token_ids": True,
        }
        touched_before, sent_at = slot.touch_sent, time.monotonic()
        async with self.http.stream("POST", "/v1/completions", json=body) as resp:
            answered_at = time.monotonic()
            # the session may have expired before the stream met it (then it met a new one),
            # or, once the stream touched it, after the stream
            before_stream = (touched_before, answered_at)
            expired_before = self.may_have_expired(slot, answered_at)
            if resp.status_code != 200:
                await resp.aread()
                self.refused(slot, resp.status_code, resp.text, "stream")
                if expired_before and (await self.get(slot.sid)).status_code == 404:
                    self.expired(slot, "stream", [before_stream])
                else:
                    slot.touch_sent = sent_at
                    await self.check_unchanged_or_absent(slot, "after a refused stream")
                return
            first = None
            async for line in resp.aiter_lines():
                if line.strip():
                    first = line
                    break
            assert first is not None and first.startswith("data: {"), first
            chunk = json.loads(first.removeprefix("data: "))
            assert "error" not in chunk, chunk
            # a first chunk that is already the final one follows the commit
            finished_first = chunk["choices"][0]["finish_reason"] is not None
        # leaving the block closed the connection mid-stream
        self.figures["disconnects"] += 1
        slot.note("stream, hung up")
        if was_alive and rng.random() < P_DELETE_MID_TURN:
            r = await self.http.delete(f"/v1/sessions/{slot.sid}")
            if r.status_code == 404:
                self.expired(slot, "stream", [before_stream, (sent_at, time.monotonic())])
            else:
                assert r.status_code == 200 and r.json()["deleted"] is True, r.text
                slot.note("deleted right after hanging up")
                self.retire(slot, "deleted right after a disconnect")
                self.figures["deletes"] += 1
            self.figures["disconnects_then_deleted"] += 1
            return
        await self.wait_no_turn_in_flight(slot)
        r = await self.get(slot.sid)
        after_stream = (sent_at, time.monotonic())
        prompt = before_hist + new
        if r.status_code == 404:
            assert was_alive or not finished_first, f"{slot.sid}: a committed first turn vanished {slot.trail()}"
            if was_alive:
                self.expired(slot, "stream", [before_stream, after_stream])
            self.figures["disconnects_rolled_back_or_gone"] += 1
            return
        assert r.status_code == 200, f"{slot.sid}: {r.status_code} {r.text}"
        got = r.json()
        if got["version"] == before_version and got["token_ids"] == before_hist and not finished_first:
            slot.note("stream rolled back")
            self.figures["disconnects_rolled_back"] += 1
            return
        if expired_before and got["version"] == 1 and before_version >= 1:
            self.expired(slot, "stream", [before_stream])
            before_version, prompt = 0, list(new)
        # committed before the disconnect was noticed: all of it, exactly once
        assert got["version"] == before_version + 1, (got["version"], before_version, slot.trail())
        assert got["token_ids"][: len(prompt)] == prompt, f"{slot.sid}: history after disconnect differs"
        gen = got["token_ids"][len(prompt) :]
        assert len(gen) == max_tokens, (slot.sid, len(gen), max_tokens)
        if finished_first:
            assert gen == chunk["choices"][0]["token_ids"], (gen, chunk)
        inc = slot.inc if slot.alive else self.new_incarnation(slot, None)
        inc.commit(new, gen)
        slot.note(f"stream committed -> v{inc.version}")
        self.figures["disconnects_committed"] += 1
        self.figures["turns_committed"] += 1

    async def wait_no_turn_in_flight(self, slot: Slot) -> None:
        """Probe with a committing request that cannot fit the context: a 409 while a turn is in
        flight, else a 413 that is refused before anything is reserved or changed."""
        start = time.monotonic()
        probe = {"model": "tiny", "prompt": [11], "max_tokens": MAX_MODEL_LEN, "stateful": slot.sid}
        while True:
            sent_at = time.monotonic()
            r = await self.http.post("/v1/completions", json=probe)
            code = r.json()["error"]["code"] if r.status_code >= 400 else None
            if r.status_code == 409 and code == "session_busy":
                assert time.monotonic() - start < 60, f"{slot.sid}: the disconnected turn is still in flight"
                await asyncio.sleep(0.05)
                continue
            assert r.status_code == 413 and code == "context_length_exceeded", r.text
            slot.touch_sent = sent_at
            break
        self.max_rollback_wait = max(self.max_rollback_wait, time.monotonic() - start)

    # --- drivers -------------------------------------------------------------------

    async def drive(self, slot: Slot) -> None:
        rng = slot.rng
        for _ in range(N_TURNS):
            idled = slot.idling = False
            if slot.alive and (len(slot.inc.history) > HISTORY_CAP or rng.random() < P_DELETE):
                await self.delete(slot)
            elif slot.alive and slot.inc.ttl is not None and rng.random() < P_IDLE:
                await self.idle_past_ttl(slot)
                idled = True  # a plain turn comes next, whether the session is gone or not
            if not slot.alive and rng.random() < P_TTL_INCARNATION:
                await self.create_ttl(slot)
            if not idled and rng.random() < P_STREAM:
                await self.stream_and_hang_up(slot)
            else:
                await self.turn(slot)
        slot.idling = False
        if slot.alive:  # checked now: a TTL incarnation may expire while the others finish
            await self.check_matches(slot, "end of its turns")

    async def stateless(self, rng: random.Random) -> None:
        body = {
            "model": "tiny",
            "prompt": [rng.randrange(10, 3000) for _ in range(PRESSURE_PROMPT)],
            "max_tokens": PRESSURE_MAX_TOKENS,
            "ignore_eos": True,
            "temperature": 0,
        }
        r = await self.http.post("/v1/completions", json=body)
        assert r.status_code == 200, f"{r.status_code} {r.text}\n{self.server_errors()}"
        assert r.json()["usage"]["completion_tokens"] == PRESSURE_MAX_TOKENS, r.json()["usage"]
        self.figures["stateless_requests"] += 1

    async def pressure(self, stop: asyncio.Event) -> None:
        """Bursts of stateless requests that overfill the free KV pool, until the drivers are done."""
        rng = random.Random(SEED)
        admitted_blocks = -(-PRESSURE_PROMPT // BLOCK_SIZE)
        while not stop.is_set():
            free = (await self.http.get("/v1/stateful/debug/integrity")).json()["free_blocks"]
            n = min(BURST_MAX, free // admitted_blocks + 2)
            await asyncio.gather(*(self.stateless(rng) for _ in range(n)))
            self.figures["bursts"] += 1
            try:
                await asyncio.wait_for(stop.wait(), PRESSURE_PAUSE_S)
            except asyncio.TimeoutError:
                pass

    async def run(self, slots: list[Slot]) -> None:
        stop = asyncio.Event()
        pressure = asyncio.ensure_future(self.pressure(stop))
        try:
            await asyncio.gather(*(self.drive(s) for s in slots))
        finally:
            stop.set()
            pressure.cancel()  # hangs up on a burst still running: vLLM aborts it
            (result,) = await asyncio.gather(pressure, return_exceptions=True)
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result


def _parse_preemptions(metrics: str) -> float:
    return sum(float(v) for v in re.findall(r"^vllm:num_preemptions_total\{[^}]*\} ([0-9.e+]+)$", metrics, re.M))


def _preemptions(server) -> float:
    return _parse_preemptions(server.get("/metrics").text)


def _closed_by_reason(server) -> Counter:
    text = server.get("/metrics").text
    found = re.findall(r'^vllm_stateful:sessions_closed_total\{reason="([^"]+)"\} ([0-9.e+]+)$', text, re.M)
    return Counter({reason: float(v) for reason, v in found})


def _idle_report(server, timeout_s: float = 60) -> dict:
    """The integrity report once nothing runs or waits in the engine."""
    deadline = time.time() + timeout_s
    while True:
        report = server.integrity()
        if (report["running"] == 0 and report["waiting"] == 0) or time.time() > deadline:
            return report
        time.sleep(0.2)


def _free_blocks_settle(server, baseline: int, timeout_s: float = 10) -> int:
    deadline = time.time() + timeout_s
    while True:
        free = server.integrity()["free_blocks"]
        if free == baseline or time.time() > deadline:
            return free
        time.sleep(0.2)


def _greedy_mismatches_many(reference, incarnations: list[Incarnation], batch: int = 64) -> list[list[int]]:
    """``reference.greedy_mismatches`` for many histories, a batch of them per engine call."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    found = []
    for i in range(0, len(incarnations), batch):
        chunk = incarnations[i : i + batch]
        outs = reference.llm.generate([{"prompt_token_ids": inc.history} for inc in chunk], params, use_tqdm=False)
        for inc, out in zip(chunk, outs):
            assert list(out.prompt_token_ids) == inc.history
            found.append([p for p in inc.generated if out.prompt_logprobs[p][inc.history[p]].rank != 1])
    return found


@pytest.mark.slow
def test_soak_sessions_turns_deletes_expiry_disconnects_preemption(stateful_server, reference):
    server = stateful_server
    start_report = _idle_report(server)
    baseline = start_report["free_blocks"]
    leftovers = [sid for sid in start_report["api_sessions"] if sid.startswith("soak-")]
    assert leftovers == [], leftovers
    preempt_before = _preemptions(server)
    closed_before = _closed_by_reason(server)
    slots = [Slot(i, random.Random(SEED * 1000 + 100 + i)) for i in range(N_SESSIONS)]

    async def main() -> Soak:
        # One connection per request. With keep-alive reuse (even expiring idle connections after 1 s,
        # well inside the server's 5 s), about one request in ~12,000 under this load was reset before
        # any response (httpx ReadError; the server saw the client disconnect while reading the body),
        # also with the plugin's disconnect watcher disabled. Root cause not found yet (open follow-up);
        # this test checks session state, not HTTP connection reuse.
        limits = httpx.Limits(
            max_connections=N_SESSIONS + BURST_MAX + 16, keepalive_expiry=0.0, max_keepalive_connections=0
        )
        async with (
            httpx.AsyncClient(base_url=server.root, headers=AUTH, timeout=300, limits=limits) as http,
            httpx.AsyncClient(timeout=300, limits=limits) as oa_http,
        ):
            oa = openai.AsyncOpenAI(
                base_url=server.base_url, api_key=KEY_A, timeout=300, max_retries=0, http_client=oa_http
            )
            soak = Soak(http, oa, server.log)
            await soak.run(slots)
            return soak

    started = time.monotonic()
    soak = asyncio.run(main())
    drive_s = time.monotonic() - started
    figures = soak.figures
    preemptions = _preemptions(server) - preempt_before

    # 1. every surviving session is exactly the client's expected history (a TTL one may have expired since)
    survivors = []
    for slot in slots:
        if not slot.alive:
            continue
        inc = slot.inc
        r = server.get(f"/v1/sessions/{slot.sid}", params={"include_tokens": "true"})
        if r.status_code == 404:
            soak.expired(slot, "final_get")
            continue
        assert r.status_code == 200, f"{slot.sid}: {r.status_code} {r.text}"
        body = r.json()
        assert body["token_ids"] == inc.history, f"{slot.sid}: history differs from the client's {slot.trail()}"
        assert body["version"] == inc.version, (body["version"], inc.version, slot.trail())
        inc.check_version()
        survivors.append((slot, body))

    # 2. engine pins == API view, and the API holds exactly the surviving incarnations
    report = server.integrity()
    ours = {sid: blocks for sid, blocks in report["api_sessions"].items() if sid.startswith("soak-")}
    survivor_ids = {slot.sid for slot, _ in survivors}
    assert set(ours) <= survivor_ids, set(ours) - survivor_ids
    for slot, body in survivors:
        if slot.sid in ours:
            assert ours[slot.sid] == body["pinned_blocks"] and slot.sid in report["sessions"], slot.sid
        else:  # expired since step 1
            assert slot.inc.ttl is not None, f"{slot.sid} vanished {slot.trail()}"

    # 3. every generated token of every incarnation is the reference's greedy choice
    incarnations = [inc for slot in slots for inc in slot.retired] + [slot.inc for slot, _ in survivors]
    incarnations = [inc for inc in incarnations if inc.generated]
    # a control the check must catch: one generated token replaced by another
    control = Incarnation("control", 0, None, list(incarnations[0].history), [incarnations[0].generated[-1]])
    control.history[control.generated[0]] = 10 + (control.history[control.generated[0]] - 9) % 2990
    ref_started = time.monotonic()
    *found, control_found = _greedy_mismatches_many(reference, incarnations + [control])
    assert control_found == control.generated, "the reference check cannot fail"
    for inc, bad in zip(incarnations, found):
        assert bad == [], f"{inc.sid} incarnation {inc.number} ({inc.end or 'alive'}): mismatches at {bad}"
    positions = sum(len(inc.generated) for inc in incarnations)
    ref_s = time.monotonic() - ref_started

    # 4. delete everything: every block comes back
    for slot, body in survivors:
        r = server.delete(f"/v1/sessions/{slot.sid}")
        if r.status_code == 404 and slot.inc.ttl is not None:
            continue  # expired meanwhile
        assert r.status_code == 200 and r.json()["freed_blocks"] == body["pinned_blocks"], r.text
    _idle_report(server)
    free = _free_blocks_settle(server, baseline)
    final = server.integrity()
    closed = _closed_by_reason(server)
    closed_delta = {k: int(closed[k] - closed_before[k]) for k in closed if closed[k] != closed_before[k]}
    lat = sorted(soak.turn_latencies) or [0.0]
    print(
        f"\nSOAK sessions={N_SESSIONS} turns={N_TURNS} seed={SEED}"
        f" | turns_committed={figures['turns_committed']} incarnations={figures['incarnations']}"
        f" deletes={figures['deletes']} id_reuses={figures['id_reuses']}"
        f" ttl_incarnations={figures['ttl_incarnations']} ttl_idles={figures['ttl_idles']}"
        f" expiries={figures['expiries']} (seen by GET {figures['expiries_seen_by_get']},"
        f" by a turn {figures['expiries_seen_by_turn']}, by DELETE {figures['expiries_seen_by_delete']},"
        f" by a stream {figures['expiries_seen_by_stream']},"
        f" after the last turn {figures['expiries_seen_by_final_get']};"
        f" unplanned {figures['expiries_unplanned']})"
        f" disconnects={figures['disconnects']} (rolled back {figures['disconnects_rolled_back']},"
        f" committed {figures['disconnects_committed']}, deleted at once {figures['disconnects_then_deleted']},"
        f" rolled back or expired {figures['disconnects_rolled_back_or_gone']})"
        f" 429s={figures['rejected_429']} {dict(soak.codes_429)}"
        f" preemptions={preemptions:.0f} stateless_requests={figures['stateless_requests']}"
        f" in {figures['bursts']} bursts"
        f" reference_positions={positions} incarnations_checked={len(incarnations)} survivors={len(survivors)}"
        f" leaked_blocks={baseline - free} closed_by_reason={closed_delta}"
        f" turn_latency_p50/max={lat[len(lat) // 2]:.2f}/{lat[-1]:.2f}s max_rollback_wait={soak.max_rollback_wait:.2f}s"
        f" | duration={drive_s:.0f}s reference_check={ref_s:.0f}s"
    )
    assert free == baseline, f"{baseline - free} blocks leaked (seed {SEED})"
    assert not [sid for sid in final["api_sessions"] if sid.startswith("soak-")], final["api_sessions"]
    assert not [sid for sid in final["sessions"] if sid.startswith("soak-")], final["sessions"]
    # every expiry the client saw was a real expiry on the server (not a session lost another way)
    assert closed_delta.get("expired", 0) >= figures["expiries"], (closed_delta, figures["expiries"])
    assert figures["turns_committed"] > 0 and positions > 0
    assert preemptions > 0, "the stateless load did not make vLLM preempt"
