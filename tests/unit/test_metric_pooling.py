"""Pooled validation metrics (issue 15.7): the released vector's sensitivity on neighbouring
datasets, pooled estimates and standard errors against a Monte-Carlo of the noise, the
histogram AUC against scikit-learn, and when a job releases metrics."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from common.domain import Estimate, Metrics
from common.specs import LinearSpec, MetricsSpec, MLPSpec, ModelSpec
from common.training.models import build_model
from orchestrator.metric_pooling import (
    auc_estimate,
    auc_from_histograms,
    format_estimate,
    metrics_summary,
    pool_metrics,
    pooled_from_dict,
    pooled_to_dict,
    sensitivity,
)
from site_agent.trainer import EvalMetrics, evaluate, metrics_sensitivity, score_bins

BINARY = MLPSpec(kind="mlp", input_dim=6, num_classes=2, hidden=(8,))
MULTI = LinearSpec(kind="linear", input_dim=6, num_classes=4)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _released_vector(
    spec: ModelSpec, state: Any, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], bound: float
) -> np.ndarray[Any, Any]:
    m = evaluate(
        model_spec=spec,
        state=state,
        features=x,
        labels=y,
        loss_bound=bound,
        noise_multiplier=None,
        auc_bins=5,
    )
    return np.array([m.count_sum, m.correct_sum, m.loss_sum / bound, *m.score_histogram])


@pytest.mark.parametrize("spec", [BINARY, MULTI], ids=["binary", "multiclass"])
def test_sensitivity_on_neighbouring_datasets(spec: ModelSpec) -> None:
    rng = np.random.default_rng(0)
    state = build_model(spec, seed=1).state_dict()
    k = spec.num_classes
    assert k is not None
    x = rng.normal(size=(30, 6)).astype(np.float32)
    y = rng.integers(0, k, 30)
    bound = 0.05  # small: a correct prediction can still have a clipped loss at the bound
    delta = sensitivity(histogram=k == 2)
    assert metrics_sensitivity(histogram=k == 2) == delta
    base = _released_vector(spec, state, x, y, bound)
    candidates = [rng.normal(size=6) * s for s in (0.1, 1.0, 30.0)] + [
        np.full(6, v) for v in (1e38, -1e38, math.inf, -math.inf, math.nan)
    ]
    worst = 0.0
    for row in candidates:
        for label in range(k):
            xr = np.asarray(row, np.float32)[None, :]
            added = _released_vector(
                spec, state, np.concatenate([x, xr]), np.append(y, label), bound
            )
            replaced = _released_vector(
                spec, state, np.concatenate([x[1:], xr]), np.append(y[1:], label), bound
            )
            for other in (added, replaced):
                assert np.isfinite(other).all()
                d = np.abs(other - base)
                # each statistic's own sensitivity: count, correct, loss/B at most 1 each,
                # the histogram at most √2 in L2 (one cell out, one in)
                assert d[:3].max() <= 1 + 1e-9 and np.linalg.norm(d[3:]) <= 2**0.5 + 1e-9
                worst = max(worst, float(np.linalg.norm(other - base)))
    assert worst <= delta + 1e-9
    assert worst >= 0.9 * delta  # the bound is attained (up to the loss scaling)


def _site(
    count: float, correct: float, loss_sum: float, hist: np.ndarray[Any, Any], sigma: float
) -> Metrics:
    return Metrics(
        loss=0.0,
        accuracy=0.0,
        correct_sum=correct,
        loss_sum=loss_sum,
        num_examples=0,
        noise_multiplier=sigma,
        count_sum=count,
        score_histogram=tuple(float(v) for v in hist),
    )


def test_pooled_estimates_and_standard_errors_match_a_monte_carlo_of_the_noise() -> None:
    rng = np.random.default_rng(1)
    sigma, bound, bins, reps = 3.0, 4.0, 10, 4000
    # Three sites' true sums: counts, correct, loss, and score histograms per class.
    counts = np.array([400.0, 700.0, 300.0])
    correct = np.array([320.0, 560.0, 250.0])
    losses = np.array([0.45, 0.4, 0.5]) * counts
    neg = rng.multinomial(200, np.linspace(2, 0.2, bins) / np.linspace(2, 0.2, bins).sum(), 3)
    pos = rng.multinomial(200, np.linspace(0.2, 2, bins) / np.linspace(0.2, 2, bins).sum(), 3)
    std = sigma * sensitivity(histogram=True)
    true_acc = correct.sum() / counts.sum()
    true_loss = losses.sum() / counts.sum()
    true_auc = auc_from_histograms(neg.sum(0), pos.sum(0))
    draws, ses = [], []
    for _ in range(reps):
        sites = [
            _site(
                counts[k] + rng.normal(0, std),
                correct[k] + rng.normal(0, std),
                losses[k] + rng.normal(0, std * bound),
                np.concatenate([neg[k], pos[k]]) + rng.normal(0, std, 2 * bins),
                sigma,
            )
            for k in range(3)
        ]
        p = pool_metrics(sites, noise_multiplier=sigma, loss_bound=bound)
        assert p is not None and p.auc is not None and not p.exact and p.sites == 3
        draws.append((p.accuracy.value, p.loss.value, p.auc.value, p.num_examples.value))
        ses.append((p.accuracy.se, p.loss.se, p.auc.se, p.num_examples.se))
    d, s = np.array(draws), np.array(ses)
    for j, truth in enumerate((true_acc, true_loss, true_auc, counts.sum())):
        mc_sd = d[:, j].std(ddof=1)
        assert s[:, j].mean() == pytest.approx(mc_sd, rel=0.08), j
        assert abs(d[:, j].mean() - truth) < 0.1 * mc_sd + 5 * mc_sd / math.sqrt(reps), j
    assert s[:, 3].mean() == pytest.approx(math.sqrt(3) * std)


def test_exact_metrics_pool_without_error() -> None:
    sites = [
        Metrics(0.5, 0.75, 3.0, 2.0, 4, None, exact=True, count_sum=4.0),
        Metrics(0.2, 1.0, 6.0, 1.0, 6, None, exact=True, count_sum=6.0),
    ]
    p = pool_metrics(sites, noise_multiplier=10.0, loss_bound=5.0)
    assert p is not None and p.exact and p.noise_multiplier == 0.0
    assert p.accuracy == Estimate(0.9, 0.0) and p.loss == Estimate(0.3, 0.0)
    assert p.num_examples == Estimate(10.0, 0.0) and p.auc is None


def test_nothing_is_clamped_and_a_count_below_one_is_undefined() -> None:
    over = _site(10.0, 14.0, -3.0, np.zeros(0), 20.0)
    p = pool_metrics([over], noise_multiplier=20.0, loss_bound=5.0)
    assert p is not None and p.accuracy.value == pytest.approx(1.4)
    assert p.loss.value == pytest.approx(-0.3)
    assert "1.4" in format_estimate(p.accuracy)
    gone = pool_metrics(
        [_site(0.4, 3.0, 1.0, np.zeros(0), 20.0)], noise_multiplier=20.0, loss_bound=5.0
    )
    assert gone is not None and math.isnan(gone.accuracy.value) and gone.accuracy.se == math.inf
    assert "undefined" in format_estimate(gone.accuracy)
    assert pool_metrics([], noise_multiplier=1.0, loss_bound=1.0) is None


def test_histogram_auc_is_sklearns_within_the_histograms_resolution() -> None:
    rng = np.random.default_rng(2)
    for bins in (5, 20, 100):
        y = rng.integers(0, 2, 3000)
        scores = 1 / (1 + np.exp(-(rng.normal(size=3000) + 1.2 * y)))
        cells = score_bins(torch.from_numpy(scores), bins).numpy()
        neg = np.bincount(cells[y == 0], minlength=bins).astype(float)
        pos = np.bincount(cells[y == 1], minlength=bins).astype(float)
        tied = 0.5 * float((neg * pos).sum()) / (neg.sum() * pos.sum())
        got, want = auc_from_histograms(neg, pos), roc_auc_score(y, scores)
        assert abs(got - want) <= tied + 1e-12
        if bins == 100:
            assert abs(got - want) < 0.005


def test_the_sites_exact_histogram_gives_sklearns_auc_of_the_model() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=500) > 0).astype(np.int64)
    state = build_model(BINARY, seed=2).state_dict()
    with torch.no_grad():
        net = build_model(BINARY, seed=2)
        scores = torch.softmax(net(torch.from_numpy(x)).double(), 1)[:, 1].numpy()
    m = evaluate(
        model_spec=BINARY,
        state=state,
        features=x,
        labels=y,
        loss_bound=5.0,
        noise_multiplier=None,
        auc_bins=50,
    )
    assert len(m.score_histogram) == 100 and sum(m.score_histogram) == 500
    p = pool_metrics([m.released()], noise_multiplier=1.0, loss_bound=5.0)
    assert p is not None and p.auc is not None and p.auc.se == 0.0
    neg, pos = np.array(m.score_histogram[:50]), np.array(m.score_histogram[50:])
    tied = 0.5 * float((neg * pos).sum()) / (neg.sum() * pos.sum())
    assert abs(p.auc.value - roc_auc_score(y, scores)) <= tied + 1e-12


def test_auc_is_undefined_without_both_classes() -> None:
    e = auc_estimate(np.zeros(4), np.array([1.0, 2.0, 3.0, 4.0]), 1.0)
    assert math.isnan(e.value) and e.se == math.inf


def test_noised_multiclass_metrics_carry_no_histogram() -> None:
    m = evaluate(
        model_spec=MULTI,
        state=build_model(MULTI).state_dict(),
        features=np.zeros((5, 6), np.float32),
        labels=np.arange(5) % 4,
        loss_bound=5.0,
        noise_multiplier=2.0,
    )
    assert isinstance(m, EvalMetrics) and m.score_histogram == ()


def test_formatting_and_json_round_trip() -> None:
    assert format_estimate(Estimate(0.8123, 0.0312)) == "0.81 ± 0.03"
    assert format_estimate(Estimate(0.8123, 0.0042)) == "0.812 ± 0.004"
    assert format_estimate(Estimate(0.8, 0.0)) == "0.800"
    assert format_estimate(Estimate(432.94, 17.32)) == "433 ± 17"
    assert format_estimate(Estimate(-0.23, 0.32)) == "-0.23 ± 0.32"
    assert format_estimate(None) == "-"
    p = pool_metrics(
        [_site(100.0, 80.0, 40.0, np.arange(4.0), 2.0)], noise_multiplier=2.0, loss_bound=5.0
    )
    assert p is not None
    assert pooled_from_dict(pooled_to_dict(p)) == p
    assert metrics_summary(p).startswith("acc 0.80 ± ")
    assert "AUC" in metrics_summary(p)
    undefined = pool_metrics(
        [_site(0.0, 1.0, 1.0, np.zeros(0), 2.0)], noise_multiplier=2.0, loss_bound=5.0
    )
    assert undefined is not None
    back = pooled_from_dict(pooled_to_dict(undefined))
    assert math.isnan(back.accuracy.value) and back.accuracy.se == math.inf


@pytest.mark.parametrize(
    ("every", "rounds", "expected"),
    [(None, 5, [5]), (2, 5, [2, 4, 5]), (1, 3, [1, 2, 3]), (5, 5, [5]), (7, 5, [5])],
)
def test_which_rounds_release_metrics(every: int | None, rounds: int, expected: list[int]) -> None:
    spec = MetricsSpec(every=every)
    assert [r for r in range(1, rounds + 1) if spec.releases_at(r, rounds)] == expected
    assert spec.release_count(rounds) == len(expected)
    assert MetricsSpec(enabled=False, every=every).release_count(rounds) == 0


def test_a_sites_noised_binary_release_has_the_standard_errors_the_pool_states() -> None:
    # The site's own noise (σ·2 on every coordinate, histogram included) against the SEs
    # metric_pooling derives: the pooled AUC and accuracy scatter as stated around the
    # exact values.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4000, 6)).astype(np.float32)
    y = (x[:, 0] + 0.8 * rng.normal(size=4000) > 0).astype(np.int64)
    state = build_model(BINARY, seed=5).state_dict()
    kw: dict[str, Any] = {
        "model_spec": BINARY,
        "state": state,
        "features": x,
        "labels": y,
        "loss_bound": 5.0,
        "auc_bins": 10,
    }
    exact = pool_metrics(
        [evaluate(**kw, noise_multiplier=None).released()], noise_multiplier=1.0, loss_bound=5.0
    )
    assert exact is not None and exact.auc is not None
    sigma, reps = 8.0, 400
    draws, ses = [], []
    for _ in range(reps):
        m = evaluate(**kw, noise_multiplier=sigma).released()
        assert m.num_examples == 0 and len(m.score_histogram) == 20
        p = pool_metrics([m], noise_multiplier=sigma, loss_bound=5.0)
        assert p is not None and p.auc is not None
        draws.append((p.accuracy.value, p.auc.value))
        ses.append((p.accuracy.se, p.auc.se))
    d, s = np.array(draws), np.array(ses)
    for j, truth in enumerate((exact.accuracy.value, exact.auc.value)):
        assert s[:, j].mean() == pytest.approx(d[:, j].std(ddof=1), rel=0.15), j
        assert abs(d[:, j].mean() - truth) < 5 * d[:, j].std(ddof=1) / math.sqrt(reps), j


def test_an_assignment_that_knows_its_round_expects_metrics_only_when_released() -> None:
    from common.dp.events import DpEvent
    from common.specs import parse_job_spec
    from orchestrator.training.update_bounds import Assignment

    spec = parse_job_spec(
        {
            "dataset": "d",
            "model": {"kind": "linear", "input_dim": 4, "num_classes": 2},
            "rounds": 5,
            "local_steps": 2,
            "batch_size": 10,
            "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
            "metrics": {"every": 2},
        }
    )
    event = DpEvent(10.0, 1.0, 1)
    assert Assignment("s", 1.0, 100, 0, spec).metrics_event() == event  # round unknown
    expected = {1: None, 2: event, 3: None, 4: event, 5: event}
    for rnd, want in expected.items():
        assert Assignment("s", 1.0, 100, 0, spec, round=rnd).metrics_event() == want
