"""Site side of federated DP Gaussian-mixture clustering: streaming E-step statistics.

Specification
=============

This code runs inside the site's trust boundary; everything it returns for release is
noised here, by the site, with a sensitivity the site computes itself (never read from the
wire). The maths and the sensitivity derivation are in :mod:`common.clustering`.

What a site computes
--------------------
* :func:`compute_stats`: the exact E-step statistics
  (:class:`~common.clustering.statistics.SufficientStats`, unit-box coordinates) of its rows under a
  public model, streaming over chunks of rows: memory holds one chunk, never the dataset. Every
  value is clipped to the declared bounds and mapped into ``[−1, 1]^D``
  (:class:`~common.clustering.model.FeatureBox`); every row's log-likelihood is clipped to
  :func:`~common.clustering.statistics.loglik_clip_range` of the model.
* :func:`noisy_stats`: the same, noised by the Gaussian mechanism with L2 sensitivity
  :func:`~common.clustering.release.stats_sensitivity`, and its :class:`~common.dp.events.DpEvent`
  ``(σ, 1.0, 1)``.
* :func:`compute_candidate_stats` / :func:`noisy_candidate_stats`: nearest-candidate counts and sums
  for the DP initialisation (sensitivity
  :func:`~common.clustering.initialisation.candidate_sensitivity`, ``DpEvent(σ, 1.0, 1)``).
* :func:`compute_replicate_stats` / :func:`noisy_replicate_stats`: the DP Poisson bootstrap of the
  final model (the ``bootstrap:`` job option): R replicates of the E-step statistics with per-row,
  per-replicate weights ``min(Poisson(1), cap)`` drawn from a generator seeded from OS entropy here
  (never from the job or the request), each row's weight vector rescaled to L2 norm at most
  :func:`~common.clustering.bootstrap.bootstrap_weight_norm`; noise with sensitivity
  :func:`~common.clustering.bootstrap.bootstrap_sensitivity`, ``DpEvent(σ, 1.0, 1)`` (derivation in
  docs/clustering.md).
* :func:`answer_request`: the whole site step for a wire request (one pass over the data for all the
  models it names), returning the JSON-safe result and the event to charge. ``gmm.init`` → noisy
  candidate statistics; ``gmm.em`` → noisy E-step statistics per model; ``gmm.eval`` → noisy
  :func:`~common.clustering.release.scaled_loglik_sum` per model (sensitivity 1, noise
  ``N(0, σ²)``), used to compare final models; ``gmm.boot`` → noisy bootstrap replicates of one
  model's statistics.

Ledger discipline (write-ahead)
-------------------------------
:func:`request_cost` gives the event of a request *before* any data is read, so the agent
checks its policy (minimum σ, budget) first. The agent must then charge the event returned
by :func:`answer_request` to its ledger before the result leaves the site. A request naming
m models costs ``DpEvent(σ, 1.0, m)`` (m Gaussian releases; equivalently one release of the
concatenated vector with sensitivity ``√m·Δ``); a bootstrap request ``DpEvent(σ, 1.0, 1)``
(one release of the R concatenated replicates with sensitivity ``C·Δ₀``). σ comes from the request, so the agent's
policy must check it (minimum noise multiplier) with the rest of the cost; every
sensitivity is computed here from the request's shape, never read from it.

Distributed computation on a Spark or Dask cluster
--------------------------------------------------
The statistics are sums over rows, so a cluster computes them as a map-reduce with the
*same* functions and adds noise exactly once, at the end:

* map: per partition, ``expected_stats(box.to_unit(rows), box.params_to_unit(params),
  loglik_range=loglik_clip_range(unit_params))`` (``common.clustering.statistics``), e.g.
  with Spark's ``rdd.mapPartitions`` or Dask's ``ddf.map_partitions`` / ``dask.delayed`` per
  partition, returning ``SufficientStats`` objects (or their ``to_dict()``);
* reduce: ``functools.reduce(operator.add, parts)`` (Spark ``treeReduce``, Dask
  ``dask.bag.fold``): exact, order-independent up to floating-point rounding;
* noise: one call to ``noise_stats(total, noise_multiplier=σ, sensitivity=Δ, rng=...)`` on
  the driver, never per partition (per-partition noise would add more noise for the same
  guarantee, and the sensitivity argument is about the total).

Row clipping and the unit map are per row, so they commute with partitioning; the driver
must use a generator seeded from OS entropy for the noise.

Data handling follows :mod:`site_agent.data.loading`: no error message contains a data value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from common.clustering.bootstrap import (
    MAX_BOOTSTRAP_VALUES,
    ReplicateStats,
    bootstrap_release_size,
    bootstrap_sensitivity,
    bootstrap_weight_norm,
    bootstrap_weights,
    noise_replicate_stats,
    replicate_stats,
)
from common.clustering.initialisation import (
    CandidateStats,
    candidate_sensitivity,
    candidate_stats,
    noise_candidate_stats,
)
from common.clustering.model import FeatureBox, GaussianMixtureParams
from common.clustering.release import (
    LOGLIK_SENSITIVITY,
    noise_stats,
    scaled_loglik_sum,
    stats_sensitivity,
)
from common.clustering.statistics import SufficientStats, expected_stats, loglik_clip_range
from common.clustering.wire import (
    BootRequest,
    BootResult,
    EmRequest,
    EmResult,
    EvalRequest,
    EvalResult,
    InitRequest,
    InitResult,
    WireDpEvent,
    parse_request,
    release_event,
)
from common.dp import noise
from common.dp.events import DpEvent
from common.errors import InvalidSpecError

__all__ = [
    "answer_request",
    "compute_candidate_stats",
    "compute_replicate_stats",
    "compute_stats",
    "noisy_candidate_stats",
    "noisy_replicate_stats",
    "noisy_stats",
    "request_cost",
]

FloatArray = npt.NDArray[np.float64]


def _unit_models(
    models: Sequence[GaussianMixtureParams], box: FeatureBox
) -> list[tuple[GaussianMixtureParams, tuple[float, float]]]:
    out = []
    for params in models:
        unit = box.params_to_unit(params)
        out.append((unit, loglik_clip_range(unit)))
    return out


def _stream_stats(
    chunks: Iterable[npt.ArrayLike],
    models: Sequence[GaussianMixtureParams],
    box: FeatureBox,
    covariance_types: Sequence[str],
) -> list[SufficientStats]:
    """One pass over the chunks accumulating every model's statistics."""
    unit = _unit_models(models, box)
    totals: list[SufficientStats | None] = [None] * len(unit)
    for chunk in chunks:
        z = box.to_unit(chunk)
        if z.shape[0] == 0:
            continue
        for i, ((params, rng), ctype) in enumerate(zip(unit, covariance_types, strict=True)):
            part = expected_stats(z, params, covariance_type=ctype, loglik_range=rng)
            prev = totals[i]
            totals[i] = part if prev is None else prev + part
    out = []
    for (params, rng), ctype, total in zip(unit, covariance_types, totals, strict=True):
        if total is None:  # no rows at all: the exact statistics are zero
            K, D = params.n_components, params.n_features
            s2 = np.zeros((K, D, D) if ctype == "full" else (K, D))
            total = SufficientStats(np.zeros(K), np.zeros((K, D)), s2, 0.0, rng)
        out.append(total)
    return out


ExactStats = Callable[
    [Sequence[GaussianMixtureParams], FeatureBox, Sequence[str]], list[SufficientStats]
]
"""Computes :func:`_stream_stats`' result for the site's rows (models, box, covariance types)."""


def _stream_loglik(
    chunks: Iterable[npt.ArrayLike], models: Sequence[GaussianMixtureParams], box: FeatureBox
) -> list[float]:
    """One pass accumulating every model's :func:`~common.clustering.release.scaled_loglik_sum`."""
    unit = _unit_models(models, box)
    totals = [0.0] * len(unit)
    for chunk in chunks:
        z = box.to_unit(chunk)
        if z.shape[0]:
            for i, (params, rng) in enumerate(unit):
                totals[i] += scaled_loglik_sum(z, params, loglik_range=rng)
    return totals


def compute_stats(
    chunks: Iterable[npt.ArrayLike],
    params: GaussianMixtureParams,
    *,
    bounds: npt.ArrayLike,
    covariance_type: str | None = None,
) -> SufficientStats:
    """Exact E-step statistics of the rows in ``chunks`` under ``params`` (data units).

    ``bounds`` is ``(D, 2)``. Rows are clipped to it and mapped to the unit box; the result
    is in unit coordinates with log-likelihoods clipped to ``loglik_clip_range`` of the model
    in unit coordinates. Streaming: one chunk in memory at a time. ``covariance_type``
    (default: the model's) picks the second moment kept. Not private: see :func:`noisy_stats`.
    """
    box = FeatureBox(np.asarray(bounds, dtype=np.float64))
    ctype = covariance_type or params.covariance_type
    return _stream_stats(chunks, [params], box, [ctype])[0]


def noisy_stats(
    chunks: Iterable[npt.ArrayLike],
    params: GaussianMixtureParams,
    *,
    bounds: npt.ArrayLike,
    noise_multiplier: float,
    rng: np.random.Generator,
    covariance_type: str | None = None,
    loglik_weight: float = 1.0,
) -> tuple[SufficientStats, DpEvent]:
    """:func:`compute_stats` released by the Gaussian mechanism, and its cost.

    Noise ``N(0, (σΔ)²)`` on every coordinate of :func:`~common.clustering.release.release_vector`,
    with ``Δ = stats_sensitivity(D, K, covariance_type, 1.0, loglik_weight=w)``; returns the noisy
    statistics and ``DpEvent(σ, 1.0, 1)`` to charge to the site's ledger before release.
    """
    ctype = covariance_type or params.covariance_type
    stats = compute_stats(chunks, params, bounds=bounds, covariance_type=ctype)
    delta = stats_sensitivity(
        params.n_features, params.n_components, ctype, 1.0, loglik_weight=loglik_weight
    )
    noisy = noise_stats(
        stats,
        noise_multiplier=noise_multiplier,
        sensitivity=delta,
        rng=rng,
        loglik_weight=loglik_weight,
    )
    return noisy, DpEvent(noise_multiplier, 1.0, 1)


def compute_candidate_stats(
    chunks: Iterable[npt.ArrayLike], candidates: npt.ArrayLike, *, bounds: npt.ArrayLike
) -> CandidateStats:
    """Nearest-candidate counts and sums (unit coordinates) of the rows, streaming.

    ``candidates`` are ``(M, D)`` in data units; they are mapped to the unit box (not
    clipped: a candidate outside the box just attracts no rows it would not otherwise).
    """
    box = FeatureBox(np.asarray(bounds, dtype=np.float64))
    cand = np.asarray(candidates, dtype=np.float64)
    if cand.ndim != 2 or cand.shape[1] != box.n_features or not np.all(np.isfinite(cand)):
        raise ValueError(f"candidates must be finite with shape (M, {box.n_features}).")
    unit_cand = (cand - box.center) / box.half_width
    total = CandidateStats(np.zeros(cand.shape[0]), np.zeros(cand.shape))
    for chunk in chunks:
        z = box.to_unit(chunk)
        if z.shape[0]:
            total = total + candidate_stats(z, unit_cand)
    return total


def noisy_candidate_stats(
    chunks: Iterable[npt.ArrayLike],
    candidates: npt.ArrayLike,
    *,
    bounds: npt.ArrayLike,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> tuple[CandidateStats, DpEvent]:
    """:func:`compute_candidate_stats` with Gaussian noise ``σ·√(1 + D)``; ``DpEvent(σ, 1, 1)``."""
    stats = compute_candidate_stats(chunks, candidates, bounds=bounds)
    delta = candidate_sensitivity(stats.sums.shape[1], 1.0)
    noisy = noise_candidate_stats(
        stats, noise_multiplier=noise_multiplier, sensitivity=delta, rng=rng
    )
    return noisy, DpEvent(noise_multiplier, 1.0, 1)


def compute_replicate_stats(
    chunks: Iterable[npt.ArrayLike],
    params: GaussianMixtureParams,
    *,
    bounds: npt.ArrayLike,
    replicates: int,
    weight_cap: int,
    covariance_type: str | None = None,
    weight_rng: np.random.Generator | None = None,
) -> ReplicateStats:
    """Exact Poisson-bootstrap replicate statistics of the rows under ``params`` (data units).

    Rows are clipped to ``bounds`` and mapped to the unit box as for EM. Row i gets, in
    replicate r, the weight ``min(Poisson(1), weight_cap)``; its vector of R weights is
    rescaled to L2 norm at most ``bootstrap_weight_norm(replicates, weight_cap)``. The weights
    come from ``weight_rng``, by default a fresh generator seeded from OS entropy: leave it so
    in production (tests pass a seeded one). Streaming; not private (see
    :func:`noisy_replicate_stats`).
    """
    box = FeatureBox(np.asarray(bounds, dtype=np.float64))
    ctype = covariance_type or params.covariance_type
    unit = box.params_to_unit(params)
    norm = bootstrap_weight_norm(replicates, weight_cap)
    # OS entropy: the bootstrap weights are the mechanism's secret.
    wrng = noise.private_numpy_rng() if weight_rng is None else weight_rng
    total: ReplicateStats | None = None
    for chunk in chunks:
        z = box.to_unit(chunk)
        if z.shape[0] == 0:
            continue
        w = bootstrap_weights(
            z.shape[0], replicates, weight_cap=weight_cap, weight_norm=norm, rng=wrng
        )
        part = replicate_stats(z, unit, w, covariance_type=ctype)
        total = part if total is None else total + part
    if total is None:  # no rows: the exact statistics are zero
        K, D = unit.n_components, unit.n_features
        s2 = np.zeros((replicates, K, D, D) if ctype == "full" else (replicates, K, D))
        total = ReplicateStats(np.zeros((replicates, K)), np.zeros((replicates, K, D)), s2)
    return total


def noisy_replicate_stats(
    chunks: Iterable[npt.ArrayLike],
    params: GaussianMixtureParams,
    *,
    bounds: npt.ArrayLike,
    replicates: int,
    weight_cap: int,
    noise_multiplier: float,
    rng: np.random.Generator,
    covariance_type: str | None = None,
    weight_rng: np.random.Generator | None = None,
) -> tuple[ReplicateStats, DpEvent]:
    """:func:`compute_replicate_stats` released by the Gaussian mechanism, and its cost.

    Noise ``N(0, (σ·C·Δ₀)²)`` on every coordinate (``C·Δ₀`` =
    :func:`~common.clustering.bootstrap.bootstrap_sensitivity` with ``C`` =
    :func:`~common.clustering.bootstrap.bootstrap_weight_norm`); returns the noisy replicates and
    ``DpEvent(σ, 1.0, 1)``, to charge to the site's ledger before release.
    """
    ctype = covariance_type or params.covariance_type
    exact = compute_replicate_stats(
        chunks,
        params,
        bounds=bounds,
        replicates=replicates,
        weight_cap=weight_cap,
        covariance_type=ctype,
        weight_rng=weight_rng,
    )
    delta = bootstrap_sensitivity(
        params.n_features, ctype, bootstrap_weight_norm(replicates, weight_cap)
    )
    noisy = noise_replicate_stats(
        exact, noise_multiplier=noise_multiplier, sensitivity=delta, rng=rng
    )
    return noisy, DpEvent(noise_multiplier, 1.0, 1)


def _boot_model(request: BootRequest) -> GaussianMixtureParams:
    try:
        params = GaussianMixtureParams.from_dict(request.model.params)
    except ValueError as err:
        raise InvalidSpecError(f"GMM bootstrap request: {err}") from None
    if params.n_features != len(request.bounds):
        raise InvalidSpecError(
            f"GMM bootstrap request: {params.n_features} features but {len(request.bounds)} bounds."
        )
    if params.covariance_type != request.covariance_type:
        raise InvalidSpecError(
            f"GMM bootstrap request: covariance type {params.covariance_type!r} differs from "
            f"the request's {request.covariance_type!r}."
        )
    size = bootstrap_release_size(
        request.replicates, params.n_components, params.n_features, request.covariance_type
    )
    if size > MAX_BOOTSTRAP_VALUES:
        raise InvalidSpecError(
            f"GMM bootstrap request: {size:,} values to release (replicates × components × "
            f"statistics), above the limit of {MAX_BOOTSTRAP_VALUES:,}; ask for fewer replicates."
        )
    return params


def _models_of(request: EmRequest | EvalRequest) -> list[GaussianMixtureParams]:
    models = []
    keys = [m.key for m in request.models]
    if len(set(keys)) != len(keys):
        raise InvalidSpecError("GMM request: model keys must be distinct.")
    for m in request.models:
        try:
            params = GaussianMixtureParams.from_dict(m.params)
        except ValueError as err:
            raise InvalidSpecError(f"GMM request, model {m.key!r}: {err}") from None
        if params.n_features != len(request.bounds):
            raise InvalidSpecError(
                f"GMM request, model {m.key!r}: {params.n_features} features but "
                f"{len(request.bounds)} bounds."
            )
        if params.covariance_type != request.covariance_type:
            raise InvalidSpecError(
                f"GMM request, model {m.key!r}: covariance type {params.covariance_type!r} "
                f"differs from the request's {request.covariance_type!r}."
            )
        models.append(params)
    return models


def _box_of(request: InitRequest | EmRequest | EvalRequest | BootRequest) -> FeatureBox:
    try:
        return FeatureBox(np.asarray(request.bounds, dtype=np.float64))
    except ValueError as err:
        raise InvalidSpecError(f"GMM request: {err}") from None


def request_cost(request: Mapping[str, Any]) -> DpEvent:
    """The :class:`DpEvent` answering ``request`` will cost, before any data is read.

    Validates the request (raising :class:`~common.errors.InvalidSpecError`): an init
    request costs ``DpEvent(σ, 1.0, 1)``, an EM or evaluation request naming m models
    ``DpEvent(σ, 1.0, m)``, a bootstrap request ``DpEvent(σ, 1.0, 1)``.
    """
    req = parse_request(request)
    _box_of(req)
    if isinstance(req, InitRequest):
        if any(len(c) != len(req.bounds) for c in req.candidates):
            raise InvalidSpecError("GMM init request: every candidate needs one value per bound.")
    elif isinstance(req, BootRequest):
        _boot_model(req)
    else:
        _models_of(req)
    return release_event(req)


def answer_request(
    request: Mapping[str, Any],
    chunks: Iterable[npt.ArrayLike],
    *,
    rng: np.random.Generator,
    weight_rng: np.random.Generator | None = None,
    exact_stats: ExactStats | None = None,
) -> tuple[dict[str, Any], DpEvent]:
    """Answer a wire request with noised statistics: ``(result dict, event to charge)``.

    ``chunks`` are the site's rows (data units, in the order of the job's columns), read
    once. The sensitivity is computed here from the request's shape, never taken from it.
    The caller checks :func:`request_cost` against its policy first and charges the returned
    event to its ledger *before* sending the result. ``weight_rng`` draws the bootstrap
    weights of a ``gmm.boot`` request; leave it None in production (OS entropy).
    ``exact_stats`` computes an E-step request's exact statistics elsewhere (``engine:
    dask``: ``site_agent.dask_engine``) in place of the pass over ``chunks``; the other
    requests read ``chunks``.
    """
    event = request_cost(request)
    req = parse_request(request)
    box = _box_of(req)
    if isinstance(req, BootRequest):
        params = _boot_model(req)
        reps, _ = noisy_replicate_stats(
            chunks,
            params,
            bounds=box.bounds,
            replicates=req.replicates,
            weight_cap=req.weight_cap,
            noise_multiplier=req.noise_multiplier,
            rng=rng,
            covariance_type=req.covariance_type,
            weight_rng=weight_rng,
        )
        boot = BootResult(
            round=req.round, key=req.model.key, stats=reps.to_dict(), dp_event=WireDpEvent.of(event)
        )
        return boot.model_dump(mode="json"), event
    if isinstance(req, InitRequest):
        cand_stats, _ = noisy_candidate_stats(
            chunks,
            np.asarray(req.candidates, dtype=np.float64),
            bounds=box.bounds,
            noise_multiplier=req.noise_multiplier,
            rng=rng,
        )
        init = InitResult(
            round=req.round, stats=cand_stats.to_dict(), dp_event=WireDpEvent.of(event)
        )
        return init.model_dump(mode="json"), event
    models = _models_of(req)
    if isinstance(req, EvalRequest):
        sums = _stream_loglik(chunks, models, box)
        noisy_ll = {
            m.key: v + float(noise.gaussian_np(rng, req.noise_multiplier * LOGLIK_SENSITIVITY))
            for m, v in zip(req.models, sums, strict=True)
        }
        ev = EvalResult(round=req.round, logliks=noisy_ll, dp_event=WireDpEvent.of(event))
        return ev.model_dump(mode="json"), event
    covs = [req.covariance_type] * len(models)
    exact = (
        _stream_stats(chunks, models, box, covs)
        if exact_stats is None
        else exact_stats(models, box, covs)
    )
    noised: dict[str, dict[str, Any]] = {}
    for m, params, stats in zip(req.models, models, exact, strict=True):
        delta = stats_sensitivity(
            params.n_features,
            params.n_components,
            req.covariance_type,
            1.0,
            loglik_weight=req.loglik_weight,
        )
        noisy = noise_stats(
            stats,
            noise_multiplier=req.noise_multiplier,
            sensitivity=delta,
            rng=rng,
            loglik_weight=req.loglik_weight,
        )
        noised[m.key] = noisy.to_dict()
    result = EmResult(round=req.round, stats=noised, dp_event=WireDpEvent.of(event))
    return result.model_dump(mode="json"), event
