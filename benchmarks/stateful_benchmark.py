"""Multi-turn chat benchmark: vllm-stateful sessions vs stateless OpenAI-style chat.

Usage::

    python benchmarks/stateful_benchmark.py PROVIDER [--base-url URL] [--model M] [--tokenizer DIR]
        [--topics N] [--turns 12] [--max-tokens K] [--csv PATH] [--plot PATH.png]

PROVIDER:
- ``stateful``: vllm-stateful sessions; each turn sends only its new messages
  (``extra_body={"stateful": session_id}``); the session is deleted when its topic ends.
- ``stateless``: a server without sessions; each turn re-sends the whole history.
- ``openai``: any OpenAI-compatible base URL (``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``), stateless.

Every provider gets the identical prompts (``configs/chat_topics.yaml``): a system message and 12 user
turns per topic, each depending on earlier turns. Per turn the client measures, by streaming with
``stream_options.include_usage``: TTFT, prompt tokens sent, server-reported cached and recomputed
tokens, completion tokens and total time (CSV schema: ``report.CSV_FIELDS``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import report
from harness import REPO_ROOT

Row = report.Row
PROVIDERS: tuple[str, ...] = ("stateful", "stateless", "openai")
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
WORKLOAD = REPO_ROOT / "configs" / "chat_topics.yaml"


@dataclass(frozen=True)
class Topic:
    """A named conversation: ``turns[i]`` is user turn i+1 and may refer to any earlier turn."""

    name: str
    turns: tuple[str, ...]


def load_workload(path: os.PathLike | str = WORKLOAD) -> tuple[str, tuple[Topic, ...]]:
    """The system prompt and topics of ``configs/chat_topics.yaml``."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    return data["system_prompt"], tuple(Topic(t["name"], tuple(t["turns"])) for t in data["topics"])


SYSTEM_PROMPT, TOPICS = load_workload()


@dataclass(frozen=True)
class TurnResult:
    """What one streamed request produced. Counts are -1 where the server did not report them."""

    text: str
    ttft_s: float
    total_s: float
    prompt_tokens: int
    cached_tokens: int
    recomputed_tokens: int
    completion_tokens: int
    session: dict[str, Any] | None


def _get(obj: Any, name: str) -> Any:
    """Attribute or dict key ``name`` of ``obj`` (SDK models, their ``model_extra``, or dicts)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    value = getattr(obj, name, None)
    if value is None:
        extra = getattr(obj, "model_extra", None) or {}
        value = extra.get(name)
    return value


def consume_stream(stream: Any, started: float, clock: Callable[[], float] = time.perf_counter) -> TurnResult:
    """Drain a chat-completions stream and return its text, timings and token counts.

    TTFT is taken at the first chunk carrying non-empty content (or, if none does, the first chunk
    with a choice). ``usage`` and the top-level ``session`` object are read from whichever chunks
    carry them (vLLM sends usage in a final chunk with no choices).
    """
    ttft = first_choice = None
    parts: list[str] = []
    usage = session = None
    for chunk in stream:
        now = clock()
        for choice in _get(chunk, "choices") or ():
            if first_choice is None:
                first_choice = now - started
            content = _get(_get(choice, "delta"), "content")
            if content:
                parts.append(content)
                if ttft is None:
                    ttft = now - started
        usage = _get(chunk, "usage") or usage
        session = _get(chunk, "session") or session
    total = clock() - started
    details = _get(usage, "prompt_tokens_details")
    if session is not None and not isinstance(session, dict):
        session = session.model_dump() if hasattr(session, "model_dump") else dict(vars(session))
    cached = _get(details, "cached_tokens")
    recomputed = _get(session, "recomputed_tokens")
    return TurnResult(
        text="".join(parts),
        ttft_s=ttft if ttft is not None else (first_choice if first_choice is not None else total),
        total_s=total,
        prompt_tokens=_int_or(_get(usage, "prompt_tokens"), -1),
        cached_tokens=_int_or(cached, 0),
        recomputed_tokens=_int_or(recomputed, 0),
        completion_tokens=_int_or(_get(usage, "completion_tokens"), -1),
        session=session,
    )


def _int_or(value: Any, default: int) -> int:
    return default if value is None else int(value)


class PromptCounter:
    """Counts prompt tokens the way the model sees them: messages rendered with the model's chat
    template and tokenized without extra special tokens. Without a tokenizer ``count`` returns None."""

    def __init__(self, tokenizer_path: str | os.PathLike | None) -> None:
        self._tok = None
        if tokenizer_path is not None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(tokenizer_path))

    def count(self, sent: Sequence[dict[str, str]], prior: Sequence[dict[str, str]] = ()) -> int | None:
        """Tokens that ``sent`` adds after the conversation ``prior`` (with the generation prompt).

        With ``prior`` empty this is the whole rendered prompt. Otherwise it is
        ``len(render(prior + sent, generation prompt)) - len(render(prior))``, so a template's
        implicit default system prompt is not counted again for a session's follow-up messages.
        """
        if self._tok is None:
            return None
        total = self._render_len([*prior, *sent], add_generation_prompt=True)
        return total - self._render_len(prior, add_generation_prompt=False) if prior else total

    def _render_len(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> int:
        text = self._tok.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return len(self._tok(text, add_special_tokens=False)["input_ids"])


def default_tokenizer_path(model: str | None, tokenizer: str | None) -> str | None:
    """``tokenizer`` if given, else ``model`` when it is a local directory, else None."""
    if tokenizer:
        return tokenizer
    if model and os.path.isdir(model) and os.path.exists(os.path.join(model, "tokenizer_config.json")):
        return model
    return None


def make_client(base_url: str, api_key: str | None = None, timeout_s: float = 600.0):
    """An ``openai.OpenAI`` client for ``base_url`` (API key: argument, ``OPENAI_API_KEY`` or "EMPTY")."""
    import openai

    key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    return openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=0)


def resolve_model(client: Any, model: str | None) -> str:
    """The model name to request: ``model`` if the server lists it (or listing is not needed), else
    the server's only model when ``model`` is None or a local directory. Raises RuntimeError when
    the server lists no models and none was given."""
    if model and not os.path.isdir(model):
        return model
    ids = [m.id for m in client.models.list()]
    if model in ids:
        return model
    if not ids:
        raise RuntimeError("server lists no models; pass --model")
    if model is None or len(ids) == 1:
        return ids[0]
    raise RuntimeError(f"{model!r} is not served; the server lists {ids}")


def delete_session(base_url: str, session_id: str, api_key: str | None = None) -> bool:
    """``DELETE {base_url}/sessions/{id}``; True on 2xx. Errors are returned as False, not raised."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.delete(f"{base_url.rstrip('/')}/sessions/{session_id}", headers=headers, timeout=30)
    except httpx.HTTPError:
        return False
    return resp.is_success


def run_topic(
    client: Any,
    provider: str,
    topic: Topic,
    model: str,
    turns: int,
    max_tokens: int,
    counter: PromptCounter,
    label: str | None = None,
    temperature: float = 0.0,
    on_turn: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Run the first ``turns`` turns of ``topic`` and return one Row per turn (1-based turns).

    ``stateful`` sends only the new messages of each turn in a fresh session (deleted afterwards);
    the other providers send the full history. Raises ValueError for an unknown provider or more
    turns than the topic has; API errors from the server propagate.
    """
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")
    if not 1 <= turns <= len(topic.turns):
        raise ValueError(f"turns must be in 1..{len(topic.turns)}, got {turns}")
    stateful = provider == "stateful"
    session_id = f"bench-{topic.name}-{uuid.uuid4().hex[:12]}" if stateful else None
    history: list[dict[str, str]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    rows: list[Row] = []
    cumulative = 0
    try:
        for i, user_text in enumerate(topic.turns[:turns], start=1):
            new = [{"role": "user", "content": user_text}]
            sent = (history + new if i == 1 else new) if stateful else history + new
            extra: dict[str, Any] = {"stateful": session_id} if stateful else {}
            started = time.perf_counter()
            stream = client.chat.completions.create(
                model=model,
                messages=sent,
                max_tokens=max_tokens,
                temperature=temperature,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=extra or None,
            )
            result = consume_stream(stream, started)
            counted = counter.count(sent, history if stateful and i > 1 else ())
            prompt_tokens = counted if counted is not None else max(result.prompt_tokens, 0)
            cumulative += prompt_tokens
            row = Row(
                provider=label or provider,
                topic=topic.name,
                turn=i,
                ttft_s=result.ttft_s,
                prompt_tokens=prompt_tokens,
                cumulative_prompt_tokens=cumulative,
                cached_tokens=result.cached_tokens,
                recomputed_tokens=result.recomputed_tokens,
                completion_tokens=max(result.completion_tokens, 0),
                total_s=result.total_s,
            )
            rows.append(row)
            if on_turn is not None:
                on_turn(row)
            history += new + [{"role": "assistant", "content": result.text}]
    finally:
        if session_id is not None:
            delete_session(str(client.base_url), session_id, _client_key(client))
    return rows


def _client_key(client: Any) -> str | None:
    key = getattr(client, "api_key", None)
    return None if key in (None, "EMPTY") else key


def run_benchmark(
    provider: str,
    base_url: str,
    model: str | None = None,
    topics: int = len(TOPICS),
    turns: int = 12,
    max_tokens: int = 32,
    tokenizer_path: str | os.PathLike | None = None,
    *,
    label: str | None = None,
    api_key: str | None = None,
    temperature: float = 0.0,
    progress: bool = False,
) -> list[Row]:
    """Run ``topics`` topics x ``turns`` turns against ``base_url`` and return the rows in run order.

    ``model`` is resolved by ``resolve_model`` (None: the server's first listed model). ``label``
    (default: ``provider``) fills the CSV ``provider`` column; labels starting with ``stateful`` mark
    session rows for the report.
    ``prompt_tokens`` is counted with the tokenizer at ``tokenizer_path`` when given, else taken from
    the server's ``usage.prompt_tokens``.
    """
    if not 1 <= topics <= len(TOPICS):
        raise ValueError(f"topics must be in 1..{len(TOPICS)}, got {topics}")
    client = make_client(base_url, api_key)
    model = resolve_model(client, model)
    counter = PromptCounter(tokenizer_path)
    bar = _Progress(topics * turns, label or provider) if progress else None
    rows: list[Row] = []
    try:
        for topic in TOPICS[:topics]:
            rows += run_topic(
                client,
                provider,
                topic,
                model,
                turns,
                max_tokens,
                counter,
                label=label,
                temperature=temperature,
                on_turn=bar.step if bar else None,
            )
    finally:
        if bar is not None:
            bar.close()
    return rows


class _Progress:
    """A tqdm bar advanced once per finished turn, showing that turn's TTFT and prompt tokens."""

    def __init__(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="turn", dynamic_ncols=True)

    def step(self, row: Row) -> None:
        self._bar.set_postfix(topic=row.topic, ttft=f"{row.ttft_s:.2f}s", prompt=row.prompt_tokens)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("provider", choices=PROVIDERS)
    p.add_argument(
        "--base-url", default=None, help=f"OpenAI base URL (default {DEFAULT_BASE_URL}; openai: $OPENAI_BASE_URL)"
    )
    p.add_argument("--model", default=None, help="served model name or model dir (default: first listed)")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer dir for counting sent tokens (default: --model if it is a dir)"
    )
    p.add_argument("--label", default=None, help="value of the CSV provider column (default PROVIDER)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--topics", type=int, default=len(TOPICS), help=f"1..{len(TOPICS)}")
    p.add_argument("--turns", type=int, default=12, help="1..12")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--csv", default=None, help="write the rows here")
    p.add_argument("--plot", default=None, help="write a PNG (TTFT, tokens sent, cumulative prefill per turn)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    base_url = args.base_url or (
        os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
        if args.provider == "openai"
        else DEFAULT_BASE_URL
    )
    rows = run_benchmark(
        args.provider,
        base_url,
        args.model,
        args.topics,
        args.turns,
        args.max_tokens,
        default_tokenizer_path(args.model, args.tokenizer),
        label=args.label,
        api_key=args.api_key,
        temperature=args.temperature,
        progress=True,
    )
    if args.csv:
        print(f"wrote {report.write_csv(rows, args.csv)}")
    if args.plot:
        print(f"wrote {report.plot_overview(rows, args.plot)}")
    print(report.one_line_summary(report.summarize(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
