"""Which requests the engine may schedule in a step, by work class.

The plugin marks its background work in ``SamplingParams.extra_args``
(``CLASS_KEY``); every other request is foreground work (user turns and
queries, ingestion, plain vLLM traffic). Contract of ``FlashHold``:

* Flash evaluations (re-answering registered flash queries) run on spare
  capacity only: in a step where any foreground request is running or
  waiting, flash requests are held out of vLLM's queues, so they neither take
  token budget nor share the batch. A foreground request therefore waits for
  flash work at most for the engine step already in progress.
* Held running requests keep their KV blocks and model-runner slots: while
  they are held, vLLM admits new requests only into the remaining slots. They
  cannot be preempted while held; if the KV pool runs out, vLLM preempts a
  foreground request instead (the cell budget's headroom makes this rare).
* Starvation guard: if a step that held flash work scheduled nothing at all
  (foreground requests could not be admitted, e.g. no free blocks while flash
  requests hold some), the next step does not hold, so the engine always
  makes progress.
* The class is a hint, not a privilege: a client that marks its own request
  as flash only lowers its own priority, so the key needs no signature.
No vLLM import.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

CLASS_KEY = "stateful_class"
FLASH = "flash"


def is_flash(extra_args: dict[str, Any] | None) -> bool:
    return bool(extra_args) and extra_args.get(CLASS_KEY) == FLASH


class FlashHold:
    """Per-step decision: hold flash requests back while foreground work exists."""

    def __init__(self, counters: Counter[str]) -> None:
        self.counters = counters
        self._starved = False

    def split(
        self, running: Iterable[Any], waiting: Iterable[Any], flash: Any, foreground: Iterable[Any] = ()
    ) -> tuple[list[Any], list[Any]]:
        """The flash requests to hold out of ``running`` and ``waiting`` this step
        (``flash(request) -> bool``); empty lists when nothing is held. Requests in
        ``foreground`` (other queues vLLM admits from) count as foreground work too."""
        running, waiting = list(running), list(waiting)
        others = any(not flash(r) for r in running) or any(not flash(r) for r in waiting)
        foreground = others or any(not flash(r) for r in foreground)
        if not foreground or self._starved:
            return [], []
        return [r for r in running if flash(r)], [r for r in waiting if flash(r)]

    def after_step(self, held: int, scheduled_ids: Iterable[str], flash_ids: set[str]) -> None:
        """Record the step: ``held`` requests held back, ``scheduled_ids`` what it scheduled."""
        scheduled = set(scheduled_ids)
        if held:
            self.counters["flash_held_steps"] += 1
            self._starved = not scheduled
        else:
            self._starved = False
            if scheduled & flash_ids and scheduled - flash_ids:
                self.counters["flash_shared_steps"] += 1
