"""Render new chat messages as a continuation of a session's conversation.

A stateless client sends ``template(all_messages, add_generation_prompt=True)``
each turn. A session holds the tokens of everything before, so it only needs
the text that the template adds for the new messages, plus whatever the
template puts after an assistant reply that the model did not generate itself
(e.g. the ``\\n`` after ChatML's ``<|im_end|>``). That way the session's token
history equals what a stateless client would have sent, with each end-of-turn
marker exactly once.

This needs a prefix-stable template: rendering a conversation must be a prefix
of rendering that conversation plus more messages. ChatML, Llama 3 and most
templates are; a template that rewrites earlier turns is refused with
``TemplateNotPrefixStable``. No vLLM import: ``render`` is any callable
``(messages, add_generation_prompt) -> str``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]
RenderFn = Callable[[Sequence[Message], bool], str]

_SENTINEL = "\u2063STATEFUL-SENTINEL\u2063"


class TemplateNotPrefixStable(ValueError):
    pass


@dataclass(frozen=True)
class ReplyClosing:
    """Text the template appends after an assistant message's content."""

    text: str

    def remainder(self, generated_tail: str) -> str:
        """What is still missing after a reply whose decoded text (special tokens
        included) ends with ``generated_tail``: if the model already emitted a
        prefix of the closing (its end-of-turn token), only the rest."""
        for cut in range(len(self.text), 0, -1):
            if generated_tail.endswith(self.text[:cut]):
                return self.text[cut:]
        return self.text


def reply_closing(render: RenderFn) -> ReplyClosing:
    """Derive the closing text from the template with a probe conversation."""
    probe = [{"role": "user", "content": "probe"}]
    opened = render(probe, True)
    closed = render(probe + [{"role": "assistant", "content": _SENTINEL}], False)
    if not closed.startswith(opened) or _SENTINEL not in closed:
        raise TemplateNotPrefixStable(
            "the chat template does not render an assistant reply after its generation prompt"
        )
    after = closed[len(opened) :]
    return ReplyClosing(after[after.index(_SENTINEL) + len(_SENTINEL) :])


def continuation(
    render: RenderFn,
    previous: Sequence[Message],
    new: Sequence[Message],
    add_generation_prompt: bool,
) -> str:
    """Text the template adds for ``new`` after ``previous`` (already closed)."""
    if not previous:
        return render(list(new), add_generation_prompt)
    before = render(list(previous), False)
    after = render(list(previous) + list(new), add_generation_prompt)
    if not after.startswith(before):
        raise TemplateNotPrefixStable(
            "the chat template re-renders earlier turns differently when messages are "
            "added, so a session cannot continue it; use a prefix-stable template"
        )
    return after[len(before) :]
