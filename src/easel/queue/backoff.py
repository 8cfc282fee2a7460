"""Backoff before trying again, written once for every retry in easel.

Job retries, webhook and upload deliveries, store and bus reconnects, and the client's
reconnects all wait :func:`retry_delay`. Pure but for the jitter, which takes a random part
of each delay so that many retrying parties (a restarted server's clients) spread out.
The client may import this module (its one exception to "no server module").
"""

from __future__ import annotations

import random

_jitter = random.Random()


def retry_delay(
    attempt: int, *, base: float = 2.0, cap: float = 60.0, jitter: float = 0.5
) -> float:
    """Exponential backoff before retry ``attempt`` (1-based): ``base * 2**(attempt-1)`` up
    to ``cap``, less up to ``jitter`` of it at random (``jitter=1``: "full jitter")."""
    delay = min(cap, base * 2 ** max(attempt - 1, 0))
    return float(delay * (1 - jitter * _jitter.random()))
