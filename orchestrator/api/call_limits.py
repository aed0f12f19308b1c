"""Bounds on concurrent calls, so that one caller cannot take every gRPC worker thread.

gRPC's Python server runs each call on a thread of one pool (``max_workers``); a call that
waits (a parked ``PullTask`` long-poll, a slow upload) holds its thread. Unbounded, one site
certificate that parks more long-polls than the pool has threads would starve every other
caller, analysts included. So:

- each caller (its certificate's role and name) has at most ``per_caller`` calls in progress
  on a service. Without mTLS (loopback development) there is no identity to bound: a caller
  could open another connection at will, so only the total applies;
- all agent calls together leave ``reserve`` threads free for the control service and health
  checks, whatever the number of sites.

A call beyond a bound is refused at once (``TryLaterError``: RESOURCE_EXHAUSTED with a retry
hint), so it costs its thread only for that refusal. An honest agent has at most a long-poll,
a heartbeat and one transfer in flight.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from common.errors import PermissionDeniedError, TryLaterError
from common.rpc.tls import peer_identity

MAX_CALLS_PER_SITE = 8
MAX_CALLS_PER_USER = 16


def caller_key(context: grpc.ServicerContext, *, mtls: bool) -> str | None:
    """Who is calling: the certificate's role and name; None without mTLS or a certificate
    (the handler's own identity check refuses the latter)."""
    if not mtls:
        return None
    try:
        ident = peer_identity(context)
    except PermissionDeniedError:
        return None
    return f"{ident.role}:{ident.name}"


class CallLimiter:
    """Counts the calls in progress on one service: per caller, and in total."""

    def __init__(self, service: str, *, per_caller: int, total: int | None, mtls: bool) -> None:
        if per_caller < 1 or (total is not None and total < 1):
            raise ValueError(f"{service}: call limits must be at least 1")
        self.service = service
        self.per_caller = per_caller
        self.total = total
        self.mtls = mtls
        self._lock = threading.Lock()
        self._by_caller: Counter[str] = Counter()
        self._in_progress = 0

    @contextmanager
    def hold(self, context: grpc.ServicerContext) -> Iterator[None]:
        key = caller_key(context, mtls=self.mtls)
        with self._lock:
            if key is not None and self._by_caller[key] >= self.per_caller:
                raise TryLaterError(
                    f"{key} already has {self.per_caller} calls in progress on the "
                    f"{self.service}; finish or cancel some first",
                    retry_after_s=1.0,
                )
            if self.total is not None and self._in_progress >= self.total:
                raise TryLaterError(
                    f"the {self.service} is at its limit of {self.total} calls in progress",
                    retry_after_s=1.0,
                )
            if key is not None:
                self._by_caller[key] += 1
            self._in_progress += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_progress -= 1
                if key is not None:
                    self._by_caller[key] -= 1
                    if self._by_caller[key] <= 0:
                        del self._by_caller[key]

    def in_progress(self) -> int:
        with self._lock:
            return self._in_progress


def control_reserve(max_workers: int) -> int:
    """Threads kept free of agent calls: an eighth of the pool, at least 8."""
    return max(8, max_workers // 8)
