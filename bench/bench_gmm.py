"""Held-out log-likelihood of federated DP Gaussian mixtures against a central, non-private fit.

Data: a synthetic mixture of K = 4 correlated Gaussians in D = 5 dimensions (120,000 training
rows, 20,000 held-out rows), partitioned over 3, 10 or 20 sites with label skew: each
component's rows go to the sites in Dirichlet(1)-distributed proportions (Hsu, Qi & Brown
2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", arXiv:1909.06335), so sites differ in size and in cluster mix. The
declared feature bounds are [-12, 12] on every column (public, wider than the data).

Methods, each scored by the mean held-out log-likelihood per row (data units; higher is
better):

* ``central``: scikit-learn's ``GaussianMixture`` (K = 4, full covariances, 3 initialisations)
  on all training rows in one place, without DP: the reference no federation can beat.
* ``fed σ=.01``: :class:`common.clustering.federated_em.FederatedEM` with the smallest noise
  multiplier a :class:`~common.dp.events.DpEvent` accepts (0.01; no meaningful ε): the federated
  algorithm itself, nearly without the cost of privacy.
* ``fed DP-EM``: :class:`~common.clustering.federated_em.FederatedEM` (1 init release + at most
  ``--rounds`` EM rounds), σ calibrated with
  :func:`common.dp.calibrate.calibrate_noise_multiplier` so that every site's worst-case
  history (``planned_events``) meets the target ε at δ = 1e-5 (PRV accountant).
* ``one-shot``: every site fits its own DP mixture (a one-site ``FederatedEM`` with the same
  σ, rounds and ε), and the orchestrator merges the local models with
  :func:`common.clustering.merge.merge_mixtures`, weighting sites by their noisy row counts: one
  round trip instead of ``rounds + 1``.

Every site is charged ε (its rows are in one release chain); sites hold disjoint rows, so ε is
also the guarantee of the released model. The ε reported is :func:`compute_epsilon` of the
events actually charged (early stopping can leave it below the target). Each DP cell is
repeated with ``--repeats`` different noise seeds (mean and standard deviation reported).

Run: ``.venv/bin/python bench/bench_gmm.py`` (about a minute on 2 CPU cores); writes
``bench/results/gmm.json``.

``--bootstrap`` measures instead the DP Poisson-bootstrap standard errors (the job option
``bootstrap:``) on the same data over 3 sites: DP EM and then one bootstrap release at the
job's σ, calibrated so that the whole job (init + EM rounds + bootstrap) meets each target ε;
and, as a reference for the estimator itself, a bootstrap at σ = 0.01 (no meaningful ε) of
the same fitted model. Each standard error of a component mean is divided by the analytic
sampling error ``√(Σ_k[j, j] / n_k)`` (true covariances and component sizes); the ratio
of each weight's standard error to ``√(π_k(1 − π_k)/n)`` likewise; ``noise-only/SE`` is the
median ratio of the simulated noise-only spread of a mean to its standard error. Writes
``bench/results/gmm_bootstrap.json``:
``.venv/bin/python bench/bench_gmm.py --bootstrap --epsilons 3 10`` (about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from sklearn.mixture import GaussianMixture

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.clustering.federated_bootstrap import FederatedBootstrap
from common.clustering.federated_em import FederatedEM
from common.clustering.merge import merge_mixtures
from common.clustering.model import GaussianMixtureParams
from common.dp.accounting import compute_epsilon
from common.dp.calibrate import calibrate_noise_multiplier
from common.dp.events import DpEvent
from site_agent.gmm_stats import answer_request

RESULTS = Path(__file__).resolve().parent / "results" / "gmm.json"
BOOT_RESULTS = Path(__file__).resolve().parent / "results" / "gmm_bootstrap.json"
DELTA = 1e-5
K, D = 4, 5
BOUND = 12.0
N_TRAIN, N_TEST = 120_000, 20_000


def _environment(started: float, load_before: float, **versions: str) -> dict[str, Any]:
    """The machine and the run, for the results file (``started``: ``time.perf_counter()``)."""
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        **versions,
        "machine": platform.machine(),
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def make_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train rows, train labels, test rows) of a fixed 4-component mixture in 5-D."""
    X, y, X_test, _, _ = make_data_with_truth(seed)
    return X, y, X_test


def make_data_with_truth(
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`make_data` plus the true means ``(K, D)`` and covariances ``(K, D, D)``."""
    rng = np.random.default_rng(seed)
    means = np.array(
        [
            [-4.0, -4.0, 0.0, 1.0, 0.0],
            [0.0, 4.0, 3.0, -2.0, 0.0],
            [4.0, -1.0, -3.0, 2.0, 2.0],
            [1.0, 0.0, 1.0, 0.0, -4.0],
        ]
    )
    weights = np.array([0.35, 0.25, 0.25, 0.15])
    factors = [rng.normal(size=(D, D)) * 0.45 + np.eye(D) * 0.6 for _ in range(K)]

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.choice(K, size=n, p=weights)
        noise = rng.normal(size=(n, D))
        X = np.empty((n, D))
        for k in range(K):
            idx = labels == k
            X[idx] = means[k] + noise[idx] @ factors[k].T
        return X, labels

    X, y = draw(N_TRAIN)
    X_test, _ = draw(N_TEST)
    return X, y, X_test, means, np.stack([f @ f.T for f in factors])


def partition(labels: np.ndarray, n_sites: int, seed: int) -> list[np.ndarray]:
    """Row indices per site: component k's rows spread by Dirichlet(1) proportions."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
    for k in range(K):
        idx = rng.permutation(np.flatnonzero(labels == k))
        cuts = (np.cumsum(rng.dirichlet(np.ones(n_sites)))[:-1] * idx.size).astype(int)
        for s, chunk in enumerate(np.split(idx, cuts)):
            parts[s].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def _chunks(X: np.ndarray, rows: int = 20_000) -> Iterator[np.ndarray]:
    for i in range(0, len(X), rows):
        yield X[i : i + rows]


def run_job(job: FederatedEM, sites: Sequence[np.ndarray], seed: int) -> list[list[DpEvent]]:
    """Drive a job through JSON round trips, as over the wire; return each site's charges."""
    rng = np.random.default_rng(seed)
    charged: list[list[DpEvent]] = [[] for _ in sites]
    request: dict[str, Any] | None = json.loads(json.dumps(job.initial_request()))
    while request is not None:
        results = []
        for s, X in enumerate(sites):
            result, event = answer_request(request, _chunks(X), rng=rng)
            charged[s].append(event)
            results.append(json.loads(json.dumps(result)))
        nxt = job.absorb(results)
        request = None if nxt is None else json.loads(json.dumps(nxt))
    return charged


def _job(sigma: float, rounds: int, seed: int) -> FederatedEM:
    return FederatedEM(
        K=K,
        covariance_type="full",
        bounds=np.tile([-BOUND, BOUND], (D, 1)),
        max_rounds=rounds,
        tol=1e-3,
        noise_multiplier=sigma,
        seed=seed,
    )


def federated(
    sites: Sequence[np.ndarray], sigma: float, rounds: int, seed: int
) -> tuple[GaussianMixtureParams, float, int]:
    job = _job(sigma, rounds, seed)
    charged = run_job(job, sites, seed + 1)
    eps = max(compute_epsilon(c, delta=DELTA).epsilon for c in charged)
    return job.result(), eps, len(job.history)


def one_shot(
    sites: Sequence[np.ndarray], sigma: float, rounds: int, seed: int
) -> tuple[GaussianMixtureParams, float, int]:
    local, weights, eps = [], [], 0.0
    for s, X in enumerate(sites):
        job = _job(sigma, rounds, seed + 100 * s)
        charged = run_job(job, [X], seed + 100 * s + 1)
        eps = max(eps, compute_epsilon(charged[0], delta=DELTA).epsilon)
        local.append(job.result())
        weights.append(max(job.mean_rows(), 1.0))  # noisy, post-processing
    return merge_mixtures(local, weights, K), eps, 1


def _boot_ratios(
    job: FederatedEM,
    sites: Sequence[np.ndarray],
    sigma: float,
    replicates: int,
    seed: int,
    truth: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[list[float], list[float], list[float]]:
    """(mean SE / analytic, weight SE / analytic, mean noise-only / SE) per parameter."""
    means, covs, nk = truth
    params = job.result()
    boot = FederatedBootstrap(
        params,
        bounds=np.tile([-BOUND, BOUND], (D, 1)),
        replicates=replicates,
        weight_cap=4,
        noise_multiplier=sigma,
    )
    rng = np.random.default_rng(seed)
    results = [
        json.loads(json.dumps(answer_request(boot.request(), _chunks(X), rng=rng)[0]))
        for X in sites
    ]
    se = boot.absorb(results)
    order = [int(np.argmin(np.linalg.norm(params.means - m, axis=1))) for m in means]
    analytic = np.sqrt(np.diagonal(covs, axis1=1, axis2=2) / nk[:, None])
    pi = nk / nk.sum()
    mean_ratio = (se.means[order] / analytic).ravel()
    weight_ratio = se.weights[order] / np.sqrt(pi * (1 - pi) / nk.sum())
    assert se.noise_only is not None
    noise_share = (se.noise_only["means"] / se.means).ravel()
    return (
        [float(v) for v in mean_ratio],
        [float(v) for v in weight_ratio],
        [float(v) for v in noise_share],
    )


def bootstrap_main(args: argparse.Namespace) -> int:
    """Bootstrap standard errors against analytic sampling errors (``--bootstrap``)."""
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    X, y, _, means, covs = make_data_with_truth(args.seed)
    truth = (means, covs, np.bincount(y, minlength=K).astype(float))
    sites = [X[idx] for idx in partition(y, 3, args.seed + 3)]
    rows: list[dict[str, Any]] = []
    for eps in args.epsilons:
        sigma = calibrate_noise_multiplier(
            target_epsilon=eps, sample_rate=1.0, steps=1 + args.rounds + 1, delta=DELTA
        )
        for rep in range(args.repeats):
            seed = args.seed + 1000 * rep
            job = _job(sigma, args.rounds, seed)
            charged = run_job(job, sites, seed + 1)
            spent = compute_epsilon([*charged[0], DpEvent(sigma, 1.0, 1)], delta=DELTA).epsilon
            for label, s_boot in (("job σ", sigma), ("σ=.01 ref", 0.01)):
                m_ratio, w_ratio, noise_share = _boot_ratios(
                    job, sites, s_boot, args.replicates, seed + 2, truth
                )
                rows.append(
                    {
                        "epsilon_target": eps,
                        "epsilon": spent if label == "job σ" else None,
                        "sigma_em": sigma,
                        "bootstrap": label,
                        "sigma_bootstrap": s_boot,
                        "repeat": rep,
                        "mean_se_ratio": m_ratio,
                        "weight_se_ratio": w_ratio,
                        "mean_noise_only_over_se": noise_share,
                    }
                )
    print(
        f"DP Poisson bootstrap: SE / analytic sampling error, K={K}, D={D}, {N_TRAIN:,} rows "
        f"over 3 sites, R={args.replicates}, cap 4, δ={DELTA:g}, ≤{args.rounds} EM rounds"
    )
    print(
        f"{'ε target':>8} {'ε spent':>8} {'bootstrap':<10} {'σ_boot':>7} "
        f"{'means: median [min, max]':>26} {'weights: median [min, max]':>28} "
        f"{'noise-only/SE':>13}"
    )
    for row in rows:
        m, w = np.array(row["mean_se_ratio"]), np.array(row["weight_se_ratio"])
        eps_s = f"{row['epsilon']:.2f}" if row["epsilon"] is not None else "—"
        print(
            f"{row['epsilon_target']:>8g} {eps_s:>8} {row['bootstrap']:<10} "
            f"{row['sigma_bootstrap']:>7.3g} "
            f"{f'{np.median(m):.2f} [{m.min():.2f}, {m.max():.2f}]':>26} "
            f"{f'{np.median(w):.2f} [{w.min():.2f}, {w.max():.2f}]':>28} "
            f"{np.median(row['mean_noise_only_over_se']):>13.2f}"
        )
    env = _environment(started, load_before)
    config = {
        "K": K,
        "D": D,
        "n_train": N_TRAIN,
        "sites": 3,
        "bounds": [-BOUND, BOUND],
        "delta": DELTA,
        "max_rounds": args.rounds,
        "replicates": args.replicates,
        "weight_cap": 4,
        "repeats": args.repeats,
        "accountant": "prv",
    }
    print(f"wall time {env['wall_s']} s")
    out = args.out if args.out != RESULTS else BOOT_RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"environment": env, "config": config, "results": rows}, indent=2) + "\n"
    )
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 20])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--bootstrap", action="store_true", help="measure bootstrap standard errors instead"
    )
    parser.add_argument("--replicates", type=int, default=20, help="with --bootstrap")
    args = parser.parse_args(argv)
    if args.bootstrap:
        return bootstrap_main(args)

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    X, y, X_test = make_data(args.seed)

    def score(p: GaussianMixtureParams) -> float:
        return float(np.mean(p.log_likelihood(X_test)))

    central = GaussianMixture(K, covariance_type="full", n_init=3, random_state=args.seed).fit(X)
    central_ll = float(central.score(X_test))
    sigmas = {
        eps: calibrate_noise_multiplier(
            target_epsilon=eps, sample_rate=1.0, steps=1 + args.rounds, delta=DELTA
        )
        for eps in args.epsilons
    }
    rows: list[dict[str, Any]] = []
    for n_sites in args.sites:
        sites = [X[idx] for idx in partition(y, n_sites, args.seed + n_sites)]
        sizes = sorted(len(s) for s in sites)
        base, _, base_rounds = federated(sites, 0.01, args.rounds, args.seed)
        rows.append(
            {
                "sites": n_sites,
                "site_rows_min_max": [sizes[0], sizes[-1]],
                "method": "fed σ=.01",
                "epsilon_target": None,
                "sigma": 0.01,
                "heldout_ll": [score(base)],
                "epsilon": [None],
                "rounds": [base_rounds],
            }
        )
        for eps in args.epsilons:
            for method, fit in (("fed DP-EM", federated), ("one-shot", one_shot)):
                lls, spent, rounds = [], [], []
                for rep in range(args.repeats):
                    params, e, nr = fit(sites, sigmas[eps], args.rounds, args.seed + 1000 * rep)
                    lls.append(score(params))
                    spent.append(e)
                    rounds.append(nr)
                rows.append(
                    {
                        "sites": n_sites,
                        "site_rows_min_max": [sizes[0], sizes[-1]],
                        "method": method,
                        "epsilon_target": eps,
                        "sigma": sigmas[eps],
                        "heldout_ll": lls,
                        "epsilon": spent,
                        "rounds": rounds,
                    }
                )
    env = _environment(started, load_before, sklearn=sklearn.__version__)
    config = {
        "K": K,
        "D": D,
        "n_train": N_TRAIN,
        "n_test": N_TEST,
        "bounds": [-BOUND, BOUND],
        "delta": DELTA,
        "max_rounds": args.rounds,
        "repeats": args.repeats,
        "accountant": "prv",
        "central_sklearn_heldout_ll": central_ll,
    }
    print(
        f"Held-out log-likelihood per row (higher is better), K={K}, D={D}, "
        f"{N_TRAIN:,} train / {N_TEST:,} test rows, δ={DELTA:g}, ≤{args.rounds} EM rounds"
    )
    print(f"central scikit-learn GaussianMixture, no DP: {central_ll:.3f}")
    header = f"{'sites':>5} {'rows/site':>13} {'method':<10} {'ε target':>8} {'σ':>7} "
    header += f"{'held-out ll':>16} {'gap':>7} {'ε spent':>8} {'rounds':>6}"
    print(header)
    for row in rows:
        lls = row["heldout_ll"]
        sd = statistics.stdev(lls) if len(lls) > 1 else 0.0
        mean = statistics.fmean(lls)
        spent = [e for e in row["epsilon"] if e is not None]
        eps_s = f"{max(spent):.2f}" if spent else "—"
        target = f"{row['epsilon_target']:g}" if row["epsilon_target"] is not None else "∞"
        lo, hi = row["site_rows_min_max"]
        print(
            f"{row['sites']:>5} {f'{lo}-{hi}':>13} {row['method']:<10} {target:>8} "
            f"{row['sigma']:>7.3g} {f'{mean:.3f} ± {sd:.3f}':>16} {mean - central_ll:>7.3f} "
            f"{eps_s:>8} {statistics.fmean(row['rounds']):>6.1f}"
        )
    print(
        f"wall time {env['wall_s']} s; 1-min load average before/after "
        f"{env['loadavg_1min_before_after']} on {env['cpu_count']} CPUs"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"environment": env, "config": config, "results": rows}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
