"""Multi-turn chat benchmark: vllm-stateful sessions vs stateless OpenAI-style chat.

Usage::

    python benchmarks/stateful_benchmark.py PROVIDER [--base-url URL] [--model M] [--tokenizer DIR]
        [--topics N] [--turns 12] [--max-tokens K] [--csv PATH] [--plot PATH.png]

PROVIDER:
- ``stateful``: vllm-stateful sessions; each turn sends only its new messages
  (``extra_body={"stateful": session_id}``); the session is deleted when its topic ends.
- ``stateless``: a server without sessions; each turn re-sends the whole history.
- ``openai``: any OpenAI-compatible base URL (``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``), stateless.

Every provider gets the identical prompts (``TOPICS``): a system message and 12 user turns per topic,
each depending on earlier turns. Per turn the client measures, by streaming with
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
from typing import Any

try:
    from benchmarks import report
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import report  # type: ignore[no-redef]

Row = report.Row
PROVIDERS: tuple[str, ...] = ("stateful", "stateless", "openai")
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
SYSTEM_PROMPT = (
    "You are a careful planning assistant. Keep every earlier decision in this conversation in mind, "
    "refer back to it by name, and answer concisely with concrete numbers."
)


@dataclass(frozen=True)
class Topic:
    """A named conversation: ``turns[i]`` is user turn i+1 and may refer to any earlier turn."""

    name: str
    turns: tuple[str, ...]


TOPICS: tuple[Topic, ...] = (
    Topic(
        "travel_plan",
        (
            "I want to plan a two-week trip to Japan next April with my partner. We like food, hiking and "
            "quiet towns more than big cities. Our total budget is 7000 dollars. Suggest a rough route.",
            "Take the route you just suggested and split the 7000 dollar budget across flights, lodging, "
            "food, transport and activities. Show the numbers per category.",
            "Given that split, is a 14-day Japan Rail Pass worth it for your route, or are regional passes "
            "cheaper? Compare against the transport line of your budget.",
            "My partner is vegetarian. Which stops on the route will be hardest for her, and how should the "
            "food budget you set change because of it?",
            "We now want to add two nights in a traditional ryokan. Where on the route fits best, and what "
            "would you cut from the budget to pay for it?",
            "Write the day-by-day itinerary for the first five days, using the route, the rail decision and "
            "the ryokan placement we agreed on.",
            "Now the remaining nine days, keeping the same style and making sure the hiking days are not "
            "back to back with the long train rides.",
            "Cherry blossom season may push hotel prices up 30 percent. Redo the lodging line of the budget "
            "with that increase and tell me if we are still under 7000.",
            "If we are over budget, which two days of the itinerary would you shorten or drop, and why those "
            "rather than others?",
            "Make a packing list tailored to the hikes and the ryokan stay in the final itinerary, for April "
            "weather at those places.",
            "Summarize the final plan in ten bullet points: route, passes, lodging, food approach, budget "
            "total, and the days we changed.",
            "Finally, list the three bookings we must make first and the latest date to make each, based on "
            "everything we decided above.",
        ),
    ),
    Topic(
        "car_purchase",
        (
            "I need a used car for a family of four. I drive 60 kilometers a day, mostly highway, and can "
            "spend up to 18000 euros. Give me five candidate models with their typical prices.",
            "From those five, drop the two with the worst reliability records and explain the choice.",
            "For the remaining three, estimate fuel cost per year for my 60 kilometers a day at 1.80 euros per liter.",
            "Add insurance and yearly maintenance estimates to the fuel numbers and give a total yearly cost per car.",
            "One dealer offers the cheapest of the three with 95000 kilometers for 15500 euros. Is that a fair "
            "price given what you said about its typical price?",
            "What should I check on that specific car during the test drive, considering its known weak "
            "points you mentioned?",
            "The inspection found worn brake discs and a small oil leak. Estimate repair costs and tell me "
            "what to offer instead of 15500.",
            "The dealer refuses to go below 14900. Compare that deal against the second car on our list "
            "using the yearly costs you computed.",
            "If I finance 10000 euros over four years at 6.9 percent, what is the monthly payment, and how "
            "does it change the comparison?",
            "My partner now says we need a tow hitch for a small camper. Which of our three cars can tow "
            "1200 kilograms, and does that change your recommendation?",
            "Give me the final recommendation with price to offer, financing, and the total cost over four "
            "years, using all the numbers above.",
            "Draft a short message to the dealer making the offer we settled on, mentioning the defects found "
            "in the inspection.",
        ),
    ),
    Topic(
        "band_launch",
        (
            "My indie rock band of four is releasing our first EP of five songs in three months. We have "
            "2500 dollars and no label. Outline a launch plan.",
            "Based on that plan, which platforms should we focus on first, and why those for our genre?",
            "Split the 2500 dollars across the items in your plan and explain each amount.",
            "We can afford one music video. Which of the five songs should it be for, and how should the "
            "video budget you set be spent?",
            "Create a twelve-week calendar from now to release, placing the video, the singles and the "
            "social posts from your plan.",
            "Our drummer can only work on weekends. Adjust the calendar so no task that needs the whole band "
            "falls on a weekday.",
            "Write three short social posts for the first single in the calendar, in a voice that matches "
            "the platforms you picked.",
            "A local venue offers a release show on week eleven for 400 dollars. Should we take it, and what "
            "would you cut from the budget to afford it?",
            "How many tickets do we need to sell at 12 dollars to break even on that show, including the "
            "costs you listed?",
            "Draft an email to three music blogs pitching the EP, mentioning the single and the release show "
            "we decided on.",
            "List the metrics we should track each week after release and targets for the first month, "
            "given the budget and platforms above.",
            "Summarize the whole launch plan on one page: budget, calendar milestones, show, and metrics.",
        ),
    ),
    Topic(
        "fitness_plan",
        (
            "I am 38, I sit at a desk all day, and I want to run a 10 kilometer race in 16 weeks. I can train "
            "four days a week for 45 minutes. Where should I start?",
            "Turn that into a weekly structure: which four days, what type of session each day, and why in that order.",
            "Write out weeks one to four in detail with distances or times for each of the sessions you defined.",
            "After week two my left knee aches after the long run. How should the plan for weeks three and "
            "four change?",
            "Add two short strength routines that protect the knee, and tell me which of the four days they "
            "go on without overloading.",
            "I weigh 84 kilograms and want to reach 78 by race day. How many calories per day should I eat, "
            "given the training load you planned?",
            "Build a sample day of meals that hits that calorie target and supports the long run day.",
            "Weeks five to eight: write them out, building on the adjusted weeks three and four.",
            "I have a business trip in week nine with no running track, only a hotel gym. Adapt that week.",
            "Weeks ten to fourteen: increase the load toward race pace. What race pace should I target given "
            "how the earlier weeks went?",
            "Plan the taper for weeks fifteen and sixteen and the race-day routine, including what to eat "
            "from the meal plan.",
            "Summarize the whole sixteen-week plan in a table: week, four sessions, strength days, and the "
            "weight target per month.",
        ),
    ),
    Topic(
        "learning_python",
        (
            "I am an accountant with no programming background and want to learn Python to automate my "
            "spreadsheets. I have five hours a week. Suggest a learning path.",
            "For the first step of that path, give me three tiny exercises using numbers from an invoice.",
            "Here is my attempt at the first exercise: total = 0; for x in [120, 80, 45]: total = total + x. "
            "What does it print if I add print(total), and how would you improve it?",
            "Next, show me how to read a CSV file of invoices with columns date, client, amount, and sum the "
            "amounts like in the exercise.",
            "Now group the totals by client from that CSV example and print the top three clients.",
            "The amounts in my real file use commas as decimal separators, like 1.234,56. Fix the code from "
            "the last two answers to handle that.",
            "Which point of the learning path are we at now, and what should I study next week given the "
            "five hours I have?",
            "Show me how to write the per-client totals to a new Excel file with a header row, extending the "
            "code we built.",
            "Add a check that flags any invoice above 10000 as a possible error and writes those to a second sheet.",
            "My manager wants this to run every Monday. Explain the simplest way to schedule the script on "
            "Windows, step by step.",
            "Refactor the whole script we built into three functions with clear names, keeping the comma "
            "fix and the 10000 check.",
            "Review my progress over this conversation and set three goals for the next month of the path.",
        ),
    ),
)


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
    import httpx

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
