"""Weighted FedAvg (McMahan et al. 2017) folded into one running sum as updates arrive.

``flwr.server.strategy.aggregate.aggregate`` computes the same weighted mean but needs every
site's update in memory at once; here each update is added to a float64 running sum and
dropped, so peak memory is a small multiple of the model size whatever the number of sites.
An update is added piece by piece (``common.tensors.Pieces``): the round reads a spooled upload
from disk a piece at a time and never holds it whole.
``tests/unit/test_aggregation.py`` checks the result against Flower's function.

Averaging DP-noised deltas is post-processing: it costs no privacy (Dwork & Roth 2014, Prop. 2.1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from common.errors import InvalidUpdateError
from common.tensors import StateLike, as_pieces, flat_parts


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
        # Piece by piece: a float64 copy of a whole update was the fold's largest temporary.
        for k, acc in self._sum.items():
            for a, d in zip(flat_parts(acc), upd.pieces(k), strict=True):
                a.add_(d.to(torch.float64), alpha=float(weight))
        self.total_weight += float(weight)
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise InvalidUpdateError("no update to aggregate")
        out: dict[str, torch.Tensor] = {}
        for k, v in self._sum.items():
            mean = torch.empty(v.shape, dtype=torch.float32)
            for m, s in zip(flat_parts(mean), flat_parts(v), strict=True):
                m.copy_(s / self.total_weight)
            out[k] = mean
        return out


def apply_delta(
    state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return {k: (v.to(torch.float32) + delta[k].to(torch.float32)) for k, v in state.items()}
