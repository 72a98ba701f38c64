"""Unit tests of the chat benchmark's pure parts: benchmarks/report.py (CSV, aggregation, ratio
table, plots) and the server-free helpers of benchmarks/stateful_benchmark.py (stream parsing,
prompt-token counting). No server, no engine."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import report
from report import Row

pytestmark = pytest.mark.unit


def row(
    provider: str,
    topic: str,
    turn: int,
    prompt: int,
    cached: int = 0,
    recomputed: int = 0,
    ttft: float = 0.5,
    completion: int = 4,
) -> Row:
    return Row(provider, topic, turn, ttft, prompt, 0, cached, recomputed, completion, ttft + 0.25)


def conversation() -> list[Row]:
    """Two topics x 3 turns for a stateless baseline and a session provider."""
    rows = []
    for topic, extra in (("a", 0), ("b", 10)):
        for turn in (1, 2, 3):
            rows.append(
                row(
                    "vllm-apc",
                    topic,
                    turn,
                    prompt=100 * turn + extra,
                    cached=0 if turn == 1 else 100 * (turn - 1),
                    ttft=0.2 * turn,
                )
            )
            rows.append(
                row(
                    "stateful",
                    topic,
                    turn,
                    prompt=100 + extra if turn == 1 else 40,
                    cached=0 if turn == 1 else 100 * (turn - 1),
                    ttft=0.1,
                )
            )
    return report.fill_cumulative(rows)


def test_csv_header_and_round_trip(tmp_path: Path) -> None:
    rows = conversation()
    path = report.write_csv(rows, tmp_path / "sub" / "rows.csv")
    assert path.read_text().splitlines()[0] == ",".join(report.CSV_FIELDS)
    assert report.CSV_FIELDS == (
        "provider",
        "topic",
        "turn",
        "ttft_s",
        "prompt_tokens",
        "cumulative_prompt_tokens",
        "cached_tokens",
        "recomputed_tokens",
        "completion_tokens",
        "total_s",
    )
    assert report.read_csv(path) == rows


def test_read_csv_rejects_other_schema(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("provider,topic,turn\nx,a,1\n")
    with pytest.raises(ValueError, match="header"):
        report.read_csv(bad)


def test_fill_cumulative_per_provider_and_topic_any_order() -> None:
    rows = [row("p", "a", 2, 30), row("q", "a", 1, 7), row("p", "a", 1, 10), row("p", "b", 1, 5)]
    out = report.fill_cumulative(rows)
    assert [r.cumulative_prompt_tokens for r in out] == [40, 7, 10, 5]
    assert [(r.provider, r.topic, r.turn) for r in out] == [(r.provider, r.topic, r.turn) for r in rows]
    with pytest.raises(ValueError, match="duplicate"):
        report.fill_cumulative([row("p", "a", 1, 1), row("p", "a", 1, 2)])


def test_prefilled_tokens_depends_on_provider_kind() -> None:
    assert report.is_session_provider("stateful") and report.is_session_provider("stateful-offload")
    assert not report.is_session_provider("stateless") and not report.is_session_provider("vllm-apc")
    # stateless: the prompt contains the cached prefix
    assert report.prefilled_tokens(row("vllm-apc", "a", 2, 300, cached=256)) == 44
    assert report.prefilled_tokens(row("openai", "a", 2, 10, cached=64)) == 0
    # session: the reused context is not part of the prompt sent; recomputed tokens are extra work
    assert report.prefilled_tokens(row("stateful", "a", 2, 40, cached=500, recomputed=3)) == 43


def test_cumulative_prefill_and_per_turn_mean() -> None:
    rows = conversation()
    prefill = report.cumulative_prefill(rows)
    assert [prefill[("vllm-apc", "a", t)] for t in (1, 2, 3)] == [100, 200, 300]
    assert [prefill[("stateful", "b", t)] for t in (1, 2, 3)] == [110, 150, 190]
    means = report.per_turn_mean(rows, "prompt_tokens")
    assert means["vllm-apc"] == [(1, 105.0), (2, 205.0), (3, 305.0)]
    assert means["stateful"] == [(1, 105.0), (2, 40.0), (3, 40.0)]
    assert report.per_turn_mean(rows, "cumulative_prefill")["stateful"][-1] == (3, 185.0)
    with pytest.raises(ValueError, match="unknown metric"):
        report.per_turn_mean(rows, "topic")


def test_summarize_last_turn_means() -> None:
    rows = conversation()
    vllm, stateful = report.summarize(rows)
    assert (vllm.provider, vllm.turn, vllm.topics) == ("vllm-apc", 3, 2)
    assert vllm.ttft_s == pytest.approx(0.6)
    assert vllm.prompt_tokens == 305.0
    assert vllm.cumulative_prompt_tokens == 615.0  # (600 + 630) / 2
    assert vllm.cumulative_prefill == 315.0  # (300 + 330) / 2
    assert stateful.prompt_tokens == 40.0 and stateful.cumulative_prefill == 185.0
    assert report.summarize(rows, turn=1)[0].prompt_tokens == 105.0


def test_summarize_uses_last_turn_all_providers_reached() -> None:
    rows = conversation() + [row("vllm-apc", "a", 4, 400)]
    assert {s.turn for s in report.summarize(rows)} == {3}
    with pytest.raises(ValueError, match="no row at turn 4"):
        report.summarize(rows, turn=4)
    with pytest.raises(ValueError):
        report.summarize([])


def test_ratio_table_baseline_over_stateful() -> None:
    summaries = report.summarize(conversation())
    table = report.ratio_table(summaries)
    assert list(table) == ["vllm-apc"]
    assert table["vllm-apc"]["ttft_s"] == pytest.approx(6.0)
    assert table["vllm-apc"]["prompt_tokens"] == pytest.approx(305 / 40)
    assert table["vllm-apc"]["cumulative_prefill"] == pytest.approx(315 / 185)
    with pytest.raises(ValueError, match="not in"):
        report.ratio_table(summaries, reference="missing")
    assert math.isinf(report.ratio(3, 0)) and math.isnan(report.ratio(0, 0))


def test_markdown_and_one_line_summary() -> None:
    summaries = report.summarize(conversation())
    md = report.format_markdown(summaries)
    lines = md.strip().splitlines()
    assert len(lines) == 4 and "TTFT turn 3 (s)" in lines[0] and "/ stateful" in lines[0]
    assert lines[2].startswith("| vllm-apc | 2 | 0.600 | 305 | 315 | 6.00x | 7.62x | 1.70x |")
    assert "1.00x (ref)" in lines[3]
    line = report.one_line_summary(summaries)
    assert line.startswith("turn 3 vs stateful:") and "6.00x TTFT" in line and "\n" not in line
    single = report.summarize([r for r in conversation() if r.provider == "stateful"])
    assert report.one_line_summary(single).startswith("turn 3: stateful")


def test_plots_are_png_files(tmp_path: Path) -> None:
    paths = report.plot_all(conversation(), tmp_path / "plots")
    assert [p.name for p in paths] == list(report.PLOT_FILES)
    overview = report.plot_overview(conversation(), tmp_path / "one.png")
    for p in [*paths, overview]:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# --- stateful_benchmark helpers (no server) -------------------------------------------------------


def test_consume_stream_reads_ttft_usage_and_session() -> None:
    pytest.importorskip("openai")
    from openai.types.chat import ChatCompletionChunk
    from stateful_benchmark import consume_stream

    def chunk(content: str | None = None, **extra: object) -> ChatCompletionChunk:
        choices = [] if content is None else [{"index": 0, "delta": {"content": content}}]
        return ChatCompletionChunk.model_validate(
            {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": choices, **extra}
        )

    usage = {
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 96},
    }
    session = {"id": "s", "version": 3, "context_tokens": 96, "new_tokens": 12, "recomputed_tokens": 2}
    stream = [chunk(""), chunk("Hi"), chunk(" there"), chunk(None, usage=usage, session=session)]
    ticks = iter([1.0, 2.0, 3.0, 4.0, 5.0])
    out = consume_stream(stream, started=0.0, clock=lambda: next(ticks))
    assert out.text == "Hi there" and out.ttft_s == 2.0 and out.total_s == 5.0
    assert (out.prompt_tokens, out.cached_tokens, out.completion_tokens) == (12, 96, 3)
    assert out.recomputed_tokens == 2 and out.session == session

    plain = consume_stream([SimpleNamespace(choices=[], usage=None)], started=0.0, clock=lambda: 1.0)
    assert (plain.prompt_tokens, plain.cached_tokens, plain.recomputed_tokens) == (-1, 0, 0)
    assert plain.session is None and plain.ttft_s == 1.0


def test_prompt_counter_counts_only_what_a_follow_up_adds(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    demo_model = pytest.importorskip("vllm_stateful.demo_model")
    from stateful_benchmark import PromptCounter

    tok = demo_model.build_tokenizer(512)
    # A Qwen-style template: a default system prompt appears when the first message is not system.
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a default assistant."
        "<|im_end|>\n{% endif %}" + demo_model.CHATML_TEMPLATE
    )
    tok.save_pretrained(tmp_path)
    counter = PromptCounter(tmp_path)
    prior = [
        {"role": "system", "content": "Plan a trip."},
        {"role": "user", "content": "Where to?"},
        {"role": "assistant", "content": "Japan in April."},
    ]
    new = [{"role": "user", "content": "What budget?"}]
    whole = counter.count(prior + new)
    added = counter.count(new, prior)
    assert 0 < added < whole
    assert added < counter.count(new)  # the implicit default system prompt is not counted
    assert added == whole - len(
        tok(tok.apply_chat_template(prior, tokenize=False), add_special_tokens=False)["input_ids"]
    )
    assert PromptCounter(None).count(new) is None
