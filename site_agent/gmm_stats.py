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
The statistics are sums over rows, so a cluster computes them as a map-reduce and the agent
adds noise exactly once, at the end (per-partition noise would add more noise for the same
guarantee, and the sensitivity argument is about the total). :func:`exact_partials` is the
map: each chunk's exact statistics, chunk by chunk. :func:`answer_request` sums them in
chunk order whether it computed them itself or received them (``partials``), so a cluster
that cuts each partition into the same chunks and returns the partials in partition order
(``site_agent.dask_engine``) gives the same bits as the agent's own pass. Spark and Dask
recipes: ``docs/distributed-statistics.md``.

Data handling follows :mod:`site_agent.data.loading`: no error message contains a data value.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

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
    total = _fold_lists(_em_partials(chunks, unit, covariance_types, box))
    return _em_totals(total, unit, covariance_types)


def _em_partials(
    chunks: Iterable[npt.ArrayLike],
    unit: Sequence[tuple[GaussianMixtureParams, tuple[float, float]]],
    covariance_types: Sequence[str],
    box: FeatureBox,
) -> Iterator[list[SufficientStats]]:
    for chunk in chunks:
        z = box.to_unit(chunk)
        if z.shape[0]:
            yield [
                expected_stats(z, params, covariance_type=ctype, loglik_range=rng)
                for (params, rng), ctype in zip(unit, covariance_types, strict=True)
            ]


def _em_totals(
    total: list[SufficientStats] | None,
    unit: Sequence[tuple[GaussianMixtureParams, tuple[float, float]]],
    covariance_types: Sequence[str],
) -> list[SufficientStats]:
    if total is not None:
        return total
    out = []  # no rows at all: the exact statistics are zero
    for (params, rng), ctype in zip(unit, covariance_types, strict=True):
        K, D = params.n_components, params.n_features
        s2 = np.zeros((K, D, D) if ctype == "full" else (K, D))
        out.append(SufficientStats(np.zeros(K), np.zeros((K, D)), s2, 0.0, rng))
    return out


T = TypeVar("T", SufficientStats, float)


def _fold_lists(partials: Iterable[list[T]]) -> list[T] | None:
    """Each chunk's list of per-model values summed element-wise, chunk after chunk (None
    without chunks): the one order of summation every path uses."""
    total: list[T] | None = None
    for part in partials:
        total = list(part) if total is None else [a + b for a, b in zip(total, part, strict=True)]
    return total


def _fold_candidates(partials: Iterable[CandidateStats], zero: CandidateStats) -> CandidateStats:
    total: CandidateStats | None = None
    for part in partials:
        total = part if total is None else total + part
    return zero if total is None else total


def exact_partials(request: Mapping[str, Any], chunks: Iterable[npt.ArrayLike]) -> Iterator[Any]:
    """The exact statistics of each non-empty chunk of rows (data units, the job's columns)
    for a ``gmm.init``, ``gmm.em`` or ``gmm.eval`` request, in chunk order: a
    :class:`~common.clustering.initialisation.CandidateStats`, a list of ``SufficientStats``
    (one per model) or a list of scaled log-likelihood sums (one per model).

    :func:`answer_request` sums them chunk after chunk. A cluster computes them partition by
    partition over the same chunks (``site_agent.dask_engine.MixtureRequestStats``) and the
    agent passes them, in partition order, as ``partials``: the same values summed in the same
    order, so the released statistics are the same bits before the noise.

    Raises:
        InvalidSpecError: a malformed request, or a bootstrap request (its weights are drawn
            in the agent, row by row).
    """
    req = parse_request(request)
    box = _box_of(req)
    if isinstance(req, BootRequest):
        raise InvalidSpecError("GMM bootstrap statistics are computed in the agent only.")
    if isinstance(req, InitRequest):
        unit_cand = _unit_candidates(req.candidates, box)
        for chunk in chunks:
            z = box.to_unit(chunk)
            if z.shape[0]:
                yield candidate_stats(z, unit_cand)
        return
    unit = _unit_models(_models_of(req), box)
    if isinstance(req, EmRequest):
        yield from _em_partials(chunks, unit, [req.covariance_type] * len(unit), box)
        return
    for chunk in chunks:
        z = box.to_unit(chunk)
        if z.shape[0]:
            yield [scaled_loglik_sum(z, params, loglik_range=rng) for params, rng in unit]


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
    unit_cand = _unit_candidates(candidates, box)
    parts = (candidate_stats(z, unit_cand) for z in map(box.to_unit, chunks) if z.shape[0])
    return _fold_candidates(parts, _zero_candidates(unit_cand))


def _unit_candidates(candidates: npt.ArrayLike, box: FeatureBox) -> FloatArray:
    cand = np.asarray(candidates, dtype=np.float64)
    if cand.ndim != 2 or cand.shape[1] != box.n_features or not np.all(np.isfinite(cand)):
        raise ValueError(f"candidates must be finite with shape (M, {box.n_features}).")
    unit: FloatArray = (cand - box.center) / box.half_width
    return unit


def _zero_candidates(unit_cand: FloatArray) -> CandidateStats:
    return CandidateStats(np.zeros(unit_cand.shape[0]), np.zeros(unit_cand.shape))


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
    return _noisy_candidates(stats, noise_multiplier=noise_multiplier, rng=rng)


def _noisy_candidates(
    stats: CandidateStats, *, noise_multiplier: float, rng: np.random.Generator
) -> tuple[CandidateStats, DpEvent]:
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
    partials: Iterable[Any] | None = None,
) -> tuple[dict[str, Any], DpEvent]:
    """Answer a wire request with noised statistics: ``(result dict, event to charge)``.

    ``chunks`` are the site's rows (data units, in the order of the job's columns), read
    once. The sensitivity is computed here from the request's shape, never taken from it.
    The caller checks :func:`request_cost` against its policy first and charges the returned
    event to its ledger *before* sending the result. ``weight_rng`` draws the bootstrap
    weights of a ``gmm.boot`` request; leave it None in production (OS entropy).
    ``partials``: the :func:`exact_partials` of the rows, computed elsewhere (``engine:
    dask``: ``site_agent.dask_engine``), in place of the pass over ``chunks`` (init, EM and
    evaluation requests; a bootstrap request reads ``chunks``).
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
    parts = exact_partials(request, chunks) if partials is None else partials
    if isinstance(req, InitRequest):
        zero = _zero_candidates(_unit_candidates(req.candidates, box))
        cand_stats, _ = _noisy_candidates(
            _fold_candidates(parts, zero), noise_multiplier=req.noise_multiplier, rng=rng
        )
        init = InitResult(
            round=req.round, stats=cand_stats.to_dict(), dp_event=WireDpEvent.of(event)
        )
        return init.model_dump(mode="json"), event
    models = _models_of(req)
    if isinstance(req, EvalRequest):
        sums = _fold_lists(parts) or [0.0] * len(models)
        noisy_ll = {
            m.key: v + float(noise.gaussian_np(rng, req.noise_multiplier * LOGLIK_SENSITIVITY))
            for m, v in zip(req.models, sums, strict=True)
        }
        ev = EvalResult(round=req.round, logliks=noisy_ll, dp_event=WireDpEvent.of(event))
        return ev.model_dump(mode="json"), event
    covs = [req.covariance_type] * len(models)
    exact = _em_totals(_fold_lists(parts), _unit_models(models, box), covs)
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
