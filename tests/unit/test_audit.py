"""The one-run audit (Steinke, Nasr, Jagielski 2023): sound lower bounds, loud when violated."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from common.dp.audit import audit, epsilon_lower_bound, make_canaries, p_value


def test_p_value_without_delta_is_the_binomial_tail() -> None:
    for eps in (0.0, 0.5, 2.0):
        q = 1 / (1 + math.exp(-eps))
        assert p_value(m=100, r=20, v=15, epsilon=eps, delta=0.0) == pytest.approx(
            stats.binom.sf(14, 20, q)
        )
    # δ only makes the null hypothesis easier to keep (larger p-value)
    assert p_value(m=100, r=20, v=15, epsilon=1.0, delta=1e-3) > p_value(
        m=100, r=20, v=15, epsilon=1.0, delta=0.0
    )


def test_lower_bound_of_perfect_guesses_matches_closed_form() -> None:
    # all r correct, δ=0: the bound solves q^r = α, i.e. ε = log(q / (1 - q))
    r, alpha = 40, 0.05
    q = alpha ** (1 / r)
    eps = epsilon_lower_bound(m=400, r=r, v=r, delta=0.0, significance=alpha)
    assert eps == pytest.approx(math.log(q / (1 - q)), abs=1e-6)


def test_chance_level_guessing_certifies_nothing() -> None:
    assert epsilon_lower_bound(m=1000, r=200, v=100, delta=1e-5) == 0.0


def test_the_bound_is_sound_for_a_truly_private_mechanism() -> None:
    # Randomized response with ε=1 on each canary is exactly 1-DP; over many trials the
    # reported lower bound must exceed 1 in at most ~5% of them (the significance level).
    rng = np.random.default_rng(0)
    eps_true, m, over = 1.0, 1000, 0
    trials = 80
    for _ in range(trials):
        inc = rng.random(m) < 0.5
        keep = rng.random(m) < math.exp(eps_true) / (1 + math.exp(eps_true))
        seen = np.where(keep, inc, ~inc)
        losses = np.where(seen, 0.0, 1.0) + rng.random(m) * 1e-3
        over += audit(losses, inc, delta=0.0).epsilon_lower_bound > eps_true
    assert over <= 0.05 * trials + 3


def test_perfect_memorisation_is_caught() -> None:
    rng = np.random.default_rng(1)
    inc = rng.random(500) < 0.5
    losses = np.where(inc, 0.01, 3.0) + rng.random(500) * 1e-3
    res = audit(losses, inc, delta=1e-5)
    assert res.epsilon_lower_bound > 2.0  # any claim below this would fail the release
    assert res.tpr_at_fpr["0.01"] == 1.0 and res.auc == pytest.approx(1.0)


def test_canaries_cover_the_box_and_half_are_included() -> None:
    rng = np.random.default_rng(2)
    x, y, inc = make_canaries(
        num=2000, lows=np.zeros(3), highs=np.full(3, 2.0), num_classes=4, rng=rng
    )
    assert x.shape == (2000, 3) and x.min() >= 0 and x.max() <= 2
    assert set(np.unique(y)) == {0, 1, 2, 3}
    assert abs(inc.mean() - 0.5) < 0.05
