"""DP-SGLD: the DP-SGD noise as Langevin noise, and the posterior ensemble it releases.

Stochastic gradient Langevin dynamics (Welling & Teh, ICML 2011) samples the tempered
posterior ``p(θ | D) ∝ exp(-U(θ) / T)``, ``U(θ) = Σ_i ℓ_i(θ) - log p(θ)``, by steps
``θ ← θ - ε ∇Û(θ) + N(0, 2εT I)``. A site's DP-SGD step with plain SGD is
``θ ← θ - (lr / E)(Σ_{i∈B} clip_C(∇ℓ_i) + N(0, σ²C² I))`` with ``E = qN`` the expected
batch: its drift is ``ε ∇Û`` with ``ε = lr / N`` (``∇Û = (N / E) Σ_B``, weight decay the
Gaussian prior) and it already carries Gaussian noise of variance ``v_dp = (lr σ C / E)²``
per coordinate. Langevin needs ``v_L = 2 ε T = 2 lr T / N``. So (Wang, Fienberg & Smola,
ICML 2015; Li, Chen, Wang & Carin, AISTATS 2019):

* ``v_dp = v_L``, i.e. ``lr = 2 T E² / (N σ² C²)``: the DP noise *is* the Langevin noise;
* ``v_dp < v_L`` (smaller lr): each step adds ``N(0, v_L - v_dp)`` from a private generator
  (:func:`extra_std`); more noise is post-processing, so the guarantee is unchanged;
* ``v_dp > v_L`` (larger lr): nothing can be taken away; the chain samples at temperature
  ``T_eff = T v_dp / v_L > T`` (:func:`effective_temperature`).

The clipped gradient equals the true one only for examples with ``‖∇ℓ_i‖ ≤ C``, so the
target is the posterior of the clipped loss. The privacy accounting is exactly DP-SGD's for
the same ``(q, σ, steps)``: the Langevin steps *are* those DP-SGD steps.

Federated: with equal-sized sites and one local step per round, FedAvg of the sites' steps is
one Langevin step on the pooled posterior (drift ``lr/N_total ∇U``, noise variance
``v_L(N_s) / S = 2 lr T / N_total``); several local steps approximate it (federated averaging
Langevin dynamics, Plassier, Moulines et al., 2021). The orchestrator keeps the global models
of ``samples`` rounds after ``burn_in`` (:func:`sample_rounds`); the released model is
their ensemble (:class:`PosteriorEnsemble`, probabilities averaged).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from common.dp import noise


def langevin_variance(*, lr: float, temperature: float, num_examples: int) -> float:
    """``v_L = 2 lr T / N``: the per-coordinate noise variance a Langevin step needs."""
    return 2.0 * lr * temperature / max(1, num_examples)


def dp_variance(
    *, lr: float, noise_multiplier: float, max_grad_norm: float, expected: float
) -> float:
    """``v_dp = (lr σ C / E)²``: the per-coordinate variance the DP noise puts on θ."""
    return (lr * noise_multiplier * max_grad_norm / expected) ** 2


def extra_std(
    *,
    lr: float,
    temperature: float,
    noise_multiplier: float,
    max_grad_norm: float,
    expected: float,
    num_examples: int,
) -> float:
    """Std of the noise each step adds on top of the DP noise (0 when that is enough)."""
    v_l = langevin_variance(lr=lr, temperature=temperature, num_examples=num_examples)
    v_dp = dp_variance(
        lr=lr, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, expected=expected
    )
    return math.sqrt(max(0.0, v_l - v_dp))


def effective_temperature(
    *,
    lr: float,
    temperature: float,
    noise_multiplier: float,
    max_grad_norm: float,
    expected: float,
    num_examples: int,
) -> float:
    """The temperature the chain samples at: ``T``, or ``T v_dp / v_L`` when the DP noise
    exceeds the Langevin noise."""
    v_l = langevin_variance(lr=lr, temperature=temperature, num_examples=num_examples)
    v_dp = dp_variance(
        lr=lr, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, expected=expected
    )
    return temperature * max(1.0, v_dp / v_l)


def bound_noise_multiplier(
    *,
    name: str,
    lr: float,
    temperature: float,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    num_examples: int,
) -> float:
    """The σ whose DP noise alone has the variance of a step's total noise (DP + extra): the
    orchestrator bounds an honest SGLD update's norm with it. ``noise_multiplier`` unless
    ``name`` is ``"sgld"``."""
    if name != "sgld":
        return noise_multiplier
    expected = sample_rate * num_examples
    e = extra_std(
        lr=lr,
        temperature=temperature,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected=expected,
        num_examples=num_examples,
    )
    # extra noise e on θ is gradient-sum noise e·E/lr: σ_extra = e·E / (lr·C)
    sigma_extra = e * expected / (lr * max_grad_norm)
    return math.sqrt(noise_multiplier**2 + sigma_extra**2)


class LangevinSGD(torch.optim.SGD):
    """Plain SGD (no momentum) whose every step adds ``N(0, extra_std²)`` to each parameter,
    drawn by :mod:`common.dp.noise` from a private generator (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        *,
        lr: float,
        weight_decay: float,
        extra_std: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=weight_decay)
        self.extra_std = float(extra_std)
        self.generator = generator

    @torch.no_grad()
    def step(self, closure: object = None) -> None:  # type: ignore[override]
        super().step()
        if self.extra_std <= 0.0:
            return
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(
                    noise.gaussian_torch(
                        self.extra_std, p.shape, generator=self.generator, dtype=p.dtype
                    )
                )


def sample_rounds(*, rounds: int, burn_in: int, samples: int) -> tuple[int, ...]:
    """The rounds (1-based) whose global model is kept: ``samples`` rounds evenly spaced after
    ``burn_in``, the last round always among them."""
    after = rounds - burn_in
    if samples < 1 or after < samples:
        raise ValueError(f"{samples} sample(s) need {samples} rounds after the burn-in.")
    return tuple(burn_in + math.ceil((k + 1) * after / samples) for k in range(samples))


SAMPLE_PREFIX = "sample"
"""Weights of posterior sample ``k`` are stored under ``sample{k}.<state key>``."""


def pack_samples(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """One flat state dict holding every sample (``sample{k}.<key>``)."""
    return {
        f"{SAMPLE_PREFIX}{k}.{key}": v for k, state in enumerate(states) for key, v in state.items()
    }


def unpack_samples(state: Mapping[str, Tensor], count: int) -> list[dict[str, Tensor]]:
    """The inverse of :func:`pack_samples` (keys outside ``sample0..count-1`` are left out)."""
    out: list[dict[str, Tensor]] = [{} for _ in range(count)]
    for key, v in state.items():
        head, _, rest = key.partition(".")
        if head.startswith(SAMPLE_PREFIX) and head[len(SAMPLE_PREFIX) :].isdigit():
            k = int(head[len(SAMPLE_PREFIX) :])
            if k < count:
                out[k][rest] = v
    return out


class PosteriorEnsemble(nn.Module):
    """The average of the members' predicted probabilities, returned as its logarithm, so
    ``softmax(forward(x))`` is ``mean_k softmax(member_k(x))`` (and ``argmax`` picks the
    ensemble's most probable class)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("A posterior ensemble needs at least one sample.")
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        logps = torch.stack([torch.log_softmax(m(x), dim=1) for m in self.members])
        return torch.logsumexp(logps, dim=0) - math.log(len(self.members))
