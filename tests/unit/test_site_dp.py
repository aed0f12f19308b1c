"""Server-side DP-FedAvg: clipping bounds each site's influence; noise has the stated std."""

from __future__ import annotations

import math

import pytest
import torch

from common.errors import InvalidSpecError
from common.specs import SiteDPSpec
from orchestrator.training.site_dp import round_for, site_level_events, sum_noise_multiplier


def test_sum_noise_multiplier_follows_andrew_et_al_theorem_1() -> None:
    z, sb = 1.0, 2.0
    zd = sum_noise_multiplier(z, sb)
    # Releasing both must be exactly as private as one Gaussian with multiplier z.
    assert (zd**-2 + (2 * sb) ** -2) ** -0.5 == pytest.approx(z)
    assert zd > z
    assert sum_noise_multiplier(z, None) == z
    with pytest.raises(InvalidSpecError, match="count_noise_multiplier"):
        sum_noise_multiplier(1.0, 0.4)


def test_clipping_bounds_one_sites_contribution() -> None:
    spec = SiteDPSpec(noise_multiplier=0.01, clip_norm=1.0)
    r = round_for(spec, clip_norm=1.0, num_sites=2)
    big = {"w": torch.full((10,), 100.0)}
    small = {"w": torch.full((10,), 0.01)}
    assert r.add(big) == pytest.approx(100 * math.sqrt(10))
    r.add(small)
    mean, nxt = r.finish(spec, generator=torch.Generator().manual_seed(0))
    # The huge update contributes at most clip_norm to the sum (+ noise of std 0.01·1/2).
    assert float(mean["w"].norm()) <= (1.0 + 0.01 * math.sqrt(10)) / 2 + 0.1
    assert nxt == 1.0 and r.unclipped == 1


def test_noise_std_is_z_times_clip_over_denominator() -> None:
    spec = SiteDPSpec(noise_multiplier=2.0, clip_norm=3.0)
    r = round_for(spec, clip_norm=3.0, num_sites=4)
    r.add({"w": torch.zeros(200_000)})
    gen = torch.Generator().manual_seed(0)
    mean, _ = r.finish(spec, generator=gen)
    assert float(mean["w"].std()) == pytest.approx(2.0 * 3.0 / 4, rel=0.02)


def test_adaptive_clip_moves_towards_the_quantile() -> None:
    spec = SiteDPSpec(
        noise_multiplier=0.5,
        clip_norm=1.0,
        adaptive=True,
        count_noise_multiplier=1.0,
        clip_learning_rate=0.5,
        target_quantile=0.5,
    )
    grows = []
    for seed in range(200):
        r = round_for(spec, clip_norm=1.0, num_sites=2)
        r.add({"w": torch.full((4,), 10.0)})
        r.add({"w": torch.full((4,), 10.0)})
        _, nxt = r.finish(spec, generator=torch.Generator().manual_seed(seed))
        grows.append(math.log(nxt))
    # None unclipped: E[log S'/S] = -η(0 - γ) = 0.25 (the count noise has mean zero).
    assert sum(grows) / len(grows) == pytest.approx(0.25, abs=0.05)


def test_site_level_events() -> None:
    spec = SiteDPSpec(noise_multiplier=1.5, clip_norm=1.0)
    (ev,) = site_level_events(spec, 7)
    assert (ev.noise_multiplier, ev.sample_rate, ev.steps) == (1.5, 1.0, 7)


def _next_clip(updates: list[float], seed: int, num_sites: int) -> float:
    spec = SiteDPSpec(
        noise_multiplier=0.5,
        clip_norm=1.0,
        adaptive=True,
        count_noise_multiplier=1.0,
        clip_learning_rate=0.5,
        target_quantile=0.5,
    )
    r = round_for(spec, clip_norm=1.0, num_sites=num_sites)
    for norm in updates:
        r.add({"w": torch.full((4,), norm / 2.0)})  # L2 norm of 4 equal entries: 2·entry
    return r.finish(spec, generator=torch.Generator().manual_seed(seed))[1]


@pytest.mark.parametrize("extra", [0.1, 100.0])  # one more site, unclipped or clipped
def test_the_released_count_has_sensitivity_one_half(extra: float) -> None:
    """Issue 16.5: what is released (the noised count behind the next clip norm) moves by at
    most ½ when one site is added, as Andrew et al.'s Theorem 1 assumes; with the same noise
    draw, the difference is the statistic's."""
    eta, denominator = 0.5, 3
    for seed in range(5):
        before = _next_clip([100.0, 0.1], seed, denominator)
        after = _next_clip([100.0, 0.1, extra], seed, denominator)
        moved = denominator * abs(math.log(after / before)) / eta
        assert moved == pytest.approx(0.5, abs=1e-9)


def test_site_level_noise_ignores_the_global_generator() -> None:
    """Issue 16.6: a public torch.manual_seed (other job threads seed it to build models)
    neither predicts nor repeats the orchestrator's noise, and the noise does not draw on it."""
    spec = SiteDPSpec(
        noise_multiplier=1.0, clip_norm=1.0, adaptive=True, count_noise_multiplier=1.0
    )
    outs = []
    for _ in range(2):
        r = round_for(spec, clip_norm=1.0, num_sites=2)
        r.add({"w": torch.zeros(64)})
        torch.manual_seed(1234)
        state = torch.get_rng_state()
        mean, clip = r.finish(spec)
        assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched
        outs.append((mean["w"], clip))
    assert not torch.equal(outs[0][0], outs[1][0]) and outs[0][1] != outs[1][1]
