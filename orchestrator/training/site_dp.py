"""Site-level DP on the server: DP-FedAvg with optional adaptive clipping.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (DP-FedAvg): each site's update is clipped to L2 norm S, the clipped updates are
summed with uniform weights, Gaussian noise N(0, (z·S)²) is added and the sum divided by a
fixed, public denominator (the number of sites selected for the job). Adding or removing one
whole site changes the sum by at most S, so each round is a Gaussian mechanism with noise
multiplier z at the *site* level; over R rounds with every selected site taking part, that is
``DpEvent(z, q=1, steps=R)``, composed here with the PRV accountant like any other event.

Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive
Clipping", NeurIPS 2021: S follows the γ-quantile of update norms, S ← S·exp(−η(b̃ − γ)),
where b̃ is the fraction of unclipped updates counted with Gaussian noise σ_b. Each site
contributes the bit b_i = 1[‖Δ_i‖ ≤ S] − ½ ∈ {−½, ½}, so adding or removing one site moves
the released sum Σ b_i by ½ (as TF Privacy's quantile estimator does: the ½ is added back
after dividing by the public denominator). Their Theorem 1: releasing both the sum (noise
multiplier z_Δ) and that count (σ_b, sensitivity ½) is as private as one Gaussian mechanism
with z = (z_Δ⁻² + (2σ_b)⁻²)^(-1/2); so for a requested z we use z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2),
which needs 2σ_b > z. (Counting 0/1 bits instead has sensitivity 1, and the same formula
would understate ε by 1.08-2.55x.)

Noise comes from a private generator (``common.dp.noise.private_torch_generator``, seeded from
OS entropy) unless a test passes its own: never from torch's global generator, which other
job threads seed with a public seed when they build a model.

:class:`SiteDPAggregation` is a round's aggregation (``orchestrator.training.aggregation``) with this
mechanism around its sum: each update clipped on the way in, noise added on the way out.

This guarantee is *in addition to* the sample-level guarantee of each site's DP-SGD, and it
relies on the orchestrator applying it honestly (it is the orchestrator's noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.dp import noise
from common.dp.events import DpEvent
from common.errors import InvalidSpecError
from common.specs import SiteDPSpec
from common.training.tensors import StateLike, as_pieces, flat_parts, l2_norm
from orchestrator.training.aggregation import Aggregated


def sum_noise_multiplier(z: float, count_sigma: float | None) -> float:
    """z_Δ for the sum when a noised count with σ_b is released too (Andrew et al. Thm 1)."""
    if count_sigma is None:
        return z
    rest = z**-2 - (2.0 * count_sigma) ** -2
    if rest <= 0:
        raise InvalidSpecError(
            f"site_dp: count noise σ_b={count_sigma:g} is too small for noise_multiplier={z:g} "
            f"(adaptive clipping needs 2·σ_b > z); raise site_dp.count_noise_multiplier"
        )
    return float(rest**-0.5)


@dataclass
class SiteDPRound:
    """One round of clipped, noised, uniformly weighted aggregation."""

    clip_norm: float
    noise_multiplier: float
    sum_noise_multiplier: float
    count_sigma: float | None
    denominator: int

    def __post_init__(self) -> None:
        self._sum: dict[str, torch.Tensor] | None = None
        self.unclipped = 0
        self.count = 0

    def add(self, delta: StateLike, norm: float | None = None) -> float:
        """Clip one site's update to the clip norm and add it; returns its norm before.

        ``norm`` is the update's L2 norm when the caller has it already (``check_update``
        returns it), which saves a pass over the update's values."""
        upd = as_pieces(delta)
        norm = l2_norm(upd) if norm is None else norm
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        if self._sum is None:
            # Sorted names: the noise is drawn in the same order whatever the update's format.
            self._sum = {
                k: torch.zeros(upd.shape(k), dtype=torch.float64) for k in sorted(upd.names())
            }
        elif set(upd.names()) != self._sum.keys():
            raise InvalidSpecError("site-level DP: an update's tensors differ from the first one's")
        for k, acc in self._sum.items():
            for a, d in zip(flat_parts(acc), upd.pieces(k), strict=True):
                a.add_(d.to(torch.float64), alpha=scale)
        self.unclipped += int(norm <= self.clip_norm)
        self.count += 1
        return norm

    @property
    def count_statistic(self) -> float:
        """What the count release adds noise to: Σ (1[unclipped] − ½), sensitivity ½."""
        return self.unclipped - 0.5 * self.count

    def finish(
        self, spec: SiteDPSpec, generator: torch.Generator | None = None
    ) -> tuple[dict[str, torch.Tensor], float]:
        """The noised mean update and the next round's clip norm.

        ``generator``: for tests only; by default every draw comes from a fresh private
        generator (see the module docstring)."""
        if self._sum is None:
            raise InvalidSpecError("site-level DP round with no update")
        if generator is None:
            generator = noise.private_torch_generator()
        std = self.sum_noise_multiplier * self.clip_norm
        out = {}
        for k, acc in self._sum.items():
            draw = torch.normal(0.0, std, size=acc.shape, dtype=torch.float64, generator=generator)
            out[k] = ((acc + draw) / self.denominator).to(torch.float32)
        next_clip = self.clip_norm
        if spec.adaptive and self.count_sigma is not None:
            noisy = self.count_statistic + float(
                torch.normal(
                    0.0, self.count_sigma, size=(1,), dtype=torch.float64, generator=generator
                )
            )
            frac = noisy / self.denominator + 0.5
            next_clip = self.clip_norm * math.exp(
                -spec.clip_learning_rate * (frac - spec.target_quantile)
            )
        return out, next_clip


def round_for(spec: SiteDPSpec, *, clip_norm: float, num_sites: int) -> SiteDPRound:
    count_sigma = None
    if spec.adaptive:
        count_sigma = spec.count_noise_multiplier or num_sites / 20.0
    return SiteDPRound(
        clip_norm=clip_norm,
        noise_multiplier=spec.noise_multiplier,
        sum_noise_multiplier=sum_noise_multiplier(spec.noise_multiplier, count_sigma),
        count_sigma=count_sigma,
        denominator=num_sites,
    )


def site_level_events(spec: SiteDPSpec, rounds: int) -> list[DpEvent]:
    """Every selected site takes part in every round: q = 1, one Gaussian per round."""
    return (
        [DpEvent(noise_multiplier=spec.noise_multiplier, sample_rate=1.0, steps=rounds)]
        if rounds
        else []
    )


class SiteDPAggregation:
    """One round of DP-FedAvg as a round's aggregation (``RoundAggregation``): the clipped,
    uniformly weighted sum plus noise; sets the next round's clip norm (``site_clip_norm``)."""

    keeps_updates = False

    def __init__(self, spec: SiteDPSpec, *, clip_norm: float, num_sites: int, round: int):
        self.spec = spec
        self.round = round
        self.dp_round = round_for(spec, clip_norm=clip_norm, num_sites=num_sites)

    def add(self, site_id: str, delta: StateLike, norm: float) -> None:
        self.dp_round.add(delta, norm)

    def finish(self, site_ids: Sequence[str]) -> Aggregated:
        mean, next_clip = self.dp_round.finish(self.spec)
        notes = []
        if self.spec.adaptive:
            notes.append(
                (
                    "info",
                    f"round {self.round}: site-level clip norm {self.dp_round.clip_norm:.4g} "
                    f"→ {next_clip:.4g}",
                )
            )
        return Aggregated(mean, notes, {"site_clip_norm": next_clip})
