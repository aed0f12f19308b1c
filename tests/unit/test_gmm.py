"""Federated DP Gaussian mixtures: maths and EM state machines (common.clustering), site
(site_agent.gmm_stats).

Sites are simulated by calling the site functions directly on uneven splits of synthetic
mixtures; every request and result goes through ``json.dumps``/``loads`` as on the wire.
scikit-learn serves as the independent reference for the E- and M-steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from sklearn.mixture import GaussianMixture
from sklearn.mixture._gaussian_mixture import (
    _compute_precision_cholesky,
    _estimate_gaussian_parameters,
)

from common.clustering.bootstrap import (
    MixtureStandardErrors,
    ReplicateStats,
    blb_variance,
    bootstrap_sensitivity,
    bootstrap_weight_norm,
    bootstrap_weights,
    capped_poisson_moments,
    noise_replicate_stats,
    replicate_stats,
)
from common.clustering.federated_bootstrap import FederatedBootstrap
from common.clustering.federated_em import FederatedBIC, FederatedEM
from common.clustering.initialisation import candidate_sensitivity, candidate_stats
from common.clustering.merge import merge_mixtures
from common.clustering.model import FeatureBox, GaussianMixtureParams
from common.clustering.release import (
    LOGLIK_SENSITIVITY,
    loglik_noise_sd,
    noise_stats,
    release_vector,
    scaled_loglik_sum,
    stats_sensitivity,
)
from common.clustering.released import ReleasedMixture, load_mixture
from common.clustering.selection import noise_loglik_loss, select_k_by_bic
from common.clustering.statistics import SufficientStats, expected_stats, loglik_clip_range, m_step
from common.dp.accounting import compute_epsilon
from common.dp.events import DpEvent
from common.errors import InvalidSpecError, InvalidUpdateError
from common.specs import GmmJobSpec, parse_any_job_spec
from site_agent.config import DatasetConfig
from site_agent.data.loading import iter_typed_chunks
from site_agent.gmm_stats import (
    answer_request,
    compute_replicate_stats,
    compute_stats,
    noisy_replicate_stats,
    noisy_stats,
    request_cost,
)

DELTA = 1e-5
MEANS_5D = np.array(
    [[-5.0, -5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 3.0, -3.0, 0.0], [5.0, -2.0, -3.0, 3.0, 2.0]]
)
SCALES = np.array([1.0, 0.7, 1.2])
WEIGHTS = np.array([0.3, 0.3, 0.4])


def _mixture(D: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n rows of three well-separated isotropic Gaussians in D ≤ 5 dimensions."""
    rng = np.random.default_rng(seed)
    means = MEANS_5D[:, :D]
    labels = rng.choice(3, size=n, p=WEIGHTS)
    X = means[labels] + rng.normal(size=(n, D)) * SCALES[labels][:, None]
    return X, labels, means


def _split(X: np.ndarray, fractions: Sequence[float]) -> list[np.ndarray]:
    cuts = (np.cumsum(fractions)[:-1] * len(X)).astype(int)
    return np.split(X, cuts)


def _chunks(X: np.ndarray, rows: int) -> Iterator[np.ndarray]:
    for i in range(0, len(X), rows):
        yield X[i : i + rows]


def _wire(obj: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(obj))
    return out


def _run(
    job: FederatedEM | FederatedBIC, sites: Sequence[np.ndarray], seed: int
) -> list[list[DpEvent]]:
    """Drive a job to the end; return the events each site charged."""
    rng = np.random.default_rng(seed)
    charged: list[list[DpEvent]] = [[] for _ in sites]
    request: dict[str, Any] | None = _wire(job.initial_request())
    while request is not None:
        results = []
        for i, X in enumerate(sites):
            cost = request_cost(request)
            result, event = answer_request(request, _chunks(X, 3_000), rng=rng)
            assert event == cost
            charged[i].append(event)
            results.append(_wire(result))
        nxt = job.absorb(results)
        request = None if nxt is None else _wire(nxt)
    return charged


def _matched_error(fitted: np.ndarray, true: np.ndarray) -> float:
    cost = np.linalg.norm(fitted[:, None, :] - true[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].max())


def _set_sklearn(params: GaussianMixtureParams) -> GaussianMixture:
    gm = GaussianMixture(params.n_components, covariance_type=params.covariance_type)
    gm.weights_ = np.array(params.weights)
    gm.means_ = np.array(params.means)
    gm.covariances_ = np.array(params.covariances)
    gm.precisions_cholesky_ = _compute_precision_cholesky(gm.covariances_, params.covariance_type)
    return gm


def _random_params(
    rng: np.random.Generator, K: int, D: int, ctype: str, scale: float = 1.0
) -> GaussianMixtureParams:
    w = rng.dirichlet(np.ones(K))
    means = rng.uniform(-scale, scale, size=(K, D))
    if ctype == "full":
        A = rng.normal(size=(K, D, D)) * 0.3 * scale
        covs = A @ np.swapaxes(A, 1, 2) + 0.05 * scale**2 * np.eye(D)
    else:
        covs = rng.uniform(0.05, 0.5, size=(K, D)) * scale**2
    return GaussianMixtureParams(w, means, covs, ctype)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- federated EM


@pytest.mark.parametrize(
    ("D", "covariance_type", "fractions"),
    [
        (2, "full", (0.1, 0.2, 0.3, 0.4)),
        (5, "full", (0.05, 0.15, 0.2, 0.25, 0.35)),
        (5, "diag", (0.2, 0.3, 0.5)),
    ],
)
def test_federated_dp_em_recovers_means(
    D: int, covariance_type: str, fractions: tuple[float, ...]
) -> None:
    X, _, means = _mixture(D, 40_000, seed=D)
    sites = _split(X, fractions)
    job = FederatedEM(
        K=3,
        covariance_type=covariance_type,
        bounds=np.tile([-10.0, 10.0], (D, 1)),
        max_rounds=8,
        tol=1e-3,
        noise_multiplier=4.0,
        seed=11,
    )
    charged = _run(job, sites, seed=12)
    assert job.finished and job.stop_reason in ("converged", "max_rounds")
    # Privacy: every site was charged exactly the job's events, within the planned worst case.
    eps = compute_epsilon(job.privacy_events, delta=DELTA).epsilon
    planned = compute_epsilon(job.planned_events(), delta=DELTA).epsilon
    assert all(compute_epsilon(c, delta=DELTA).epsilon == pytest.approx(eps) for c in charged)
    assert eps <= planned < 4.5  # moderate ε: at most 1 + 8 Gaussian releases at σ = 4
    fitted = job.result()
    assert _matched_error(fitted.means, means) < 0.15  # data units; component sd 0.7-1.2
    assert np.sort(fitted.weights) == pytest.approx(np.sort(WEIGHTS), abs=0.02)
    assert len(job.history) == len(job.history_sd) == len(job.privacy_events) - 1


def test_bic_chooses_the_true_k_at_moderate_epsilon() -> None:
    X, _, _ = _mixture(2, 30_000, seed=3)
    sites = _split(X, (0.15, 0.35, 0.5))
    job = FederatedBIC(
        k_values=range(1, 6),
        covariance_type="full",
        bounds=np.tile([-10.0, 10.0], (2, 1)),
        max_rounds=6,
        tol=1e-3,
        noise_multiplier=8.0,
        seed=5,
    )
    _run(job, sites, seed=6)
    eps = compute_epsilon(job.privacy_events, delta=DELTA).epsilon
    assert eps < 3.0  # 1 init + ≤ 6 rounds x 5 K + 1 eval x 5 K at σ = 8
    assert job.chosen_k == 3
    curve = job.bic_curve
    assert set(curve) == {1, 2, 3, 4, 5}
    assert curve[1] > curve[2] > curve[3]  # under-fitting costs far more than the noise
    assert job.result().n_components == 3
    assert job.planned_events()[1].steps == 6 * 5 + 5


def test_select_k_by_bic_exact_and_noisy() -> None:
    rng = np.random.default_rng(0)
    fits = {
        K: (_random_params(rng, K, 2, "full"), ll, 1000.0)
        for K, ll in [(1, -900.0), (2, -400.0), (3, -395.0)]
    }
    # Exact: BIC = -2 ll + p log n; K = 2 gains 500 nats for 6 parameters, K = 3 only 5.
    assert select_k_by_bic(fits) == 2
    # A large noise sd makes K = 1 indistinguishable from the rest.
    assert select_k_by_bic(fits, loglik_sd=1000.0) == 1


# --------------------------------------------------------------------------- E- and M-steps


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_m_step_matches_sklearn_on_the_same_responsibilities(covariance_type: str) -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))
    resp = rng.dirichlet(np.ones(3), size=500)
    s2 = np.einsum("nk,nd,ne->kde", resp, X, X) if covariance_type == "full" else resp.T @ (X * X)
    stats = SufficientStats(resp.sum(axis=0), resp.T @ X, s2, 0.0)
    ours = m_step(stats, covariance_type=covariance_type, min_variance=1e-12)
    nk, means, covs = _estimate_gaussian_parameters(X, resp, 0.0, covariance_type)
    np.testing.assert_allclose(ours.weights, nk / len(X), rtol=1e-12)
    np.testing.assert_allclose(ours.means, means, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours.covariances, covs, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_e_step_and_prediction_match_sklearn(covariance_type: str) -> None:
    rng = np.random.default_rng(2)
    params = _random_params(rng, 3, 3, covariance_type)
    X = rng.normal(size=(300, 3))
    gm = _set_sklearn(params)
    np.testing.assert_allclose(params.log_likelihood(X), gm.score_samples(X), rtol=1e-10)
    np.testing.assert_allclose(params.predict_proba(X), gm.predict_proba(X), atol=1e-10)
    np.testing.assert_array_equal(params.predict(X), gm.predict(X))
    stats = expected_stats(X, params)
    resp = gm.predict_proba(X)
    np.testing.assert_allclose(stats.nk, resp.sum(axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats.s1, resp.T @ X, rtol=1e-9, atol=1e-12)
    assert stats.loglik == pytest.approx(gm.score(X) * len(X), rel=1e-10)


def test_predict_assigns_rows_to_their_components() -> None:
    X, labels, means = _mixture(2, 3_000, seed=4)
    covs = np.stack([np.eye(2) * s**2 for s in SCALES])
    params = GaussianMixtureParams(WEIGHTS, means, covs, "full")
    assert np.mean(params.predict(X) == labels) > 0.995
    proba = params.predict_proba(X)
    assert proba.shape == (3_000, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_m_step_repairs_noisy_statistics() -> None:
    """Negative masses and indefinite second moments still give a valid mixture."""
    K, D = 3, 3
    nk = np.array([500.0, -20.0, 0.0])
    s1 = np.array([[100.0, -50.0, 20.0], [3.0, 1.0, -2.0], [0.5, 0.5, 0.5]])
    s2 = np.stack([np.diag([-5.0, 1.0, 2.0]), -np.eye(D), np.zeros((D, D))])
    stats = SufficientStats(nk, s1, s2, 0.0)
    params = m_step(stats, min_variance=1e-3, min_count=10.0, bound=1.0, noise_sd=10.0)
    assert params.weights.sum() == pytest.approx(1.0) and np.all(params.weights > 0)
    assert np.all(np.abs(params.means) <= 1.0)
    eig = np.linalg.eigvalsh(params.covariances)
    assert np.all(eig >= 1e-3 - 1e-12) and np.all(eig <= D + 1e-9)
    # The noise-aware floor: √D · noise_sd / N_k (N_k floored at min_count).
    assert eig[1].min() == pytest.approx(math.sqrt(D) * 10.0 / 10.0)
    assert params.n_components == K


def test_feature_box_maps_models_and_likelihoods() -> None:
    rng = np.random.default_rng(5)
    box = FeatureBox(np.array([[-3.0, 5.0], [10.0, 30.0], [0.0, 1.0]]))
    params = _random_params(rng, 2, 3, "full")
    back = box.params_from_unit(box.params_to_unit(params))
    np.testing.assert_allclose(back.means, params.means, atol=1e-12)
    np.testing.assert_allclose(back.covariances, params.covariances, atol=1e-12)
    X = box.from_unit(rng.uniform(-1, 1, size=(50, 3)))
    unit_ll = box.params_to_unit(params).log_likelihood(box.to_unit(X))
    np.testing.assert_allclose(unit_ll - box.log_jacobian, params.log_likelihood(X))
    assert np.all(np.abs(box.to_unit(X * 100.0)) <= 1.0)  # clipping


def test_serialisation_round_trips_through_json() -> None:
    rng = np.random.default_rng(6)
    for ctype in ("full", "diag"):
        p = _random_params(rng, 3, 4, ctype)
        q = GaussianMixtureParams.from_dict(_wire(p.to_dict()))
        np.testing.assert_array_equal(q.covariances, p.covariances)
        stats = expected_stats(rng.normal(size=(20, 4)), p, loglik_range=(-50.0, 5.0))
        back = SufficientStats.from_dict(_wire(stats.to_dict()))
        np.testing.assert_array_equal(back.s2, stats.s2)
        assert back.loglik_range == stats.loglik_range
    with pytest.raises(ValueError, match="weights must sum to 1"):
        GaussianMixtureParams.from_dict({**p.to_dict(), "weights": [0.5, 0.5, 0.5]})


# --------------------------------------------------------------------------- DP mechanics


@settings(max_examples=60, deadline=None)
@given(
    D=st.integers(1, 6),
    K=st.integers(1, 5),
    full=st.booleans(),
    weight=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_one_row_moves_the_release_by_at_most_the_sensitivity(
    D: int, K: int, full: bool, weight: float, seed: int
) -> None:
    """Add/remove one row: the release vector moves by that row's own contribution."""
    rng = np.random.default_rng(seed)
    ctype = "full" if full else "diag"
    params = _random_params(rng, K, D, ctype, scale=rng.uniform(0.01, 1.0))
    rows = np.vstack([rng.uniform(-1, 1, size=(3, D)), rng.choice([-1.0, 1.0], size=(3, D))])
    rng_ll = loglik_clip_range(params)
    delta = stats_sensitivity(D, K, ctype, loglik_weight=weight)
    for z in rows:
        one = expected_stats(z[None, :], params, loglik_range=rng_ll)
        assert np.linalg.norm(release_vector(one, loglik_weight=weight)) <= delta * (1 + 1e-12)
    cand = rng.uniform(-1, 1, size=(7, D))
    for z in rows:
        c = candidate_stats(z[None, :], cand)
        moved = math.hypot(np.linalg.norm(c.counts), np.linalg.norm(c.sums))
        assert moved <= candidate_sensitivity(D) * (1 + 1e-12)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_sensitivity_is_attained(covariance_type: str) -> None:
    """A corner row with a one-hot responsibility and an extreme log-likelihood hits Δ."""
    D, K = 4, 3
    corner = np.ones(D)
    tight = np.eye(D) * 1e-3 if covariance_type == "full" else np.full(D, 1e-3)
    params = GaussianMixtureParams(
        np.array([0.98, 0.01, 0.01]),
        np.stack([corner, -corner, -corner]),
        np.stack([tight] * K),
        covariance_type,  # type: ignore[arg-type]
    )
    lo, hi = loglik_clip_range(params)
    stats = expected_stats(corner[None, :], params, loglik_range=(lo, hi))
    # The corner sits on component 0's peak: log p = ℓ_hi + log 0.98, near the top of the
    # range; shift the range so it is exactly the top.
    ll = float(params.log_likelihood(corner[None, :])[0])
    stats = SufficientStats(stats.nk, stats.s1, stats.s2, ll, (ll - 10.0, ll))
    np.testing.assert_allclose(stats.nk, [1.0, 0.0, 0.0], atol=1e-12)
    norm = np.linalg.norm(release_vector(stats))
    assert norm == pytest.approx(stats_sensitivity(D, K, covariance_type), rel=1e-9)


def test_noise_std_is_sigma_times_delta() -> None:
    D, K, sigma, trials = 3, 2, 2.5, 4_000
    delta = stats_sensitivity(D, K, "full")
    assert delta == pytest.approx(math.sqrt(1 + D + D * (D + 1) / 2 + 1))
    assert stats_sensitivity(D, K, "diag") == pytest.approx(math.sqrt(1 + D + D + 1))
    lo, hi = -20.0, 4.0
    base = SufficientStats(np.zeros(K), np.zeros((K, D)), np.zeros((K, D, D)), 0.0, (lo, hi))
    rng = np.random.default_rng(7)
    draws = [
        noise_stats(base, noise_multiplier=sigma, sensitivity=delta, rng=rng) for _ in range(trials)
    ]
    nk = np.array([d.nk for d in draws])
    s1 = np.array([d.s1 for d in draws])
    s2 = np.array([d.s2 for d in draws])
    ll = np.array([d.loglik for d in draws])
    target = sigma * delta
    tol = 4 * target / math.sqrt(2 * trials)  # 4 standard errors of a standard deviation
    for arr in (nk, s1, s2[:, :, 0, 1], s2[:, :, 2, 2]):
        assert np.abs(arr.std(axis=0) - target).max() < tol
    np.testing.assert_array_equal(s2, np.swapaxes(s2, 2, 3))  # noise mirrored: symmetric
    expected_ll = loglik_noise_sd(
        noise_multiplier=sigma, sensitivity=delta, loglik_range=(lo, hi), n_components=K
    )
    assert ll.std() == pytest.approx(expected_ll, rel=0.06)


def test_site_noise_and_event() -> None:
    X, _, means = _mixture(2, 2_000, seed=8)
    bounds = np.tile([-10.0, 10.0], (2, 1))
    params = GaussianMixtureParams(WEIGHTS, means, np.stack([np.eye(2)] * 3), "full")
    exact = compute_stats([X], params, bounds=bounds)
    sigma, trials = 3.0, 400
    rng = np.random.default_rng(9)
    diffs = []
    for _ in range(trials):
        noisy, event = noisy_stats([X], params, bounds=bounds, noise_multiplier=sigma, rng=rng)
        assert event == DpEvent(sigma, 1.0, 1)
        diffs.append(noisy.s1 - exact.s1)
    target = sigma * stats_sensitivity(2, 3, "full")
    assert np.std(diffs) == pytest.approx(target, rel=0.05)


def test_streaming_chunks_give_the_same_statistics(tmp_path: Path) -> None:
    X, _, means = _mixture(3, 5_000, seed=10)
    bounds = np.tile([-6.0, 6.0], (3, 1))  # some values are clipped
    params = GaussianMixtureParams(WEIGHTS, means, np.stack([np.eye(3) * 2.0] * 3), "full")
    whole = compute_stats([X], params, bounds=bounds)
    for rows in (1, 7, 999, 5_000):
        if rows == 1:
            X_small = X[:300]
            a = compute_stats(_chunks(X_small, 1), params, bounds=bounds)
            b = compute_stats([X_small], params, bounds=bounds)
        else:
            a, b = compute_stats(_chunks(X, rows), params, bounds=bounds), whole
        np.testing.assert_allclose(a.nk, b.nk, rtol=1e-10)
        np.testing.assert_allclose(a.s1, b.s1, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(a.s2, b.s2, rtol=1e-10, atol=1e-9)
        assert a.loglik == pytest.approx(b.loglik, rel=1e-10)
    # The same through a CSV file read in chunks (columns reordered on purpose).
    path = tmp_path / "rows.csv"
    header = "id,c,a,b\n"
    body = "".join(
        f"{i},{float(r[2])!r},{float(r[0])!r},{float(r[1])!r}\n" for i, r in enumerate(X)
    )
    path.write_text(header + body)
    cfg = DatasetConfig(name="rows", path=path, label="id", chunk_rows=777)
    chunks = (
        np.stack([part.table.columns[c] for c in ("a", "b", "c")], axis=1)
        for part in iter_typed_chunks(cfg, ["a", "b", "c"])
    )
    from_csv = compute_stats(chunks, params, bounds=bounds)
    np.testing.assert_allclose(from_csv.s2, whole.s2, rtol=1e-10, atol=1e-9)
    with pytest.raises(InvalidSpecError, match="'zzz' is not in the header"):
        next(iter_typed_chunks(cfg, ["a", "zzz"]))


def test_noise_loss_prediction_matches_simulation() -> None:
    """The model-noise term used for K selection predicts the actual likelihood loss."""
    X, _, means = _mixture(2, 20_000, seed=13)
    box = FeatureBox(np.tile([-10.0, 10.0], (2, 1)))
    Z = box.to_unit(X)
    truth = box.params_to_unit(
        GaussianMixtureParams(WEIGHTS, means, np.stack([np.eye(2) * s**2 for s in SCALES]))
    )
    stats = expected_stats(Z, truth, loglik_range=loglik_clip_range(truth))
    best = m_step(stats, min_variance=1e-6)
    # τ = noise_sd / N_k is about a tenth of the smallest variance: the second-order regime.
    noise_sd, rng = 3.0, np.random.default_rng(14)
    losses = []
    for _ in range(60):
        noisy = noise_stats(stats, noise_multiplier=1.0, sensitivity=noise_sd, rng=rng)
        fit = m_step(noisy, min_variance=1e-6)
        losses.append(best.log_likelihood(Z).sum() - fit.log_likelihood(Z).sum())
    mean, sd = noise_loglik_loss(best, n=len(Z), noise_sd=noise_sd)
    assert np.mean(losses) == pytest.approx(mean, rel=0.25)
    assert np.std(losses) == pytest.approx(sd, rel=0.35)


# --------------------------------------------------------------------------- protocol


def test_requests_are_validated_and_results_checked() -> None:
    X, _, _ = _mixture(2, 3_000, seed=15)
    job = FederatedEM(
        K=2,
        covariance_type="diag",
        bounds=np.tile([-10.0, 10.0], (2, 1)),
        max_rounds=2,
        tol=0.0,
        noise_multiplier=5.0,
        seed=1,
    )
    request = _wire(job.initial_request())
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidSpecError):
        request_cost({**request, "sensitivity": 0.001})  # extra keys are refused
    with pytest.raises(InvalidSpecError):
        answer_request({**request, "bounds": [[-1.0, 1.0]]}, [X], rng=rng)
    init, _ = answer_request(request, [X], rng=rng)
    em = _wire(job.absorb([init]) or {})
    assert em["kind"] == "gmm.em" and em["round"] == 1
    with pytest.raises(InvalidUpdateError):
        job.absorb([init])  # an init answer to an EM request
    result, event = answer_request(em, [X], rng=rng)
    assert event == DpEvent(5.0, 1.0, 1)
    tampered = _wire(result)
    tampered["stats"]["K=2"]["loglik_range"] = [-1e9, 1e9]
    with pytest.raises(InvalidUpdateError, match="clipping range"):
        job.absorb([tampered])
    assert job.history == []  # nothing was committed
    nxt = job.absorb([result])
    assert nxt is not None and nxt["round"] == 2 and len(job.history) == 1


def test_site_answers_any_valid_model_without_failing() -> None:
    """A model under which some rows have zero density must not make the site fail: an
    error that depends on the rows would leak whether such a row exists."""
    X = np.array([[0.0, 0.0], [9.0, 9.0], [-9.0, 9.0]])
    extreme = GaussianMixtureParams(
        np.array([0.5, 0.5]),
        np.array([[0.0, 0.0], [0.1, 0.0]]),
        np.stack([np.eye(2) * 1e-308] * 2),  # densities underflow to exactly 0
        "full",
    )
    bounds = np.tile([-10.0, 10.0], (2, 1))
    stats = compute_stats([X], extreme, bounds=bounds)
    assert np.all(np.isfinite(stats.nk)) and stats.nk.sum() == pytest.approx(3.0)
    assert stats.loglik_range is not None and stats.loglik >= 3 * stats.loglik_range[0]
    request = {
        "protocol": "dpfed.gmm/1",
        "kind": "gmm.eval",
        "round": 1,
        "bounds": bounds.tolist(),
        "covariance_type": "full",
        "noise_multiplier": 1.0,
        "models": [{"key": "K=2", "params": extreme.to_dict()}],
    }
    result, event = answer_request(request, [X], rng=np.random.default_rng(0))
    assert math.isfinite(result["logliks"]["K=2"]) and event == DpEvent(1.0, 1.0, 1)


def test_eval_release_has_unit_sensitivity() -> None:
    rng = np.random.default_rng(16)
    params = _random_params(rng, 3, 2, "full", scale=0.3)
    rng_ll = loglik_clip_range(params)
    for z in np.vstack([rng.uniform(-1, 1, size=(20, 2)), [[1.0, 1.0]]]):
        assert abs(scaled_loglik_sum(z[None, :], params, loglik_range=rng_ll)) <= LOGLIK_SENSITIVITY


# --------------------------------------------------------------------------- merging, BLB


def test_merge_mixtures_recovers_components_from_local_fits() -> None:
    """Sites see different subsets of the clusters; their local fits merge to the truth."""
    X, labels, means = _mixture(2, 12_000, seed=17)
    site_clusters = [(0, 1), (1, 2), (0, 2), (0, 1, 2)]
    local, weights = [], []
    for i, clusters in enumerate(site_clusters):
        rows = X[np.isin(labels, clusters)][i::4]
        gm = GaussianMixture(len(clusters) + 1, random_state=i).fit(rows)
        local.append(GaussianMixtureParams(gm.weights_, gm.means_, gm.covariances_, "full"))
        weights.append(float(len(rows)))
    merged = merge_mixtures(local, weights, 3)
    assert _matched_error(merged.means, means) < 0.15
    order = linear_sum_assignment(np.linalg.norm(merged.means[:, None] - means[None], axis=2))[1]
    np.testing.assert_allclose(merged.weights, WEIGHTS[order], atol=0.05)
    true_var = SCALES[order] ** 2
    np.testing.assert_allclose(
        np.diagonal(merged.covariances, axis1=1, axis2=2).mean(axis=1), true_var, rtol=0.2
    )
    diag = merge_mixtures(
        [
            GaussianMixtureParams(
                p.weights, p.means, np.diagonal(p.covariances, axis1=1, axis2=2).copy(), "diag"
            )
            for p in local
        ],
        weights,
        3,
    )
    assert diag.covariance_type == "diag" and _matched_error(diag.means, means) < 0.15


def test_blb_variance_matches_the_sampling_variance_of_means() -> None:
    X, _, means = _mixture(2, 6_000, seed=18)
    params = GaussianMixtureParams(WEIGHTS, means, np.stack([np.eye(2) * s**2 for s in SCALES]))
    out = blb_variance(X, params, rng=np.random.default_rng(19), n_subsets=3, n_resamples=30)
    # Var(mean of component k) ≈ s_k² / N_k per coordinate.
    expected = (SCALES**2 / (WEIGHTS * len(X)))[:, None] * np.ones((3, 2))
    ratio = out.means / expected
    assert np.all((ratio > 0.5) & (ratio < 2.0)), ratio
    assert out.subset_size == math.ceil(6_000**0.7)


# --------------------------------------------------------------------------- DP bootstrap


def _release(reps: ReplicateStats) -> np.ndarray:
    """The released coordinates of every replicate (S2: upper triangle or diagonal)."""
    if reps.covariance_type == "full":
        r, c = np.triu_indices(reps.s1.shape[2])
        second = reps.s2[:, :, r, c]
    else:
        second = reps.s2
    return np.concatenate([reps.nk.ravel(), reps.s1.ravel(), second.ravel()])


def test_capped_poisson_moments_and_weight_norm() -> None:
    rng = np.random.default_rng(30)
    draws = np.minimum(rng.poisson(1.0, size=2_000_000), 4).astype(float)
    m1, var, m2, var2 = capped_poisson_moments(4)
    assert m1 == pytest.approx(draws.mean(), abs=2e-3)
    assert var == pytest.approx(draws.var(), abs=4e-3)
    assert m2 == pytest.approx(np.mean(draws**2), abs=5e-3)
    assert var2 == pytest.approx(np.var(draws**2), rel=0.01)
    assert 0.99 < m1 < 1.0 and 0.96 < var < 0.98  # capping at 4 barely moves Poisson(1)
    # C = min(c√R, √(R·E[w²] + 3√(R·Var[w²]))): the three-sigma bound, below c√R.
    C = bootstrap_weight_norm(20, 4)
    assert C == pytest.approx(math.sqrt(20 * m2 + 3 * math.sqrt(20 * var2)))
    assert C == pytest.approx(8.95, abs=0.01) and C < 4 * math.sqrt(20)
    assert bootstrap_weight_norm(5, 2) <= 2 * math.sqrt(5)
    assert bootstrap_weight_norm(2, 1) == pytest.approx(math.sqrt(2))  # {0,1}: c√R binds
    with pytest.raises(ValueError, match="replicates"):
        bootstrap_weight_norm(1, 4)


def test_bootstrap_weights_are_capped_and_norm_bounded() -> None:
    rng = np.random.default_rng(31)
    C = bootstrap_weight_norm(20, 4)
    w = bootstrap_weights(50_000, 20, weight_cap=4, weight_norm=C, rng=rng)
    assert w.shape == (50_000, 20) and w.min() >= 0.0 and w.max() <= 4.0
    norms = np.linalg.norm(w, axis=1)
    assert norms.max() <= C * (1 + 1e-12)
    clipped = np.mean(norms > C * (1 - 1e-9))
    assert 0.001 < clipped < 0.02  # the three-sigma bound rescales well under 2% of rows
    assert w.mean() == pytest.approx(1.0, abs=0.01)  # E[w] of the capped Poisson ≈ 0.996
    # weights are integers below the norm bound: capped Poisson counts, not rescaled
    small = w[norms < C * 0.999]
    np.testing.assert_array_equal(small, np.round(small))
    # a tighter stated bound rescales more rows, never leaving one above it
    tight = bootstrap_weights(1_000, 20, weight_cap=4, weight_norm=3.0, rng=rng)
    assert np.linalg.norm(tight, axis=1).max() <= 3.0 * (1 + 1e-12)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_bootstrap_sensitivity_formula_bound_and_attained(covariance_type: str) -> None:
    D, K, R, cap = 3, 3, 12, 4
    C = bootstrap_weight_norm(R, cap)
    delta = bootstrap_sensitivity(D, covariance_type, C)
    second = D * (D + 1) / 2 if covariance_type == "full" else D
    assert delta == pytest.approx(C * math.sqrt(1 + D + second))
    # Δ₀ is the EM sensitivity without the log-likelihood coordinate (w → 0).
    em = stats_sensitivity(D, K, covariance_type, loglik_weight=1.0)
    assert delta == pytest.approx(C * math.sqrt(em**2 - 1.0))
    rng = np.random.default_rng(32)
    params = _random_params(rng, K, D, covariance_type, scale=0.5)
    Z = rng.uniform(-1, 1, size=(200, D))
    W = bootstrap_weights(len(Z) + 1, R, weight_cap=cap, weight_norm=C, rng=rng)
    base = _release(replicate_stats(Z, params, W[:-1], covariance_type=covariance_type))
    for z in np.vstack([rng.uniform(-1, 1, size=(5, D)), rng.choice([-1.0, 1.0], size=(5, D))]):
        added = replicate_stats(np.vstack([Z, z]), params, W, covariance_type=covariance_type)
        assert np.linalg.norm(_release(added) - base) <= delta * (1 + 1e-9)
    # Attained: a corner row, one-hot responsibility, a weight vector of norm exactly C.
    corner = np.ones(D)
    tight = np.eye(D) * 1e-3 if covariance_type == "full" else np.full(D, 1e-3)
    peaked = GaussianMixtureParams(
        np.array([0.98, 0.01, 0.01]),
        np.stack([corner, -corner, -corner]),
        np.stack([tight] * K),
        covariance_type,  # type: ignore[arg-type]
    )
    w = np.full((1, R), C / math.sqrt(R))
    one = replicate_stats(corner[None, :], peaked, w, covariance_type=covariance_type)
    assert np.linalg.norm(_release(one)) == pytest.approx(delta, rel=1e-9)


def test_replicate_stats_match_weighted_e_steps_and_stream() -> None:
    X, _, means = _mixture(2, 3_000, seed=33)
    bounds = np.tile([-8.0, 8.0], (2, 1))
    params = GaussianMixtureParams(WEIGHTS, means, np.stack([np.eye(2)] * 3), "full")
    box = FeatureBox(bounds)
    Z, unit = box.to_unit(X), box.params_to_unit(params)
    W = bootstrap_weights(
        len(Z),
        4,
        weight_cap=4,
        weight_norm=bootstrap_weight_norm(4, 4),
        rng=np.random.default_rng(1),
    )
    reps = replicate_stats(Z, unit, W)
    for r in range(4):
        ref = expected_stats(Z, unit, sample_weight=W[:, r])
        np.testing.assert_allclose(reps.nk[r], ref.nk, rtol=1e-10)
        np.testing.assert_allclose(reps.s1[r], ref.s1, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(reps.s2[r], ref.s2, rtol=1e-10, atol=1e-10)
    # streaming: chunks draw their rows' weights in turn from the same generator
    whole = compute_replicate_stats(
        [X], params, bounds=bounds, replicates=4, weight_cap=4, weight_rng=np.random.default_rng(1)
    )
    parts = compute_replicate_stats(
        _chunks(X, 700),
        params,
        bounds=bounds,
        replicates=4,
        weight_cap=4,
        weight_rng=np.random.default_rng(1),
    )
    np.testing.assert_allclose(whole.s1, parts.s1, rtol=1e-9)
    np.testing.assert_allclose(whole.nk, reps.nk, rtol=1e-10)
    # without a weight generator the site draws from OS entropy: two runs differ
    a = compute_replicate_stats([X], params, bounds=bounds, replicates=4, weight_cap=4)
    b = compute_replicate_stats([X], params, bounds=bounds, replicates=4, weight_cap=4)
    assert not np.allclose(a.nk, b.nk)


def test_replicate_noise_scale_is_sigma_times_c_delta0() -> None:
    R, K, D, sigma, trials = 6, 2, 3, 1.5, 2_000
    delta = bootstrap_sensitivity(D, "full", bootstrap_weight_norm(R, 4))
    zero = ReplicateStats(np.zeros((R, K)), np.zeros((R, K, D)), np.zeros((R, K, D, D)))
    rng = np.random.default_rng(34)
    draws = [
        noise_replicate_stats(zero, noise_multiplier=sigma, sensitivity=delta, rng=rng)
        for _ in range(trials)
    ]
    target = sigma * delta
    tol = 4 * target / math.sqrt(2 * trials)
    nk = np.array([d.nk for d in draws])
    s1 = np.array([d.s1 for d in draws])
    s2 = np.array([d.s2 for d in draws])
    for arr in (nk, s1, s2[:, :, :, 0, 1], s2[:, :, :, 2, 2]):
        assert np.abs(arr.std(axis=0) - target).max() < tol
    np.testing.assert_array_equal(s2, np.swapaxes(s2, 3, 4))  # mirrored, not noised twice
    # the site's release: noise of exactly that scale around the exact replicates, one event
    X, _, means = _mixture(2, 1_500, seed=35)
    bounds = np.tile([-8.0, 8.0], (2, 1))
    params = GaussianMixtureParams(WEIGHTS, means, np.ones((3, 2)), "diag")
    diffs = []
    for t in range(200):
        exact = compute_replicate_stats(
            [X],
            params,
            bounds=bounds,
            replicates=R,
            weight_cap=4,
            weight_rng=np.random.default_rng(t),
        )
        noisy, event = noisy_replicate_stats(
            [X],
            params,
            bounds=bounds,
            replicates=R,
            weight_cap=4,
            noise_multiplier=sigma,
            rng=rng,
            weight_rng=np.random.default_rng(t),
        )
        assert event == DpEvent(sigma, 1.0, 1)
        diffs.append(noisy.s1 - exact.s1)
    expected = sigma * bootstrap_sensitivity(2, "diag", bootstrap_weight_norm(R, 4))
    assert np.std(diffs) == pytest.approx(expected, rel=0.05)


def _boot_fixture(
    n: int = 30_000,
) -> tuple[list[np.ndarray], GaussianMixtureParams, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(36)
    means = np.array([[-3.0, -3.0], [0.0, 3.0], [3.0, -2.0]])
    comp = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    X = means[comp] + rng.normal(0, 0.6, size=(n, 2))
    params = GaussianMixtureParams(
        np.bincount(comp) / n, means, np.stack([np.eye(2) * 0.36] * 3), "full"
    )
    return (
        _split(X, (0.5, 0.3, 0.2)),
        params,
        np.bincount(comp),
        means,
        np.tile([-6.0, 6.0], (2, 1)),
    )


def _bootstrap_se(
    sites: Sequence[np.ndarray],
    params: GaussianMixtureParams,
    bounds: np.ndarray,
    sigma: float,
    seed: int,
) -> tuple[Any, list[DpEvent]]:
    boot = FederatedBootstrap(
        params, bounds=bounds, replicates=30, weight_cap=4, noise_multiplier=sigma, round=12
    )
    rng = np.random.default_rng(seed)
    results, events = [], []
    for i, X in enumerate(sites):
        request = _wire(boot.request())
        cost = request_cost(request)
        result, event = answer_request(
            request, _chunks(X, 4_000), rng=rng, weight_rng=np.random.default_rng([seed, i])
        )
        assert event == cost == DpEvent(sigma, 1.0, 1) == boot.planned_events()[0]
        events.append(event)
        results.append(_wire(result))
    return boot.absorb(results), events


def test_federated_bootstrap_standard_errors_match_the_sampling_error() -> None:
    sites, params, nk, _, bounds = _boot_fixture()
    se, _ = _bootstrap_se(sites, params, bounds, 0.05, seed=37)
    analytic = 0.6 / np.sqrt(nk)  # sd of a component mean, per coordinate (data units)
    ratio = se.means / analytic[:, None]
    assert np.all((ratio > 0.5) & (ratio < 2.0)), ratio
    n = nk.sum()
    w_ratio = se.weights / np.sqrt(params.weights * (1 - params.weights) / n)
    assert np.all((w_ratio > 0.5) & (w_ratio < 2.0)), w_ratio
    assert se.variances.shape == (3, 2) and np.all(se.variances > 0)
    assert se.replicates == 30 and se.weight_norm == bootstrap_weight_norm(30, 4)
    # More noise, larger standard errors: the release noise is in them (conservative).
    noisy, _ = _bootstrap_se(sites, params, bounds, 2.0, seed=38)
    assert np.all(noisy.means > se.means)
    # The simulated noise-only spread says which: negligible at σ = 0.05, most of it at σ = 2.
    assert se.noise_only is not None and noisy.noise_only is not None
    assert np.all(se.noise_only["means"] < 0.6 * se.means)
    both = noisy.noise_only["means"] / noisy.means
    assert np.all((both > 0.5) & (both < 2.0)), both


def test_federated_bootstrap_checks_results_and_size() -> None:
    sites, params, _, _, bounds = _boot_fixture(3_000)
    boot = FederatedBootstrap(
        params, bounds=bounds, replicates=5, weight_cap=4, noise_multiplier=1.0, round=3
    )
    request = _wire(boot.request())
    assert request["kind"] == "gmm.boot" and request["round"] == 3
    rng = np.random.default_rng(39)
    result = _wire(answer_request(request, [sites[0]], rng=rng)[0])
    wrong_round = {**result, "round": 4}
    with pytest.raises(InvalidUpdateError, match="bootstrap round"):
        boot.absorb([wrong_round])
    short = _wire(result)
    short["stats"]["nk"] = short["stats"]["nk"][:4]
    with pytest.raises(InvalidUpdateError):
        boot.absorb([short])
    with pytest.raises(InvalidSpecError):  # sensitivity-relevant fields cannot be smuggled in
        request_cost({**request, "weight_norm": 0.001})
    with pytest.raises(InvalidSpecError, match="bounds"):
        request_cost({**request, "bounds": [[-1.0, 1.0]]})
    big = GaussianMixtureParams(
        np.full(50, 0.02), np.zeros((50, 64)), np.stack([np.eye(64)] * 50), "full"
    )
    with pytest.raises(InvalidSpecError, match="fewer replicates"):
        FederatedBootstrap(
            big,
            bounds=np.tile([-1.0, 1.0], (64, 1)),
            replicates=20,
            weight_cap=4,
            noise_multiplier=1.0,
        )
    assert boot.absorb([result]).means.shape == (3, 2)


def test_released_mixture_round_trips_standard_errors(tmp_path: Path) -> None:
    _, params, _, _, _ = _boot_fixture(300)
    se = MixtureStandardErrors(
        weights=np.full(3, 0.01),
        means=np.full((3, 2), 0.02),
        variances=np.full((3, 2), 0.03),
        replicates=20,
        weight_cap=4,
        weight_norm=8.95,
        noise_multiplier=0.5,
    )
    body = {**params.to_dict(), "standard_errors": se.to_dict()}
    (tmp_path / "mixture.json").write_text(json.dumps(body))
    mix = load_mixture(tmp_path)
    assert mix.standard_errors is not None
    np.testing.assert_array_equal(mix.standard_errors.means, se.means)
    assert mix.standard_errors.to_dict()["includes_dp_noise"] is True
    np.testing.assert_array_equal(mix.predict(params.means), [0, 1, 2])
    (tmp_path / "mixture.json").write_text(json.dumps(params.to_dict()))
    assert load_mixture(tmp_path).standard_errors is None
    bad = {**body, "standard_errors": {**se.to_dict(), "means": [[0.1, 0.1]]}}
    with pytest.raises(ValueError, match="standard errors"):
        ReleasedMixture.from_dict(bad)


# --------------------------------------------------------------------------- job spec


_GMM_SPEC: dict[str, Any] = {
    "kind": "gmm",
    "dataset": "pts",
    "k": 3,
    "dp": {"noise_multiplier": 1.0},
}


def test_bootstrap_spec_defaults_and_validation() -> None:
    spec = parse_any_job_spec({**_GMM_SPEC, "bootstrap": {}})
    assert isinstance(spec, GmmJobSpec) and spec.bootstrap is not None
    assert (spec.bootstrap.replicates, spec.bootstrap.weight_cap) == (20, 4)
    assert spec.bootstrap.noise_multiplier is None
    assert parse_any_job_spec(_GMM_SPEC).bootstrap is None  # type: ignore[union-attr]
    one_shot = parse_any_job_spec(
        {**_GMM_SPEC, "method": "one_shot", "bootstrap": {"replicates": 10}}
    )
    assert one_shot.bootstrap is not None  # type: ignore[union-attr]
    for bad, where in (
        ({"replicates": 2}, "bootstrap.replicates"),
        ({"replicates": 1000}, "bootstrap.replicates"),
        ({"weight_cap": 1}, "bootstrap.weight_cap"),
        ({"weight_cap": 50}, "bootstrap.weight_cap"),
        ({"noise_multiplier": 0.0}, "bootstrap.noise_multiplier"),
        ({"weight_norm": 1.0}, "bootstrap.weight_norm"),  # derived by the sites, not asked
        ({"seed": 3}, "bootstrap.seed"),  # the weights are never seeded from the job
    ):
        with pytest.raises(InvalidSpecError, match=where):
            parse_any_job_spec({**_GMM_SPEC, "bootstrap": bad})


def test_bootstrap_release_is_in_the_planned_epsilon_and_the_calibration() -> None:
    """With a target ε the job's σ is calibrated with the bootstrap release counted (at the
    job's σ, or as a prior event at its own σ); with a fixed σ the planned ε grows."""
    from orchestrator.clustering.runner import GmmRunner

    def plan(extra: dict[str, Any]) -> tuple[float, float, list[DpEvent]]:
        runner = GmmRunner.__new__(GmmRunner)  # only the spec is needed to plan
        runner.spec = parse_any_job_spec({**_GMM_SPEC, "max_rounds": 5, **extra})  # type: ignore[assignment]
        machine = runner._machine(np.tile([-1.0, 1.0], (2, 1)))
        boot = runner._bootstrap_events(machine)
        eps = compute_epsilon([*machine.planned_events(), *boot], delta=DELTA).epsilon
        return machine.noise_multiplier, eps, boot

    target = {"dp": {"target_epsilon": 2.0, "delta": DELTA}}
    sigma0, eps0, boot0 = plan(target)
    sigma1, eps1, boot1 = plan({**target, "bootstrap": {}})
    assert boot0 == [] and boot1 == [DpEvent(sigma1, 1.0, 1)]
    assert sigma1 > sigma0 * 1.01 and eps0 <= 2.0 and eps1 <= 2.0
    sigma2, eps2, boot2 = plan({**target, "bootstrap": {"noise_multiplier": 20.0}})
    assert boot2 == [DpEvent(20.0, 1.0, 1)] and sigma0 < sigma2 < sigma1 and eps2 <= 2.0
    _, fixed0, _ = plan({})
    _, fixed1, _ = plan({"bootstrap": {}})
    assert fixed1 > fixed0 * 1.01


def test_statistics_noise_follows_the_site_noise_source() -> None:
    from common.dp import noise

    D, K = 2, 2
    base = SufficientStats(np.zeros(K), np.zeros((K, D)), np.zeros((K, D, D)), 0.0, (-5.0, 0.0))
    delta = stats_sensitivity(D, K, "full")

    def draw() -> np.ndarray:
        out = noise_stats(
            base, noise_multiplier=1.0, sensitivity=delta, rng=np.random.default_rng(3)
        )
        return np.concatenate([out.nk, out.s1.ravel()])

    assert np.array_equal(draw(), draw())  # standard source: the caller's generator
    with noise.secure_noise():  # CSPRNG: the generator and its seed play no part
        assert not np.array_equal(draw(), draw())
