"""The retry budget and the backoff of reads tried again after a pod's failure (docs/contract.md
"Retries").

A read sent to a pod that then reset the connection under it or answered ``502``/``503``/``504``
may go once more, to another pod, after a short backoff with jitter: but only within the
**budget**, two rules:

- at a time (Envoy's): the retries under way, their backoff included, are at most ``RATIO`` of
  the requests bound to a pod, or ``MINIMUM`` when that is more;
- over time: every request earns ``RATIO`` of a retry, and a retry spends one; up to
  ``MINIMUM`` are saved from calm times. So the pods never see more than 1 + ``RATIO`` times
  the requests (plus those few saved), however long the trouble lasts or slow its answers are.

When a whole group is failing, retries cannot multiply its load: most of its reads get the
pod's own answer at once.
(A request tried again on a fresh connection because a kept-alive one was stale, or because a
connect failed before any byte was sent, costs the pods nothing and is outside the budget.)
"""

from __future__ import annotations

import random
from collections.abc import Callable

RATIO = 0.2  # retries under way: at most this share of the requests in flight...
MINIMUM = 3  # ...and at least this many at a time, whatever the load
BACKOFF_BASE = 0.025  # seconds: a retry waits a random time up to this (Envoy's base interval)
# Answers of a pod that a read is tried again after (on another pod): the pod, or what is
# behind it, could not serve it now; another pod may.
RETRIABLE_STATUSES = frozenset({502, 503, 504})


class RetryBudget:
    """The retries of one data-plane process under way, against the requests in flight."""

    __slots__ = ("_jitter", "earned", "in_flight", "retrying")

    def __init__(self, jitter: Callable[[], float] = random.random) -> None:
        self.in_flight = 0  # requests bound to a pod now (Exchange.bind / release)
        self.retrying = 0  # retries under way: waiting for their backoff, or bound again
        self.earned = 0.0  # retries the requests so far have earned and not spent (<= MINIMUM)
        self._jitter = jitter

    def bound(self, first_attempt: bool) -> None:
        """A request was bound to a pod; its first attempt earns a share of a retry."""
        self.in_flight += 1
        if first_attempt and self.earned < MINIMUM:
            self.earned = min(float(MINIMUM), self.earned + RATIO)

    def try_take(self) -> bool:
        """Whether one more retry fits the budget (and, if so, it is counted)."""
        if self.earned < 1.0 or self.retrying >= max(MINIMUM, RATIO * self.in_flight):
            return False
        self.earned -= 1.0
        self.retrying += 1
        return True

    def give_back(self) -> None:
        self.retrying -= 1

    def backoff(self) -> float:
        """How long a retry waits: up to ``BACKOFF_BASE``, at random ("full jitter"), so that
        the retries of many requests a pod failed at once do not arrive in step."""
        return BACKOFF_BASE * self._jitter()
