"""DP-SGLD: the DP-SGD noise as Langevin noise, and the posterior ensemble it releases.

A DP-SGD step with plain SGD already carries Gaussian noise; :func:`extra_std` is what a step
must add (from a private generator, :class:`LangevinSGD`) to reach the Langevin variance of the
tempered posterior, :func:`effective_temperature` the temperature sampled when it already has
more. The privacy accounting is exactly DP-SGD's for the same ``(q, σ, steps)``: extra noise is
post-processing. The orchestrator keeps the global models of :func:`sample_rounds` and
releases their :class:`PosteriorEnsemble`. Derivation and sources: ``docs/training.md``,
"DP-SGLD".
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
