"""Per-destination delivery concurrency, as Postfix's qmgr(8) schedules it
(SCHEDULER_README, "Concurrency scheduling"; postconf(5)
*_destination_concurrency_*).

Each (transport, destination) has a concurrency *window*: it starts at
$initial_destination_concurrency, grows with positive feedback (a delivery
that completed without a connection or handshake failure) up to
$transport_destination_concurrency_limit, and shrinks with negative feedback
(a delivery where no server could be reached) down to 1.  After
$transport_destination_concurrency_failed_cohort_limit failed
pseudo-cohorts (a pseudo-cohort is "window" deliveries) the destination is
dead: deliveries waiting for it, and new ones, are deferred at once with the
last reason until $minimal_backoff_time has passed (or a flush), so a dead
destination never ties up delivery slots.

Feedback values take Postfix's forms: "number", "number/number" (constant)
and "number/concurrency" (divided by the current window).  Positive feedback
raises the window at the end of a run of 1/feedback successes; negative
feedback lowers it at the start of a run of 1/feedback failures.

Pure bookkeeping plus an asyncio FIFO of waiters; no clock of its own (the
caller passes times), so tests drive it with a fake clock.
"""

from __future__ import annotations

import asyncio
from collections import deque

EPSILON = 1e-9


def parse_feedback(text: str) -> tuple[float, bool]:
    """``"1"`` -> (1.0, False); ``"1/4"`` -> (0.25, False);
    ``"1/concurrency"`` -> (1.0, True), meaning value / window."""
    text = (text or "1").strip().replace(" ", "")
    num, sep, den = text.partition("/")
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"bad concurrency feedback value: {text}") from None
    per_window = False
    if sep:
        if den.lower() == "concurrency":
            per_window = True
        else:
            try:
                d = float(den)
            except ValueError:
                raise ValueError(f"bad concurrency feedback value: {text}") from None
            if d <= 0:
                raise ValueError(f"bad concurrency feedback value: {text}")
            value /= d
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"concurrency feedback value out of range 0..1: {text}")
    return value, per_window


class Destination:
    """One destination's window, busy count, failure state and waiters."""

    def __init__(self, *, initial: int, limit: int, positive=(1.0, False),
                 negative=(1.0, False), cohort_limit: int = 1) -> None:
        self.limit = max(0, limit)              # 0: no limit
        self.initial = max(1, initial)
        if self.limit:
            self.initial = min(self.initial, self.limit)
        self.positive = positive
        self.negative = negative
        self.cohort_limit = max(0, cohort_limit)
        self.window = self.initial
        self.busy = 0
        self.success = 0.0
        self.failure = 0.0
        self.fail_cohorts = 0.0
        # (until, reason, dsn) while the destination is dead
        self.dead: tuple[float, str, str] | None = None
        self._waiters: deque[asyncio.Future] = deque()

    # ------------------------------------------------------------ slots
    @property
    def idle(self) -> bool:
        return self.busy == 0 and not self._waiters

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    async def acquire(self) -> bool:
        """A delivery slot (FIFO); False when the destination is or becomes dead."""
        if self.dead is not None:
            return False
        if self.busy < self.window and not self._waiters:
            self.busy += 1
            return True
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result():
                self.release()      # the slot was handed over as we were cancelled
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        self.busy -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters and (self.dead is not None or self.busy < self.window):
            fut = self._waiters.popleft()
            if fut.done():
                continue
            if self.dead is not None:
                fut.set_result(False)
            else:
                self.busy += 1
                fut.set_result(True)

    def _feedback(self, spec) -> float:
        value, per_window = spec
        return value / max(1, self.window) if per_window else value

    # ------------------------------------------------------------ feedback
    def succeeded(self) -> None:
        """A delivery completed without a connection or handshake failure."""
        self.fail_cohorts = 0.0
        if self.dead is not None:
            return
        # Grow only while below the limit and while the window is actually in use
        # (plus a margin of the initial concurrency): an unused window would make
        # later negative feedback ineffective.
        if (not self.limit or self.window < self.limit) and \
                self.window < self.busy + self.initial:
            fb = self._feedback(self.positive)
            self.success += fb
            while fb > 0 and self.success >= 1.0 - EPSILON:
                self.window += 1
                self.success -= 1.0
                self.failure = 0.0
            if self.limit and self.window > self.limit:
                self.window = self.limit
        self._hand_over()

    def failed(self, until: float, reason: str, dsn: str) -> bool:
        """A delivery where no server could be reached; True when this made
        the destination dead (until ``until``)."""
        if self.dead is not None:
            return False
        self.fail_cohorts += 1.0 / max(1, self.window)
        if self.cohort_limit and self.fail_cohorts >= self.cohort_limit - EPSILON:
            self.dead = (until, reason, dsn)
            self._hand_over()           # every waiter is told at once
            return True
        fb = self._feedback(self.negative)
        if fb > 0:
            if self.failure <= EPSILON:
                # Start of a run of 1/feedback failures: decrement now.
                self.window -= 1
                self.success = 0.0
                self.failure += 1.0
            self.failure -= fb
            if self.window < 1:
                self.window = 1
        return False

    def resume(self) -> None:
        """Back from the dead (backoff over, or a flush): best concurrency is
        anyone's guess, so the work in progress or the initial window."""
        if self.dead is None:
            return
        self.dead = None
        self.window = self.busy if self.busy > 0 else self.initial
        if self.limit:
            self.window = min(self.window, self.limit)
        self.success = self.failure = self.fail_cohorts = 0.0
        self._hand_over()
