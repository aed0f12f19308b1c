"""Turns at a limited resource (model downloads, a round's upload places) without a thread per waiter.

A synchronous gRPC server spends one worker thread on each call it is serving, and a thread
blocked in a handler costs the process about 60 KiB (``bench/RESULTS.md`` §2): sites waiting
inside the orchestrator would make its memory grow with their number. So a caller without a
place is told when to ask again (``common.rpc.transport.RETRY_AFTER_MS``), and its place in the
line is kept meanwhile; the line is a few bytes per waiting key.

The line is first come, first served. A key is admitted when the resource has room for it and
for every key ahead of it that is *due* (told to come back by now). A key that is not due yet
does not hold a free place back, so the resource does not sit idle while a waiter sleeps; when
it comes back it is still near the front and gets a short wait. A key that does not come back
within ``grace`` of its time loses its place (its caller went away). The time to come back is
the key's distance from the front times the mean interval between admissions while the line
was busy (an exponentially weighted mean), within ``[min_retry_s, max_retry_s]``; that interval
covers whatever frees a place (a download ending, the round folding an update), so the line
needs no model of it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_GAP_S = 0.05
"""Assumed interval between admissions before one has been measured."""


@dataclass
class _Place:
    due: float  # when the key was told to come back
    expires: float  # after this the place is given up


class TurnLine:
    """First come, first served places at a resource with ``capacity`` concurrent holders.

    Not thread-safe: the owner (``orchestrator.core.broker.Broker``) calls it under its lock.
    """

    def __init__(
        self,
        *,
        min_retry_s: float = 0.01,
        max_retry_s: float = 2.0,
        grace_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < min_retry_s <= max_retry_s:
            raise ValueError("need 0 < min_retry_s <= max_retry_s")
        self.min_retry_s = min_retry_s
        self.max_retry_s = max_retry_s
        self.grace_s = grace_s
        self._clock = clock
        self._places: OrderedDict[str, _Place] = OrderedDict()
        self._gap_s = DEFAULT_GAP_S
        self._last_admitted: float | None = None

    def __len__(self) -> int:
        return len(self._places)

    @property
    def mean_gap_s(self) -> float:
        """Mean interval between admissions while keys were waiting."""
        return self._gap_s

    def ask(self, key: str, free: int) -> float | None:
        """Admit ``key`` (None) if ``free`` places cover it and every due key ahead of it; else
        keep (or take) its place and return the seconds after which to ask again."""
        now = self._clock()
        self._drop_expired(now)
        ahead_due = 0
        ahead = 0
        for k, place in self._places.items():
            if k == key:
                break
            ahead += 1
            if place.due <= now:
                ahead_due += 1
        if free > ahead_due:
            contended = len(self._places) - (1 if key in self._places else 0) > 0
            self._places.pop(key, None)
            if contended and self._last_admitted is not None:
                sample = min(now - self._last_admitted, self.max_retry_s)
                self._gap_s = 0.7 * self._gap_s + 0.3 * sample
            self._last_admitted = now
            return None
        wait = (ahead - free + 1) * self._gap_s
        wait = min(self.max_retry_s, max(self.min_retry_s, wait))
        due = now + wait
        self._places[key] = _Place(due=due, expires=due + max(self.grace_s, wait))
        return wait

    def leave(self, key: str) -> None:
        """The caller of ``key`` gave up (its round ended, its call was cancelled)."""
        self._places.pop(key, None)

    def _drop_expired(self, now: float) -> None:
        for k in [k for k, p in self._places.items() if p.expires < now]:
            del self._places[k]
