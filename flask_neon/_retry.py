"""The one retry policy: exponential backoff with jitter, bounded by a deadline.

Used by the engine (opening a connection to a compute that is waking up) and by
``flask db-check --wait``. What is worth retrying is decided by the error classification
(:attr:`~flask_neon._errors.ErrorCause.transient`), not here.
"""

from __future__ import annotations

import random
import time


class Backoff:
    """The pauses between attempts: the first at most ``base`` seconds, each ceiling doubling up
    to ``cap``, jittered in the upper half of the ceiling so that many clients started together
    spread out while each one still backs off.

    Args:
        deadline: ``time.monotonic()`` value after which no attempt may start.
        base: Ceiling of the first pause.
        cap: Largest ceiling.
    """

    def __init__(self, deadline: float, *, base: float = 0.2, cap: float = 2.0) -> None:
        self.deadline = deadline
        self.base = base
        self.cap = cap
        self.attempts = 1

    def next_delay(self) -> float | None:
        """The pause before the next attempt, or None when the deadline leaves no room."""
        ceiling = min(self.cap, self.base * 2 ** (self.attempts - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        room = self.deadline - time.monotonic()
        if room <= 0:
            return None
        self.attempts += 1
        return min(delay, room)
