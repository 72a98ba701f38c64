"""What a chat turn's input costs the API server as the conversation grows (no server, no engine).

A session's chat turn renders the conversation through the chat template twice (before and after the
new messages, ``chat_render.continuation``) and tokenizes only the text the new messages add. This
measures both, on the model's real tokenizer and template, against tokenizing the whole rendered
conversation (what a stateless chat request costs the server): it shows which part is O(history).

    python benchmarks/chat_render_cost.py [--model small] [--turns 2,20,200] [--repeats 20]

Writes ``chat_render_cost.csv`` and ``summary.md`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from harness.config import int_list
from harness.machine import machine_info, machine_line, model_dir
from harness.results import out_path, record_command, summary_header, write_rows, write_text

COLUMNS = ("turns", "history_tokens", "continuation_ms", "encode_new_ms", "encode_whole_ms")


def conversation(turns: int) -> list[dict]:
    """``turns`` user/assistant pairs of ~320 and ~240 tokens."""
    out = []
    for i in range(turns):
        out.append({"role": "user", "content": f"tick {i}: BTC 64123.55 +0.12% ETH 3120.10 -0.40% " * 20})
        out.append({"role": "assistant", "content": f"summary {i}: prices moved a little. " * 30})
    return out


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    record_command(__file__, argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="tiny | small | a model directory")
    p.add_argument("--turns", type=int_list, default="2,20,200")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out-dir", type=Path, default=out_path("benchmarks/results/chat_render_cost"))
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from vllm_stateful.sessions.chat_render import continuation

    tok = AutoTokenizer.from_pretrained(model_dir(args.model))

    def render(messages, add_generation_prompt):
        return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    new = [{"role": "user", "content": "What is the latest BTC price?"}]
    render(new, True)  # compile the template once
    rows = []
    for turns in args.turns:
        previous = conversation(turns)
        whole = render(previous + new, True)
        text = continuation(render, previous, new, True)
        rows.append({
            "turns": turns,
            "history_tokens": len(tok.encode(whole)) - len(tok.encode(text)),
            "continuation_ms": median_ms(lambda p=previous: continuation(render, p, new, True), args.repeats),
            "encode_new_ms": median_ms(lambda t=text: tok.encode(t), args.repeats),
            "encode_whole_ms": median_ms(lambda w=whole: tok.encode(w), max(3, args.repeats // 4)),
        })  # fmt: skip
    write_rows(rows, args.out_dir / "chat_render_cost.csv", COLUMNS)
    lines = ["| turns | history tokens | render (continuation) ms | tokenize new ms | tokenize whole ms |",
             "|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['turns']} | {r['history_tokens']} | {r['continuation_ms']:.2f} | {r['encode_new_ms']:.2f} | "
              f"{r['encode_whole_ms']:.1f} |" for r in rows]  # fmt: skip
    head = summary_header("Chat turn input cost vs conversation length", f"model `{args.model}` tokenizer and "
                          f"template, median of {args.repeats}", machine_line(machine_info()))  # fmt: skip
    write_text(head + "\n".join(lines) + "\n", args.out_dir / "summary.md")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
