"""How many tokens an engine step of ingestion alone may carry.

A foreground request (a session's turn or query) that arrives while such a step runs waits for it:
vLLM cannot stop a forward pass. So the step is bounded (``work_classes.StepPolicy`` asks for the
bound when ingestion runs with no admittable foreground):

* by tokens: ``ingest_step_tokens`` (0: vLLM's whole step budget);
* by time, when ``ingest_step_target_s`` is set: the bound is the target divided by the measured
  seconds per token of recent bounded steps. That cost is a step's whole wall time, from its scheduling
  to its output, over its tokens, so it carries the step's fixed part (each step reads every weight
  once) and the attention read over the session's context, which grows as the session does; the bound
  follows both, on whatever machine the engine runs: a few dozen tokens for a 0.5B model on a 2-core
  CPU, the token bound on a GPU. With vLLM's async scheduling (or a batch queue) a step is scheduled
  while the one before runs, so its measured time spans both: the bound then sizes the two steps a
  query arriving may wait for together.

Contract of ``bound(token_budget)``: within ``[min(floor, cap), cap]`` where ``cap`` is
``ingest_step_tokens`` or else ``token_budget``, and never above ``token_budget``. With a time target
it starts at ``floor`` (nothing measured yet), grows at most ``GROWTH``× per measured step (a step that
ran short by chance is not trusted further) and follows a dearer token at once (a slower step is not
averaged away). ``observe(tokens, seconds)`` takes each bounded step's scheduled tokens and wall time;
a step of fewer than half the bound's tokens (an ingestion's last chunk, a short append) says little
about a full one, whose fixed cost it bears over fewer tokens, and is taken only when it ran over the
target.
"""

from __future__ import annotations


class IngestStepSizer:
    GROWTH = 2.0
    SMOOTHING = 0.5  # weight of the newest step's seconds per token when tokens got cheaper

    def __init__(self, step_tokens: int, target_s: float, floor: int) -> None:
        if step_tokens < 0 or target_s < 0 or floor < 1:
            raise ValueError("step_tokens and target_s must be >= 0, floor >= 1")
        self.step_tokens = step_tokens
        self.target_s = target_s
        self.floor = floor
        self.seconds_per_token: float | None = None  # over measured bounded steps
        self._timed_bound: int = floor  # the time target's bound, before the token cap
        self._budget: int | None = None  # vLLM's step budget, as last asked

    @property
    def adaptive(self) -> bool:
        return self.target_s > 0

    def applies(self, token_budget: int) -> bool:
        """The step of ingestion alone is bounded (and, with a time target, measured): always with a
        target, else when the token bound is under vLLM's budget."""
        return self.adaptive or self.bound(token_budget) < token_budget

    def bound(self, token_budget: int) -> int:
        self._budget = token_budget
        cap = min(self.step_tokens or token_budget, token_budget)
        if not self.adaptive:
            return cap
        return max(1, min(self._timed_bound, cap))

    def observe(self, tokens: int, seconds: float) -> None:
        """A bounded step scheduled ``tokens`` and took ``seconds`` from its scheduling to its output."""
        if not self.adaptive or tokens <= 0 or seconds <= 0:
            return
        if 2 * tokens < self._timed_bound and seconds <= self.target_s:
            return  # a short step within the target: no measure of a full one
        per_token = seconds / tokens
        old = self.seconds_per_token
        if old is not None and per_token < old:
            per_token = old + self.SMOOTHING * (per_token - old)
        self.seconds_per_token = per_token
        wanted = int(self.target_s / per_token)
        grown = int(max(self._timed_bound, tokens) * self.GROWTH)
        limit = min(x for x in (self.step_tokens, self._budget, 1 << 20) if x)  # never past the cap
        self._timed_bound = max(self.floor, min(wanted, grown, limit))
