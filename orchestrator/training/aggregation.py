"""Weighted FedAvg (McMahan et al. 2017) folded into one running sum as updates arrive, with a
cap on any one site's share of the weight; coordinate-wise trimmed mean and median over sites.

``flwr.server.strategy.aggregate.aggregate`` computes the same weighted mean but needs every
site's update in memory at once; here each update is added to a float64 running sum and
dropped, so peak memory is a small multiple of the model size whatever the number of sites.
An update is added piece by piece (``common.training.tensors.Pieces``): the round reads a spooled upload
from disk a piece at a time and never holds it whole.
``tests/unit/test_aggregation.py`` checks the result against Flower's function.

The weights are the rows each site registered, which a site could inflate: no site's share of
a round may pass the job's ``aggregation.max_site_weight`` (:func:`capped_weights` at dispatch,
:func:`share_denominator` when some sites did not answer). The robust methods (Yin et al.
2018, "Byzantine-Robust Distributed Learning", ICML) need every site's value of a coordinate at
once: :func:`coordinate_aggregate` reads the held updates (spooled) a piece at a time, so
memory is one piece per site, not one model per site.

A round folds each accepted update into one :class:`RoundAggregation` (:class:`FedAvgRound`,
:class:`CoordinateRound`, or site-level DP wrapping the sum: ``orchestrator.training.site_dp``) and
asks it for the mean delta when the round ends.

Averaging DP-noised deltas is post-processing: it costs no privacy (Dwork & Roth 2014, Prop. 2.1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from common.errors import InvalidUpdateError
from common.training.tensors import StateLike, as_pieces, flat_parts


class RunningWeightedMean:
    """Σ wᵢ·Δᵢ / Σ wᵢ over a stream of state dicts with identical keys and shapes."""

    def __init__(self, reference: Mapping[str, torch.Tensor]) -> None:
        self._sum: dict[str, torch.Tensor] = {
            # contiguous, so that flat_parts gives views that add_ writes through
            k: torch.zeros(v.shape, dtype=torch.float64)
            for k, v in reference.items()
        }
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: StateLike, weight: float) -> None:
        if not (weight > 0 and math.isfinite(weight)):
            raise InvalidUpdateError(f"aggregation weight must be positive, got {weight}")
        upd = as_pieces(delta)
        if set(upd.names()) != self._sum.keys():
            raise InvalidUpdateError("update tensors do not match the model's")
        for k, acc in self._sum.items():
            if upd.shape(k) != tuple(acc.shape):
                raise InvalidUpdateError(
                    f"tensor {k!r} has shape {upd.shape(k)}, expected {tuple(acc.shape)}"
                )
        # Piece by piece: a float64 copy of a whole update would be the fold's largest temporary.
        for k, acc in self._sum.items():
            for a, d in zip(flat_parts(acc), upd.pieces(k), strict=True):
                a.add_(d.to(torch.float64), alpha=float(weight))
        self.total_weight += float(weight)
        self.count += 1

    def mean(self, denominator: float | None = None) -> dict[str, torch.Tensor]:
        """Σ wᵢ·Δᵢ / ``denominator`` (default Σ wᵢ; a larger one gives the rest of the weight
        to the zero update, i.e. to the current model)."""
        if self.count == 0:
            raise InvalidUpdateError("no update to aggregate")
        den = self.total_weight if denominator is None else float(denominator)
        if not den >= self.total_weight * (1 - 1e-12):
            raise ValueError(f"denominator {den} is below the total weight {self.total_weight}")
        out: dict[str, torch.Tensor] = {}
        for k, v in self._sum.items():
            mean = torch.empty(v.shape, dtype=torch.float32)
            for m, s in zip(flat_parts(mean), flat_parts(v), strict=True):
                m.copy_(s / den)
            out[k] = mean
        return out


def capped_weights(weights: Mapping[str, float], max_share: float) -> dict[str, float]:
    """The weights with the largest lowered to one level τ, so that no share passes
    ``max(max_share, 1/n)`` (n sites cannot all be below 1/n); the others are untouched.

    Water-filling: with the k largest at τ and the rest R unchanged, τ/(kτ + R) = s gives
    τ = s·R/(1 − k·s); k is the smallest count for which the next weight lies below τ.
    """
    n = len(weights)
    if n == 0:
        return {}
    s = max(float(max_share), 1.0 / n)
    w = sorted(weights.values(), reverse=True)
    suffix = [0.0] * (n + 1)  # Σ w[k:], summed from the small end (no cancellation)
    for k in range(n - 1, -1, -1):
        suffix[k] = suffix[k + 1] + w[k]
    if w[0] <= s * suffix[0]:
        return dict(weights)
    for k in range(1, n):
        if 1.0 - k * s <= 1e-12:
            break
        tau = s * suffix[k] / (1.0 - k * s)
        if w[k] <= tau:
            return {sid: min(v, tau) for sid, v in weights.items()}
    return {sid: w[-1] for sid in weights}  # s = 1/n: every site at the smallest weight


def share_denominator(weights: Sequence[float], max_share: float) -> float:
    """The FedAvg denominator that keeps every share at most ``max(max_share, 1/k)`` among the
    k updates received: Σ w, or max w / share when sites that did not answer leave one site
    with too much of the rest (the excess goes to the current model)."""
    if not weights:
        raise InvalidUpdateError("no update to aggregate")
    s = max(float(max_share), 1.0 / len(weights))
    return max(sum(weights), max(weights) / s)


AGGREGATORS = ("fedavg", "trimmed_mean", "median")


def coordinate_aggregate(
    updates: Sequence[StateLike],
    reference: Mapping[str, torch.Tensor],
    *,
    method: str,
    trim: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Coordinate-wise ``median`` or ``trimmed_mean`` (⌊trim·n⌋ values dropped at each end)
    of ``updates``, unweighted; read in lockstep a piece at a time (one piece per site in
    memory). The updates must already be checked against ``reference``."""
    n = len(updates)
    if n == 0:
        raise InvalidUpdateError("no update to aggregate")
    if method not in ("median", "trimmed_mean"):
        raise ValueError(f"unknown coordinate-wise aggregator {method!r}")
    cut = 0 if method == "median" else math.floor(trim * n)
    if not 0 <= 2 * cut < n:
        raise ValueError(f"trim {trim} leaves no value of {n}")
    ups = [as_pieces(u) for u in updates]
    out: dict[str, torch.Tensor] = {}
    for k, ref in reference.items():
        result = torch.empty(ref.shape, dtype=torch.float32)
        streams = [u.pieces(k) for u in ups]
        for dst in flat_parts(result):
            stack = torch.stack([next(st).to(torch.float64) for st in streams])
            ordered = stack.sort(dim=0).values
            if method == "median":
                value = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
            else:
                value = ordered[cut : n - cut].mean(dim=0)
            dst.copy_(value)
        out[k] = result
    return out


def apply_delta(
    state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return {k: (v.to(torch.float32) + delta[k].to(torch.float32)) for k, v in state.items()}


@dataclass
class Aggregated:
    """A round's mean delta, what the job's events should say about it, and the job fields
    it sets (e.g. the next round's site-level clip norm)."""

    mean: dict[str, torch.Tensor]
    notes: list[tuple[str, str]] = field(default_factory=list)  # (level, message)
    job_fields: dict[str, Any] = field(default_factory=dict)


class RoundAggregation(Protocol):
    """One round's aggregation: accepted updates are added as they arrive (already checked
    against the model), then :meth:`finish` gives the mean delta."""

    keeps_updates: bool
    """Whether :meth:`add` keeps a reference to the update (its spooled payload must stay
    open until :meth:`finish`)."""

    def add(self, site_id: str, delta: StateLike, norm: float) -> None: ...

    def finish(self, site_ids: Sequence[str]) -> Aggregated:
        """The mean over the updates of ``site_ids`` (every site added, in order)."""
        ...


class FedAvgRound:
    """Weighted FedAvg folded as updates arrive: ``weights`` are the capped weights of every
    site the round was sent to (:func:`capped_weights`); a site that did not answer or whose
    update was rejected adds nothing, and :func:`share_denominator` keeps every share among
    the updates received at most ``max(max_share, 1/k)``."""

    keeps_updates = False

    def __init__(
        self,
        reference: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
        max_share: float,
        *,
        round: int,
    ) -> None:
        self._sum = RunningWeightedMean(reference)
        self.weights = dict(weights)
        self.max_share = max_share
        self.round = round

    def add(self, site_id: str, delta: StateLike, norm: float) -> None:
        self._sum.add(delta, self.weights[site_id])

    def finish(self, site_ids: Sequence[str]) -> Aggregated:
        got = [self.weights[s] for s in site_ids]
        denominator = share_denominator(got, self.max_share)
        notes = []
        if denominator > self._sum.total_weight * (1 + 1e-9):
            notes.append(
                (
                    "warning",
                    f"round {self.round}: {len(got)} of {len(self.weights)} site(s) answered; "
                    f"the update is scaled by {self._sum.total_weight / denominator:.3g} so "
                    f"that no site has more than {max(self.max_share, 1 / len(got)):.0%} of it",
                )
            )
        return Aggregated(self._sum.mean(denominator), notes)


class CoordinateRound:
    """A coordinate-wise robust aggregate (:func:`coordinate_aggregate`) of the updates,
    unweighted; the updates are kept (spooled) until the round ends."""

    keeps_updates = True

    def __init__(self, reference: Mapping[str, torch.Tensor], *, method: str, trim: float):
        self.reference = reference
        self.method = method
        self.trim = trim
        self._held: list[StateLike] = []

    def add(self, site_id: str, delta: StateLike, norm: float) -> None:
        self._held.append(delta)

    def finish(self, site_ids: Sequence[str]) -> Aggregated:
        mean = coordinate_aggregate(self._held, self.reference, method=self.method, trim=self.trim)
        self._held.clear()
        return Aggregated(mean)
