"""Privacy accounting: turn a site's recorded DP events into a sound (ε, δ) upper bound.

:func:`compute_epsilon` returns an :class:`EpsilonBound` whose ``epsilon`` is an *upper bound*
on the ε of the adaptive composition of the events at δ (add/remove-one neighbours), with the
accountant's numerical error added, never subtracted: ``"prv"`` (default; Gopi et al. 2021),
``"pld"`` (dp_accounting, pessimistic) or ``"rdp"`` (analytic, looser). Each call is bounded
in time; where a tight accountant cannot answer within its bounds, or answers above the RDP
bound, the next sound one is used and :attr:`EpsilonBound.accountant` names it. An empty
history costs 0; when no finite bound exists :class:`~common.errors.PrivacyAccountingError`
is raised. The specification, the fallbacks and their sources: ``docs/accounting.md``.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Final

from common.dp.checks import check_delta, finite_epsilon
from common.dp.events import DpEvent, merge_events
from common.dp.pld import PLD_MAX_COMPOSITIONS, PLD_MAX_EVENTS, pld_epsilon
from common.dp.prv import PrvUnavailable, prv_epsilon
from common.dp.rdp import rdp_raw

__all__ = ["ACCOUNTANTS", "EpsilonBound", "check_accountant", "compute_epsilon"]

_log = logging.getLogger(__name__)

ACCOUNTANTS: Final = ("prv", "pld", "rdp")
"""Accountant names accepted by :func:`compute_epsilon`."""


@dataclass(frozen=True)
class EpsilonBound:
    """A sound upper bound ``epsilon`` on the privacy loss at ``delta``.

    ``accountant`` names the accountant that produced the bound (``"prv"``, ``"pld"`` or
    ``"rdp"``): a request that fell back names the one actually used. ``epsilon_estimate`` is
    the accountant's point estimate where it gives one (PRV; 0.0 for an empty history), never
    to be reported as the guarantee.
    """

    epsilon: float
    delta: float
    accountant: str
    epsilon_estimate: float | None = None


def check_accountant(accountant: str) -> None:
    """``ValueError`` unless ``accountant`` is one of :data:`ACCOUNTANTS`."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"Unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}.")


def compute_epsilon(
    events: Sequence[DpEvent],
    *,
    delta: float,
    accountant: str = "prv",
    within_s: float | None = None,
) -> EpsilonBound:
    """A sound upper bound on ε at ``delta`` for the composition of ``events``.

    See the module docstring for the accountants. Raises ``ValueError`` on bad arguments and
    :class:`PrivacyAccountingError` when no finite bound can be computed.

    ``within_s``: for callers that must answer quickly (an RPC thread): the tight bound if it
    is known or computed within that many seconds (by a background worker, which goes on and
    keeps it for the next call), else the RDP bound (labelled ``"rdp"``: sound, looser, and
    analytic whatever the number of steps).
    """
    check_delta(delta)
    check_accountant(accountant)
    merged = merge_events(events)
    if not merged:
        return EpsilonBound(epsilon=0.0, delta=delta, accountant=accountant, epsilon_estimate=0.0)
    # The orchestrator and the agents ask for the same histories again and again (status
    # views, heartbeats, rounds); the answer is a pure function of the merged history.
    key = (tuple(merged), float(delta), accountant)
    if within_s is None or accountant == "rdp":
        return _compute_and_keep(key)
    with _known_lock:
        known = _known.get(key)
        if known is not None:
            return known
    try:
        return _background().submit(key).result(timeout=max(0.0, within_s))
    except FutureTimeout:
        rdp = finite_epsilon(rdp_raw(merged, delta), "RDP")
        return EpsilonBound(epsilon=rdp, delta=delta, accountant="rdp")


_Key = tuple[tuple[DpEvent, ...], float, str]

_KNOWN_MAX: Final = 4096
_known: dict[_Key, EpsilonBound] = {}  # tight bounds already computed (a bounded cache)
_known_lock = threading.Lock()


def _compute_and_keep(key: _Key) -> EpsilonBound:
    bound = _compute_merged(*key)
    with _known_lock:
        if len(_known) >= _KNOWN_MAX:
            _known.clear()
        _known[key] = bound
    return bound


class _Worker:
    """One daemon thread computing tight bounds that quick callers asked for (each history
    once; a caller that gave up gets it from the cache next time). A daemon, so a queue of
    histories never delays the process's exit."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[_Key, Future[EpsilonBound]]] = queue.SimpleQueue()
        self._pending: dict[_Key, Future[EpsilonBound]] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="epsilon-worker", daemon=True).start()

    def submit(self, key: _Key) -> Future[EpsilonBound]:
        with self._lock:
            fut = self._pending.get(key)
            if fut is None:
                fut = Future()
                self._pending[key] = fut
                self._queue.put((key, fut))
            return fut

    def _run(self) -> None:
        while True:
            key, fut = self._queue.get()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(_compute_and_keep(key))
                except BaseException as err:  # handed to whoever waits; the worker goes on
                    fut.set_exception(err)
            with self._lock:
                self._pending.pop(key, None)


_worker: _Worker | None = None
_worker_lock = threading.Lock()


def _background() -> _Worker:
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = _Worker()
        return _worker


@functools.lru_cache(maxsize=2048)
def _compute_merged(merged: tuple[DpEvent, ...], delta: float, accountant: str) -> EpsilonBound:
    scale = finite_epsilon(rdp_raw(merged, delta), "RDP")
    if accountant == "rdp":
        return EpsilonBound(epsilon=scale, delta=delta, accountant="rdp")
    if accountant == "prv":
        try:
            upper, estimate = prv_epsilon(merged, delta, scale)
        except PrvUnavailable as unavailable:
            _log.info("PRV accountant unavailable (%s); using PLD instead.", unavailable)
        else:
            return _at_most_rdp(
                EpsilonBound(
                    epsilon=upper, delta=delta, accountant="prv", epsilon_estimate=estimate
                ),
                scale,
            )
    compositions = sum(e.steps for e in merged if e.sample_rate < 1.0)
    if compositions > PLD_MAX_COMPOSITIONS or len(merged) > PLD_MAX_EVENTS:
        # Bounded cost (``docs/accounting.md``, "Cost"): RDP is looser but analytic.
        _log.info(
            "%d compositions of %d distinct events are beyond PLD's bounded cost; using RDP.",
            compositions,
            len(merged),
        )
        return EpsilonBound(epsilon=scale, delta=delta, accountant="rdp")
    try:
        eps = pld_epsilon(merged, delta, scale)
    except (ValueError, ArithmeticError, MemoryError) as err:
        eps, problem = math.nan, f"{type(err).__name__}: {err}"
    else:
        problem = f"it returned ε = {eps}"
    if math.isfinite(eps) and eps >= 0:
        return _at_most_rdp(EpsilonBound(epsilon=eps, delta=delta, accountant="pld"), scale)
    # E.g. δ below the mass PLD truncates to infinity. RDP is looser but still a bound.
    _log.warning("PLD accountant unusable (%s); reporting the RDP bound instead.", problem)
    return EpsilonBound(epsilon=scale, delta=delta, accountant="rdp")


def _at_most_rdp(bound: EpsilonBound, rdp_bound: float) -> EpsilonBound:
    """The smaller of two sound upper bounds. A tight accountant above RDP signals numerical
    trouble (seen with PLD at δ ≈ 1e-13, where its pessimistic tail mass blows up)."""
    if bound.epsilon <= rdp_bound:
        return bound
    _log.info(
        "%s bound ε=%.6g exceeds the RDP bound ε=%.6g; reporting RDP.",
        bound.accountant.upper(),
        bound.epsilon,
        rdp_bound,
    )
    return EpsilonBound(epsilon=rdp_bound, delta=bound.delta, accountant="rdp")
