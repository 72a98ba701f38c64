"""Unit tests for the inter-turn latency benchmark's pure helpers (seeded chunks, head/tail windows that
skip turn 1, ratios, summary rows and table, the output comparison) and its two clients against a fake
server (``httpx.post`` replaced; no engine, no timing assertions)."""

from __future__ import annotations

import httpx
import pytest
import session_latency as sl

pytestmark = pytest.mark.unit


def _row(provider: str, session: int, turn: int, latency_s: float, context: int = 0, recomputed: int = 0):
    return sl.TurnRow(provider, session, turn, context, 16, 0, recomputed, latency_s)


def test_chunks_are_seeded_in_range_and_differ_per_session():
    a = sl.session_chunks(0, 0, 5, 16)
    assert a == sl.session_chunks(0, 0, 5, 16)
    assert len(a) == 5 and all(len(c) == 16 for c in a)
    assert all(sl.TOKEN_LOW <= t < sl.TOKEN_HIGH for c in a for t in c)
    assert a != sl.session_chunks(0, 1, 5, 16) and a != sl.session_chunks(1, 0, 5, 16)


def test_windows_skip_turn_1_and_take_the_last_turns():
    assert sl.window_turns(150, 10, 10) == (list(range(2, 12)), list(range(141, 151)))
    assert sl.window_turns(12, 10, 10) == (list(range(2, 12)), list(range(3, 13)))  # short runs overlap
    assert sl.window_turns(5, 10, 10) == ([2, 3, 4, 5], [1, 2, 3, 4, 5])  # clipped to the run


def test_head_excludes_turn_1_and_pools_sessions():
    rows = [_row("p", s, t, 100.0 if t == 1 else 0.01 * t * (s + 1)) for s in range(2) for t in range(1, 31)]
    stats = sl.provider_stats(rows, 30, 10, 10)["p"]
    head = [0.01 * t * (s + 1) for s in range(2) for t in range(2, 12)]
    tail = [0.01 * t * (s + 1) for s in range(2) for t in range(21, 31)]
    assert stats["head_s"] == pytest.approx(sum(head) / len(head))  # the slow turn 1 is not in it
    assert stats["tail_s"] == pytest.approx(sum(tail) / len(tail))
    assert stats["tail_over_head"] == pytest.approx(stats["tail_s"] / stats["head_s"])
    assert (stats["sessions"], stats["turns"]) == (2, 60)


def test_ratio_handles_missing_and_zero():
    assert sl.ratio(3.0, 2.0) == 1.5
    assert sl.ratio(None, 2.0) is None and sl.ratio(1.0, None) is None and sl.ratio(1.0, 0.0) is None
    assert sl.mean_latency([_row("p", 0, 1, 1.0)], [2, 3]) is None


def test_summary_rows_compare_tails_with_vllm_apc_and_count_recompute_after_turn_1():
    rows = [_row(sl.STATEFUL, 0, t, 0.02, context=24 * t, recomputed=5 if t == 1 else 0) for t in range(1, 21)]
    rows += [_row(sl.APC, 0, t, 0.01 * t, context=24 * t, recomputed=7) for t in range(1, 21)]
    table_rows = sl.summary_rows(sl.provider_stats(rows, 20, 5, 5))
    assert [r["provider"] for r in table_rows] == [sl.STATEFUL, sl.APC]
    stateful, apc = table_rows
    assert apc["tail_s"] == pytest.approx(0.01 * 18)  # turns 16..20
    assert stateful["tail_vs_baseline"] == pytest.approx(0.02 / apc["tail_s"])
    assert apc["tail_vs_baseline"] == pytest.approx(1.0)
    assert stateful["tail_over_head"] == pytest.approx(1.0)
    assert stateful["recomputed_after_turn_1"] == 0 and apc["recomputed_after_turn_1"] == 7 * 19
    assert stateful["final_context_tokens"] == 480
    table = sl.summary_table(table_rows, 20, 5, 5)
    lines = table.splitlines()
    assert "turns 2-6" in lines[0] and "turns 16-20" in lines[0] and "tail vs vllm-apc" in lines[0]
    assert lines[2].startswith("| stateful | 1 | 20.0 | 20.0 | 1.00x |")
    assert lines[3].startswith("| vllm-apc | 1 | 40.0 | 180.0 | 4.50x | 1.00x |")


def test_summary_without_the_baseline_leaves_the_comparison_empty():
    rows = sl.summary_rows(sl.provider_stats([_row(sl.STATEFUL, 0, t, 0.01) for t in range(1, 4)], 3, 10, 10))
    assert rows[0]["tail_vs_baseline"] is None
    assert "| - |" in sl.summary_table(rows, 3, 10, 10)


def test_mean_by_turn_and_output_mismatches():
    rows = [_row("p", 0, 1, 1.0), _row("p", 1, 1, 3.0), _row("p", 0, 2, 2.0)]
    assert sl.mean_by_turn(rows) == {"p": [(1, 2.0), (2, 2.0)]}
    assert sl.output_mismatches([[1, 2], [3]], [[1, 2], [3]]) == []
    assert sl.output_mismatches([[1, 2], [3], [4]], [[1, 2], [9]]) == [2, 3]


class FakeServer:
    """Answers completions with ``gen`` token ids per request; a session counts its history."""

    def __init__(self, gen: int) -> None:
        self.gen, self.calls, self.sessions = gen, [], {}

    def post(self, url: str, json: dict, timeout: float) -> httpx.Response:
        self.calls.append((url, json))
        if url.endswith("/sessions"):
            self.sessions[json["id"]] = 0
            return httpx.Response(201, json={"id": json["id"]})
        out = [7] * json["max_tokens"]
        sid = json.get("stateful")
        if sid is None:  # stateless: a prefix cache holding the whole 32-token blocks of the history with KV
            cached = max(0, (len(json["prompt"]) - 16 - 1) // 32 * 32)
            return httpx.Response(200, json=self._body(out, cached))
        history = self.sessions[sid]
        self.sessions[sid] = history + len(json["prompt"]) + len(out)
        body = self._body(out, max(0, history - 1))
        body["session"] = {"context_tokens": history + len(json["prompt"]), "recomputed_tokens": 0}
        return httpx.Response(200, json=body)

    def delete(self, url: str, timeout: float) -> httpx.Response:
        self.sessions.pop(url.rsplit("/", 1)[1])
        return httpx.Response(200, json={"deleted": True}, request=httpx.Request("DELETE", url))

    @staticmethod
    def _body(out: list[int], cached: int) -> dict:
        return {"choices": [{"token_ids": out}], "usage": {"prompt_tokens_details": {"cached_tokens": cached}}}


@pytest.fixture
def fake(monkeypatch) -> FakeServer:
    server = FakeServer(gen=3)
    monkeypatch.setattr(sl.httpx, "post", server.post)
    monkeypatch.setattr(sl.httpx, "delete", server.delete)
    return server


def test_stateful_client_sends_only_new_tokens_and_deletes_its_session(fake):
    chunks = sl.session_chunks(0, 0, 4, 16)
    rows = sl.run_session("http://x/v1", sl.STATEFUL, 0, chunks, 3)
    assert [r.context_tokens for r in rows] == [16, 35, 54, 73]
    assert [r.cached_tokens for r in rows] == [0, 18, 37, 56]
    sent = [body for url, body in fake.calls if url.endswith("/completions")]
    assert [b["prompt"] for b in sent] == chunks and all(b["stateful"] == "latency-0" for b in sent)
    assert all(b["ignore_eos"] and b["temperature"] == 0 and b["max_tokens"] == 3 for b in sent)
    assert fake.sessions == {}  # deleted at the end


def test_apc_client_sends_the_full_history_and_reports_recompute(fake):
    chunks = sl.session_chunks(0, 1, 4, 16)
    rows = sl.run_session("http://x/v1", sl.APC, 1, chunks, 3)
    prompts = [body["prompt"] for _, body in fake.calls]
    assert prompts[0] == chunks[0]
    assert prompts[2] == chunks[0] + [7] * 3 + chunks[1] + [7] * 3 + chunks[2]
    assert [r.context_tokens for r in rows] == [16, 35, 54, 73] and [r.sent_tokens for r in rows] == [16, 35, 54, 73]
    # history with KV before turn 3: 38 tokens (the last generated one has none); the fake caches 32
    assert [r.recomputed_tokens for r in rows] == [0, 18, 5, 24]
    assert all(r.output_ids == [7, 7, 7] for r in rows)


def test_correctness_compares_session_0_turn_by_turn():
    rows = [sl.TurnRow(p, 0, t, 0, 16, 0, 0, 0.1, [t, t + (p == sl.APC and t == 2)]) for p in (sl.STATEFUL, sl.APC)
            for t in (1, 2, 3)]  # fmt: skip
    check = sl.correctness(rows)
    assert check["mismatched_turns"] == [2] and check["first_mismatch"]["turn"] == 2
    assert "MISMATCH" in sl.correctness_line(check)
    assert sl.correctness([r for r in rows if r.provider == sl.STATEFUL])["checked"] is False


def test_warmup_sessions_use_other_token_ids():
    args = sl.options(["--sessions", "3", "--turns", "5", "--warmup-turns", "2"])
    warm = sl.warmup_chunks(args)
    assert len(warm) == 3 and all(len(turns) == 2 for turns in warm)
    real = [sl.session_chunks(args.seed, s, args.turns, args.input_len) for s in range(3)]
    assert not {tuple(c) for turns in warm for c in turns} & {tuple(c) for turns in real for c in turns}


def test_text_chunks_are_consecutive_slices_starting_apart():
    text = list(range(1000, 1500))
    a, b = sl.session_chunks(0, 0, 40, 16, text), sl.session_chunks(0, 1, 40, 16, text)
    flat = [t for c in a for t in c]
    assert all(len(c) == 16 for c in a) and len(flat) == 640
    assert all(y == x + 1 or (x, y) == (1499, 1000) for x, y in zip(flat, flat[1:]))  # wraps around the text
    assert a[0][0] != b[0][0]  # no two sessions share a prefix


def test_options_validate_providers():
    assert sl.options(["--providers", "stateful"]).providers == ["stateful"]
    with pytest.raises(SystemExit):
        sl.options(["--providers", "sglang"])
