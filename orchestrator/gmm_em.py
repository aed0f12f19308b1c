"""Orchestrator side of federated DP Gaussian-mixture clustering: EM as a state machine.

Specification
=============

:class:`FederatedEM` fits one K; :class:`FederatedBIC` fits every K of a range as one job and
chooses K by BIC. Both are transport-agnostic state machines: the caller sends
:meth:`~FederatedEM.initial_request` to every site, feeds the sites' answers to
:meth:`~FederatedEM.absorb`, sends whatever request that returns, and stops when it returns
``None``. Requests and results are JSON-safe dicts (:mod:`common.gmm` wire messages), answered
at each site by :func:`site_agent.gmm_stats.answer_request`. Nothing here touches rows.

Protocol
--------
round 0, ``gmm.init``
    The orchestrator draws ``n_candidates`` points uniformly in the declared box from its seed
    (public, data independent). Each site returns noisy nearest-candidate counts and sums.
    The orchestrator keeps cells whose summed noisy count exceeds three noise standard
    deviations and seeds every K by weighted k-means++ and Lloyd on their noisy centroids
    (:func:`common.gmm.init_from_candidates`).
rounds 1 … T, ``gmm.em``
    The request carries the current model θ_{t−1} of every unfinished K (data units). Each
    site returns noisy E-step statistics per model; the orchestrator sums them over sites and
    runs the M-step with floors (:func:`common.gmm.m_step` with ``min_count`` equal to the
    standard deviation of a summed mass and ``bound = 1``), giving θ_t. The noisy total
    log-likelihood of θ_{t−1} is appended to ``history``.
round T+1, ``gmm.eval`` (only with ``evaluate_final``; :class:`FederatedBIC` does)
    The request carries every K's final model; each site returns the noisy
    :func:`common.gmm.scaled_loglik_sum` (sensitivity 1), from which the final models'
    log-likelihoods are decoded for BIC.

Final estimate: tail averaging
------------------------------
Each round's statistics carry fresh noise, so near the EM fixed point the iterates jitter
around it rather than converge. The final model is the M-step of the *mean* of the noisy
statistics of the last r rounds (``average_last``, or by default the trailing rounds whose
log-likelihoods differ by no more than their expected jitter: release noise plus the
predicted noise-induced loss of each model, :func:`common.gmm.noise_loglik_loss`), which
divides the noise standard deviation by √r (Polyak & Juditsky 1992, "Acceleration of
stochastic approximation by averaging", SIAM J. Control Optim.; here on EM statistics as
in stochastic-approximation EM, Delyon, Lavielle & Moulines 1999, Ann. Statist.). It is
post-processing. For Gaussian noise, r rounds at σ cost what one round at σ/√r costs, so
averaging spends the rounds' budget on precision instead of discarding it.

Stopping: a K stops after ``max_rounds`` EM rounds, or, once it has run ``min_rounds``
(at least 3), when the change of its noisy log-likelihood was within
``tol · n̂ + 2·sd(change)`` in each of the last two rounds: no larger than what the release
noise alone would produce (``sd`` is public: σ, Δ, the clipping range and the number of
sites). Two consecutive rounds are required because the models themselves jitter under
noise, so one small change is often a coincidence. Deciding from noisy outputs is
post-processing.

Privacy (per site; sites hold disjoint rows, so the job's ε is the maximum over sites)
------------------------------------------------------------------------------------------
Every release is a Gaussian mechanism whose sensitivity the site computes itself:

* init: ``DpEvent(σ_init, 1.0, 1)`` (counts and sums, Δ = √(1 + D));
* EM round t: ``DpEvent(σ, 1.0, m_t)`` with ``m_t`` the number of models in the request
  (Δ = :func:`common.gmm.stats_sensitivity`: ``√(2 + D + D(D+1)/2)`` full, ``√(2 + 2D)``
  diag, with ``loglik_weight = 1``);
* evaluation: ``DpEvent(σ, 1.0, m)`` for m models (Δ = 1).

The worst case, known before the job starts, is :meth:`FederatedEM.planned_events`:
``[DpEvent(σ_init, 1, 1), DpEvent(σ, 1, max_rounds·|K| (+ |K| with evaluate_final))]``;
give it to :func:`common.accounting.compute_epsilon`, or solve for σ with
:func:`common.accounting.calibrate_noise_multiplier` (``sample_rate=1.0``, ``steps`` = the
total number of releases when ``σ_init = σ``). :attr:`FederatedEM.privacy_events` is what a
site that answered every request so far has been charged. The orchestrator sums whatever
arrives, so a site that misses a round is charged less and only adds less signal.

Log-likelihoods in ``history`` and the BIC are those of the rows mapped into the unit box
(:class:`common.gmm.FeatureBox`); in data units subtract ``n · log_jacobian``. The constant
cancels in every comparison between rounds or between K on the same rows.

The guarantee relies on the sites' noise only; the orchestrator is trusted to aggregate
honestly, as everywhere in dpfed.

Checkpoints
-----------
:meth:`FederatedEM.state_dict` is the whole state of a machine between two requests, JSON-safe
(the constructor's arguments including the seed, the random generator's state, the candidates,
every K's model, statistics, log-likelihood history and stopping state, the round, the phase,
the pending request and the events so far); :func:`machine_from_state` rebuilds the machine,
whose :attr:`~FederatedEM.pending_request` is the request to (re-)send. The orchestrator saves
one after every absorbed round so that a job survives a restart (``orchestrator.gmm_runner``).
:func:`request_events` prices a request exactly as a site does before answering it.

Standard errors: :class:`FederatedBootstrap`
--------------------------------------------
After the final model θ̂ (any method), one ``gmm.boot`` request asks every site for R noisy
Poisson-bootstrap replicates of its E-step statistics under θ̂ (:mod:`common.gmm`, "DP
Poisson bootstrap"); it costs ``DpEvent(σ_boot, 1.0, 1)`` per site. The orchestrator sums each
replicate over the sites, runs one M-step per replicate (with the floors of EM, the noise
standard deviation being that of a summed coordinate, ``σ_boot·C·Δ₀·√S``) and reports the
standard deviation over replicates of every weight, mean and variance, in data units.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from common.accounting import DpEvent
from common.errors import InvalidSpecError, InvalidUpdateError
from common.gmm import (
    LOGLIK_SENSITIVITY,
    MAX_BOOTSTRAP_VALUES,
    MAX_CANDIDATES,
    MAX_COMPONENTS,
    MAX_MODELS_PER_REQUEST,
    BootRequest,
    BootResult,
    CandidateStats,
    EmRequest,
    EmResult,
    EvalRequest,
    EvalResult,
    FeatureBox,
    GaussianMixtureParams,
    InitRequest,
    InitResult,
    MixtureStandardErrors,
    ModelRequest,
    ReplicateStats,
    SufficientStats,
    bootstrap_release_size,
    bootstrap_sensitivity,
    bootstrap_weight_norm,
    candidate_sensitivity,
    capped_poisson_moments,
    decode_loglik,
    draw_candidates,
    init_from_candidates,
    loglik_clip_range,
    loglik_noise_sd,
    m_step,
    noise_loglik_loss,
    noise_replicate_stats,
    parse_request,
    parse_result,
    release_event,
    select_k_by_bic,
    stats_sensitivity,
)

__all__ = [
    "FederatedBIC",
    "FederatedBootstrap",
    "FederatedEM",
    "check_bootstrap_size",
    "machine_from_state",
    "request_events",
]

STATE_VERSION: Final = 1

_RANGE_RTOL: Final = 1e-6
_NOISE_SIMULATIONS: Final = 200  # draws simulating the bootstrap noise alone (public)
_STOP_Z: Final = 2.0

_Result = InitResult | EmResult | EvalResult | BootResult


@dataclass
class _Run:
    """One K's EM run, in unit-box coordinates."""

    K: int
    params: GaussianMixtureParams | None = None  # θ_t, the model of the next EM request
    history: list[float] = field(default_factory=list)
    history_sd: list[float] = field(default_factory=list)
    n_hat: list[float] = field(default_factory=list)
    stats: list[SufficientStats] = field(default_factory=list)
    count_sd: list[float] = field(default_factory=list)
    model_sd: list[float] = field(default_factory=list)  # jitter of θ_t's log-likelihood
    stop_reason: str | None = None
    sent: dict[str, Any] | None = None  # data-unit params of the pending request
    final_loglik: tuple[float, float] | None = None  # (value, noise sd) from the eval round

    @property
    def key(self) -> str:
        return f"K={self.K}"

    @property
    def rounds(self) -> int:
        return len(self.stats)


class _MixtureJob:
    """Shared machinery: one init release, EM rounds over several K in parallel, eval."""

    def __init__(
        self,
        *,
        ks: Sequence[int],
        covariance_type: str,
        bounds: npt.ArrayLike,
        max_rounds: int,
        tol: float,
        noise_multiplier: float,
        seed: int,
        min_variance: float,
        n_candidates: int | None,
        init_noise_multiplier: float | None,
        loglik_weight: float,
        average_last: int | None,
        min_rounds: int,
        evaluate_final: bool,
    ) -> None:
        if covariance_type not in ("full", "diag"):
            raise InvalidSpecError(
                f"covariance_type must be 'full' or 'diag', got {covariance_type!r}."
            )
        try:
            self.box = FeatureBox(np.asarray(bounds, dtype=np.float64))
        except ValueError as err:
            raise InvalidSpecError(f"bounds: {err}") from None
        k_sorted = sorted({int(k) for k in ks})
        if not k_sorted or k_sorted[0] < 1 or k_sorted[-1] > MAX_COMPONENTS:
            raise InvalidSpecError(f"Every K must be in [1, {MAX_COMPONENTS}], got {k_sorted}.")
        if len(k_sorted) > MAX_MODELS_PER_REQUEST:
            raise InvalidSpecError(f"At most {MAX_MODELS_PER_REQUEST} values of K per job.")
        for name, count in (("max_rounds", max_rounds), ("min_rounds", min_rounds)):
            if not (isinstance(count, int) and count >= 1):
                raise InvalidSpecError(f"{name} must be a positive integer, got {count!r}.")
        if average_last is not None and not (isinstance(average_last, int) and average_last >= 1):
            raise InvalidSpecError(
                f"average_last must be a positive integer, got {average_last!r}."
            )
        sigma_init = noise_multiplier if init_noise_multiplier is None else init_noise_multiplier
        for name, value in (
            ("noise_multiplier", noise_multiplier),
            ("init_noise_multiplier", sigma_init),
            ("loglik_weight", loglik_weight),
        ):
            if not (math.isfinite(value) and value > 0):
                raise InvalidSpecError(f"{name} must be positive and finite, got {value}.")
        if not (math.isfinite(tol) and tol >= 0):
            raise InvalidSpecError(f"tol must be non-negative and finite, got {tol}.")
        if not (math.isfinite(min_variance) and 0 < min_variance <= 1):
            raise InvalidSpecError(
                f"min_variance (unit box) must be in (0, 1], got {min_variance}."
            )
        M = n_candidates if n_candidates is not None else max(64, 16 * k_sorted[-1])
        if not (k_sorted[-1] <= M <= MAX_CANDIDATES):
            raise InvalidSpecError(
                f"n_candidates must be in [{k_sorted[-1]}, {MAX_CANDIDATES}], got {M}."
            )
        self.covariance_type = covariance_type
        self.max_rounds = max_rounds
        self.min_rounds = min_rounds
        self.tol = float(tol)
        self.noise_multiplier = float(noise_multiplier)
        self.init_noise_multiplier = float(sigma_init)
        self.min_variance = float(min_variance)
        self.loglik_weight = float(loglik_weight)
        self.average_last = average_last
        self.evaluate_final = evaluate_final
        self.seed = int(seed)
        self._rng = np.random.default_rng(seed)
        self._candidates = draw_candidates(M, self.box.n_features, rng=self._rng)
        self._runs: dict[int, _Run] = {k: _Run(k) for k in k_sorted}
        self._round = 0
        self._phase = "init"  # init → em → (eval →) done
        self._pending: dict[str, Any] | None = None
        self._events: list[DpEvent] = []
        self.n_sites_last_round = 0

    # ------------------------------------------------------------------ requests

    def initial_request(self) -> dict[str, Any]:
        """The ``gmm.init`` request to send to every site (the same dict on every call)."""
        if self._phase != "init":
            raise InvalidSpecError("initial_request is only available before the first absorb.")
        if self._pending is None:
            req = InitRequest(
                round=0,
                bounds=self._wire_bounds(),
                candidates=tuple(
                    tuple(map(float, c)) for c in self.box.from_unit(self._candidates)
                ),
                noise_multiplier=self.init_noise_multiplier,
            )
            self._pending = req.model_dump(mode="json")
        return self._pending

    def _wire_bounds(self) -> tuple[tuple[float, float], ...]:
        return tuple((float(lo), float(hi)) for lo, hi in self.box.bounds)

    def _next_request(self) -> dict[str, Any] | None:
        active = [r for r in self._runs.values() if r.stop_reason is None]
        if active:
            self._round += 1
            models = []
            for run in active:
                assert run.params is not None
                run.sent = self.box.params_from_unit(run.params).to_dict()
                models.append(ModelRequest(key=run.key, params=run.sent))
            em = EmRequest(
                round=self._round,
                bounds=self._wire_bounds(),
                covariance_type="full" if self.covariance_type == "full" else "diag",
                noise_multiplier=self.noise_multiplier,
                loglik_weight=self.loglik_weight,
                models=tuple(models),
            )
            self._phase = "em"
            self._pending = em.model_dump(mode="json")
        elif self.evaluate_final and self._phase == "em":
            self._round += 1
            models = []
            for run in self._runs.values():
                run.sent = self.box.params_from_unit(self._final_unit(run)).to_dict()
                models.append(ModelRequest(key=run.key, params=run.sent))
            ev = EvalRequest(
                round=self._round,
                bounds=self._wire_bounds(),
                covariance_type="full" if self.covariance_type == "full" else "diag",
                noise_multiplier=self.noise_multiplier,
                models=tuple(models),
            )
            self._phase = "eval"
            self._pending = ev.model_dump(mode="json")
        else:
            self._phase = "done"
            self._pending = None
        return self._pending

    # ------------------------------------------------------------------ absorbing

    def absorb(self, site_results: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
        """Take the sites' answers to the pending request; return the next request or None.

        Raises :class:`~common.errors.InvalidUpdateError`, changing nothing, if a result does
        not answer the pending request: wrong kind or round, unknown or missing models,
        shapes, or a log-likelihood clipping range that is not the one of the model sent.
        """
        if self._phase == "done":
            raise InvalidUpdateError("The job has finished; no request is pending.")
        if self._pending is None:
            raise InvalidUpdateError("No request is pending; call initial_request() first.")
        if not site_results:
            raise InvalidUpdateError("absorb needs at least one site result.")
        parsed: list[_Result] = []
        for i, raw in enumerate(site_results):
            try:
                parsed.append(parse_result(raw))
            except InvalidSpecError as err:
                raise InvalidUpdateError(f"Site result {i}: {err}") from None
        if self._phase == "init":
            self._absorb_init(parsed)
        elif self._phase == "em":
            self._absorb_em(parsed)
        else:
            self._absorb_eval(parsed)
        return self._next_request()

    def _absorb_init(self, parsed: Sequence[_Result]) -> None:
        M, D = self._candidates.shape
        total = CandidateStats(np.zeros(M), np.zeros((M, D)))
        for i, res in enumerate(parsed):
            if not isinstance(res, InitResult) or res.round != 0:
                raise InvalidUpdateError(f"Site result {i} does not answer the init request.")
            try:
                stats = CandidateStats.from_dict(res.stats)
            except ValueError as err:
                raise InvalidUpdateError(f"Site result {i}: {err}") from None
            if stats.sums.shape != (M, D):
                raise InvalidUpdateError(f"Site result {i}: expected {M} candidates of {D} values.")
            total = total + stats
        sd = self.init_noise_multiplier * candidate_sensitivity(D) * math.sqrt(len(parsed))
        for run in self._runs.values():
            run.params = init_from_candidates(
                total,
                run.K,
                covariance_type=self.covariance_type,
                noise_sd=sd,
                rng=self._rng,
                min_variance=self.min_variance,
            )
        self._events.append(DpEvent(self.init_noise_multiplier, 1.0, 1))
        self.n_sites_last_round = len(parsed)

    def _sent_range(self, run: _Run) -> tuple[float, float]:
        # Exactly what every site computes from the request: data-unit params back to unit.
        assert run.sent is not None
        return loglik_clip_range(self.box.params_to_unit(GaussianMixtureParams.from_dict(run.sent)))

    def _absorb_em(self, parsed: Sequence[_Result]) -> None:
        active = [r for r in self._runs.values() if r.stop_reason is None]
        expected = {r.key for r in active}
        ranges = {r.key: self._sent_range(r) for r in active}
        totals: dict[str, SufficientStats] = {}
        for i, res in enumerate(parsed):
            if not isinstance(res, EmResult) or res.round != self._round:
                raise InvalidUpdateError(f"Site result {i} does not answer EM round {self._round}.")
            if set(res.stats) != expected:
                raise InvalidUpdateError(
                    f"Site result {i} has models {sorted(res.stats)}, expected {sorted(expected)}."
                )
            for run in active:
                stats = self._checked_stats(i, run, res.stats[run.key], ranges[run.key])
                prev = totals.get(run.key)
                totals[run.key] = stats if prev is None else prev + stats
        # Everything validated: commit.
        S = len(parsed)
        for run in active:
            self._em_update(run, totals[run.key], ranges[run.key], S)
        self._events.append(DpEvent(self.noise_multiplier, 1.0, len(active)))
        self.n_sites_last_round = S

    def _em_update(
        self, run: _Run, total: SufficientStats, rng: tuple[float, float], n_sites: int
    ) -> None:
        delta = stats_sensitivity(
            self.box.n_features, run.K, self.covariance_type, 1.0, loglik_weight=self.loglik_weight
        )
        count_sd = self.noise_multiplier * delta * math.sqrt(n_sites)
        run.params = m_step(
            total,
            covariance_type=self.covariance_type,
            min_variance=self.min_variance,
            min_count=max(1.0, count_sd),
            bound=1.0,
            noise_sd=count_sd,
        )
        run.stats.append(total)
        run.count_sd.append(count_sd)
        n_rows = max(total.total_weight, 1.0)
        run.model_sd.append(noise_loglik_loss(run.params, n=n_rows, noise_sd=count_sd)[1])
        run.history.append(total.loglik)
        run.history_sd.append(
            loglik_noise_sd(
                noise_multiplier=self.noise_multiplier,
                sensitivity=delta,
                loglik_range=rng,
                n_components=run.K,
                loglik_weight=self.loglik_weight,
                n_sites=n_sites,
            )
        )
        run.n_hat.append(total.total_weight)
        if run.rounds >= max(3, self.min_rounds) and all(
            self._small_change(run, t) for t in (-1, -2)
        ):
            run.stop_reason = "converged"
        if run.stop_reason is None and run.rounds >= self.max_rounds:
            run.stop_reason = "max_rounds"

    def _small_change(self, run: _Run, t: int) -> bool:
        """Whether history[t] − history[t−1] is within tol·n̂ + 2·sd of the change."""
        change = abs(run.history[t] - run.history[t - 1])
        noise = math.hypot(run.history_sd[t], run.history_sd[t - 1])
        return change <= self.tol * max(run.n_hat[t], 1.0) + _STOP_Z * noise

    def _checked_stats(
        self, i: int, run: _Run, raw: Mapping[str, Any], rng: tuple[float, float]
    ) -> SufficientStats:
        try:
            stats = SufficientStats.from_dict(raw)
        except ValueError as err:
            raise InvalidUpdateError(f"Site result {i}, {run.key}: {err}") from None
        D = self.box.n_features
        if stats.s1.shape != (run.K, D) or stats.covariance_type != self.covariance_type:
            raise InvalidUpdateError(f"Site result {i}, {run.key}: wrong statistics shape.")
        got = stats.loglik_range
        scale = 1.0 + max(abs(rng[0]), abs(rng[1]))
        if got is None or max(abs(got[0] - rng[0]), abs(got[1] - rng[1])) > _RANGE_RTOL * scale:
            raise InvalidUpdateError(
                f"Site result {i}, {run.key}: log-likelihood clipping range {got} is not the "
                f"model's {rng}."
            )
        # Sites may differ from us in the last bits (BLAS); sum on our own range.
        return SufficientStats(stats.nk, stats.s1, stats.s2, stats.loglik, rng)

    def _absorb_eval(self, parsed: Sequence[_Result]) -> None:
        runs = list(self._runs.values())
        expected = {r.key for r in runs}
        sums = dict.fromkeys(expected, 0.0)
        for i, res in enumerate(parsed):
            if not isinstance(res, EvalResult) or res.round != self._round:
                raise InvalidUpdateError(
                    f"Site result {i} does not answer eval round {self._round}."
                )
            if set(res.logliks) != expected:
                raise InvalidUpdateError(
                    f"Site result {i} has models {sorted(res.logliks)}, expected {sorted(expected)}."
                )
            for key in expected:
                sums[key] += res.logliks[key]
        n = self.mean_rows()
        S = len(parsed)
        for run in runs:
            rng = self._sent_range(run)
            value = decode_loglik(sums[run.key], loglik_range=rng, n=n)
            sd = (rng[1] - rng[0]) / 2.0 * self.noise_multiplier * LOGLIK_SENSITIVITY * math.sqrt(S)
            run.final_loglik = (value, sd)
        self._events.append(DpEvent(self.noise_multiplier, 1.0, len(runs)))
        self.n_sites_last_round = S

    # ------------------------------------------------------------------ estimates

    def _tail(self, run: _Run) -> int:
        """How many of the last rounds the final estimate averages.

        ``average_last`` if set; otherwise the trailing rounds that are stationary: walking
        back from the last round, round i joins while ``|ℓ_{i+1} − ℓ_i|`` (the noisy
        log-likelihoods of the models the two rounds used) is within ``tol·n̂ + 2·sd``,
        where ``sd`` combines the release noise of both values and the predicted jitter of
        both models (:func:`common.gmm.noise_loglik_loss`). Rounds still climbing are left
        out; rounds that differ only by noise are averaged.
        """
        if run.rounds == 0:
            return 0
        if self.average_last is not None:
            return max(1, min(self.average_last, run.rounds))
        n = max(self.mean_rows(), 1.0)

        def jitter(i: int) -> float:  # history[i] measured θ_{i-1}; θ_{-1} is the init
            model = run.model_sd[i - 1] if i >= 1 else 0.0
            return math.hypot(run.history_sd[i], model)

        r, last = 1, run.rounds - 1
        while r < run.rounds:
            a, b = last - r + 1, last - r
            change = abs(run.history[a] - run.history[b])
            if change > self.tol * n + _STOP_Z * math.hypot(jitter(a), jitter(b)):
                break
            r += 1
        return r

    def _final_unit(self, run: _Run) -> GaussianMixtureParams:
        if run.params is None:
            raise InvalidSpecError("No model yet: the init round has not been absorbed.")
        if not run.stats:
            return run.params
        r = self._tail(run)
        tail = run.stats[-r:]
        mean = SufficientStats(
            np.mean([st.nk for st in tail], axis=0),
            np.mean([st.s1 for st in tail], axis=0),
            np.mean([st.s2 for st in tail], axis=0),
            float(np.mean([st.loglik for st in tail])),
        )
        count_sd = math.sqrt(sum(sd * sd for sd in run.count_sd[-r:])) / r
        return m_step(
            mean,
            covariance_type=self.covariance_type,
            min_variance=self.min_variance,
            min_count=max(1.0, count_sd),
            bound=1.0,
            noise_sd=count_sd,
        )

    def _model_noise_sd(self, run: _Run) -> float:
        """sd of the log-likelihood the final model loses to the noise of its statistics."""
        if not run.stats:
            return 0.0
        r = self._tail(run)
        noise = math.sqrt(sum(sd * sd for sd in run.count_sd[-r:])) / r
        return noise_loglik_loss(self._final_unit(run), n=self.mean_rows(), noise_sd=noise)[1]

    def _loglik_estimate(self, run: _Run) -> tuple[float, float]:
        """(log-likelihood, noise sd) of the final model: the eval round's value if there
        was one, else the mean noisy log-likelihood of the averaged rounds."""
        if run.final_loglik is not None:
            return run.final_loglik
        r = self._tail(run)
        mean = float(np.mean(run.history[-r:]))
        sd = math.sqrt(sum(v * v for v in run.history_sd[-r:])) / r
        return mean, sd

    def _final(self, K: int) -> GaussianMixtureParams:
        return self.box.params_from_unit(self._final_unit(self._runs[K]))

    # ------------------------------------------------------------------ reporting

    @property
    def finished(self) -> bool:
        return self._phase == "done"

    @property
    def privacy_events(self) -> list[DpEvent]:
        """Events charged so far to a site that answered every request."""
        return list(self._events)

    def planned_events(self) -> list[DpEvent]:
        """Worst-case events of the whole job (every K runs ``max_rounds``)."""
        releases = self.max_rounds * len(self._runs)
        if self.evaluate_final:
            releases += len(self._runs)
        return [
            DpEvent(self.init_noise_multiplier, 1.0, 1),
            DpEvent(self.noise_multiplier, 1.0, releases),
        ]

    def mean_rows(self) -> float:
        """Noisy number of rows over all sites: mean of every round's ``Σ_k N̂_k``.

        The rows are the same in every round, so averaging all releases is the most precise
        estimate available (post-processing). NaN before the first EM round.
        """
        all_n = [n for run in self._runs.values() for n in run.n_hat]
        return float(np.mean(all_n)) if all_n else math.nan

    # ------------------------------------------------------------------ checkpoints

    @property
    def pending_request(self) -> dict[str, Any] | None:
        """The request the sites must answer next (None when done, or before
        :meth:`initial_request` was first called)."""
        return self._pending

    def _config(self) -> dict[str, Any]:
        return {
            "covariance_type": self.covariance_type,
            "bounds": self.box.bounds.tolist(),
            "max_rounds": self.max_rounds,
            "tol": self.tol,
            "noise_multiplier": self.noise_multiplier,
            "seed": self.seed,
            "min_variance": self.min_variance,
            "n_candidates": int(self._candidates.shape[0]),
            "init_noise_multiplier": self.init_noise_multiplier,
            "loglik_weight": self.loglik_weight,
            "average_last": self.average_last,
            "min_rounds": self.min_rounds,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue between two requests, JSON-safe (module docstring,
        "Checkpoints"); :func:`machine_from_state` is the inverse."""
        return {
            "version": STATE_VERSION,
            "class": type(self).__name__,
            "config": self._config(),
            "rng": self._rng.bit_generator.state,
            "candidates": self._candidates.tolist(),
            "round": self._round,
            "phase": self._phase,
            "pending": self._pending,
            "events": [[e.noise_multiplier, e.sample_rate, e.steps] for e in self._events],
            "n_sites_last_round": self.n_sites_last_round,
            "runs": [
                {
                    "K": run.K,
                    "params": None if run.params is None else run.params.to_dict(),
                    "history": list(run.history),
                    "history_sd": list(run.history_sd),
                    "n_hat": list(run.n_hat),
                    "stats": [st.to_dict() for st in run.stats],
                    "count_sd": list(run.count_sd),
                    "model_sd": list(run.model_sd),
                    "stop_reason": run.stop_reason,
                    "sent": run.sent,
                    "final_loglik": None if run.final_loglik is None else list(run.final_loglik),
                }
                for run in self._runs.values()
            ],
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        runs: dict[int, _Run] = {}
        for r in state["runs"]:
            K = int(r["K"])
            fl = r["final_loglik"]
            runs[K] = _Run(
                K,
                params=None
                if r["params"] is None
                else GaussianMixtureParams.from_dict(r["params"]),
                history=[float(v) for v in r["history"]],
                history_sd=[float(v) for v in r["history_sd"]],
                n_hat=[float(v) for v in r["n_hat"]],
                stats=[SufficientStats.from_dict(st) for st in r["stats"]],
                count_sd=[float(v) for v in r["count_sd"]],
                model_sd=[float(v) for v in r["model_sd"]],
                stop_reason=None if r["stop_reason"] is None else str(r["stop_reason"]),
                sent=None if r["sent"] is None else dict(r["sent"]),
                final_loglik=None if fl is None else (float(fl[0]), float(fl[1])),
            )
        if sorted(runs) != sorted(self._runs):
            raise ValueError(f"runs for K={sorted(runs)}, expected {sorted(self._runs)}")
        candidates = np.asarray(state["candidates"], dtype=np.float64)
        if candidates.shape != self._candidates.shape:
            raise ValueError("candidates of the wrong shape")
        phase = str(state["phase"])
        if phase not in ("init", "em", "eval", "done"):
            raise ValueError(f"unknown phase {phase!r}")
        pending = state["pending"]
        if pending is not None:
            parse_request(pending)  # raises InvalidSpecError if it is not a request
        self._rng.bit_generator.state = dict(state["rng"])
        self._candidates = candidates
        self._runs = runs
        self._round = int(state["round"])
        self._phase = phase
        self._pending = None if pending is None else dict(pending)
        self._events = [DpEvent(float(e[0]), float(e[1]), int(e[2])) for e in state["events"]]
        self.n_sites_last_round = int(state["n_sites_last_round"])


class FederatedEM(_MixtureJob):
    """Federated DP EM for one K (see the module docstring for the protocol and privacy).

    ``bounds`` ``(D, 2)`` are the declared feature bounds (data units). ``min_variance`` is
    a numerical eigenvalue floor in unit-box coordinates (1e-5: a standard deviation of 0.3%
    of a half-range); the noise-aware floor of :func:`common.gmm.m_step` is what guards
    against noise. ``n_candidates`` defaults to ``max(64, 16K)``; ``init_noise_multiplier``
    to ``noise_multiplier``; ``average_last`` to the stationary tail (module docstring).
    """

    def __init__(
        self,
        *,
        K: int,
        covariance_type: str,
        bounds: npt.ArrayLike,
        max_rounds: int,
        tol: float,
        noise_multiplier: float,
        seed: int,
        min_variance: float = 1e-5,
        n_candidates: int | None = None,
        init_noise_multiplier: float | None = None,
        loglik_weight: float = 1.0,
        average_last: int | None = None,
        min_rounds: int = 3,
        evaluate_final: bool = False,
    ) -> None:
        super().__init__(
            ks=[K],
            covariance_type=covariance_type,
            bounds=bounds,
            max_rounds=max_rounds,
            tol=tol,
            noise_multiplier=noise_multiplier,
            seed=seed,
            min_variance=min_variance,
            n_candidates=n_candidates,
            init_noise_multiplier=init_noise_multiplier,
            loglik_weight=loglik_weight,
            average_last=average_last,
            min_rounds=min_rounds,
            evaluate_final=evaluate_final,
        )
        self.K = K

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "K": self.K, "evaluate_final": self.evaluate_final}

    def result(self) -> GaussianMixtureParams:
        """The final model (so far): M-step of the averaged tail statistics, data units."""
        return self._final(self.K)

    @property
    def history(self) -> list[float]:
        """Noisy total log-likelihood (unit box) of the model sent in each EM round."""
        return list(self._runs[self.K].history)

    @property
    def history_sd(self) -> list[float]:
        """Standard deviation of the noise in each ``history`` entry (public)."""
        return list(self._runs[self.K].history_sd)

    @property
    def final_loglik(self) -> tuple[float, float] | None:
        """(noisy log-likelihood, its sd) of :meth:`result` from the eval round, if run."""
        return self._runs[self.K].final_loglik

    @property
    def stop_reason(self) -> str | None:
        """``"converged"``, ``"max_rounds"`` or None while running."""
        return self._runs[self.K].stop_reason


class FederatedBIC(_MixtureJob):
    """Federated DP EM for every K in ``k_values`` as one job, K chosen by BIC.

    All K share the init release and travel in the same requests (one pass over each site's
    rows per round); a final ``gmm.eval`` round measures every K's final model. The BIC of
    K uses that noisy log-likelihood and :meth:`mean_rows`; K is chosen by
    :func:`common.gmm.select_k_by_bic` with the public noise standard deviations
    (one-standard-error rule with ``z``). Other arguments as :class:`FederatedEM`.
    """

    def __init__(
        self,
        *,
        k_values: Sequence[int],
        covariance_type: str,
        bounds: npt.ArrayLike,
        max_rounds: int,
        tol: float,
        noise_multiplier: float,
        seed: int,
        min_variance: float = 1e-5,
        n_candidates: int | None = None,
        init_noise_multiplier: float | None = None,
        loglik_weight: float = 1.0,
        average_last: int | None = None,
        min_rounds: int = 3,
        z: float = 2.0,
    ) -> None:
        super().__init__(
            ks=k_values,
            covariance_type=covariance_type,
            bounds=bounds,
            max_rounds=max_rounds,
            tol=tol,
            noise_multiplier=noise_multiplier,
            seed=seed,
            min_variance=min_variance,
            n_candidates=n_candidates,
            init_noise_multiplier=init_noise_multiplier,
            loglik_weight=loglik_weight,
            average_last=average_last,
            min_rounds=min_rounds,
            evaluate_final=True,
        )
        if not (math.isfinite(z) and z >= 0):
            raise InvalidSpecError(f"z must be non-negative and finite, got {z}.")
        self.z = float(z)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "k_values": self.k_values, "z": self.z}

    @property
    def k_values(self) -> list[int]:
        return sorted(self._runs)

    def _fits(self) -> dict[int, tuple[GaussianMixtureParams, float, float]]:
        n = self.mean_rows()
        if not n > 1:
            raise InvalidSpecError("BIC needs at least one absorbed EM round.")
        return {
            K: (self._final_unit(run), self._loglik_estimate(run)[0], n)
            for K, run in self._runs.items()
            if run.history
        }

    @property
    def bic_curve(self) -> dict[int, float]:
        """BIC of each K (unit-box log-likelihoods; lower is better)."""
        return {K: p.bic(ll, n) for K, (p, ll, n) in self._fits().items()}

    def _selection_sd(self) -> dict[int, float]:
        return {
            K: math.hypot(self._loglik_estimate(r)[1], self._model_noise_sd(r))
            for K, r in self._runs.items()
            if r.history
        }

    @property
    def bic_sd(self) -> dict[int, float]:
        """Standard deviation of each BIC value: ``2·√(sd_eval² + sd_model²)``.

        ``sd_eval`` is the noise of the measured log-likelihood; ``sd_model`` the spread of
        the log-likelihood that the model itself loses to the noise in its statistics
        (:func:`common.gmm.noise_loglik_loss`). Two fits of the same K on the same rows
        differ by about this much.
        """
        return {K: 2.0 * sd for K, sd in self._selection_sd().items()}

    @property
    def chosen_k(self) -> int:
        """The smallest K whose BIC is within ``z`` standard deviations of the minimum."""
        return select_k_by_bic(self._fits(), loglik_sd=self._selection_sd(), z=self.z)

    @property
    def histories(self) -> dict[int, list[float]]:
        """Per K, the noisy log-likelihood of each EM round (unit box)."""
        return {K: list(run.history) for K, run in self._runs.items()}

    def result(self, K: int | None = None) -> GaussianMixtureParams:
        """The final model of ``K`` (default: :attr:`chosen_k`), in data units."""
        return self._final(self.chosen_k if K is None else K)

    @property
    def results(self) -> dict[int, GaussianMixtureParams]:
        """Every K's final model, in data units."""
        return {K: self._final(K) for K in self._runs}


class FederatedBootstrap:
    """One ``gmm.boot`` round: DP Poisson-bootstrap standard errors of a final mixture.

    ``params`` is the released model (data units), ``bounds`` the declared box. Send
    :meth:`request` to every site that contributed to the model, give the answers to
    :meth:`absorb`, which returns the :class:`~common.gmm.MixtureStandardErrors`. Every site
    that received the request is charged :meth:`planned_events` (``DpEvent(σ, 1.0, 1)``).
    Raises :class:`~common.errors.InvalidSpecError` at construction when the release would be
    too large (``replicates × K × (1 + D + |S2|)`` above ``MAX_BOOTSTRAP_VALUES``).
    """

    def __init__(
        self,
        params: GaussianMixtureParams,
        *,
        bounds: npt.ArrayLike,
        replicates: int,
        weight_cap: int,
        noise_multiplier: float,
        round: int = 1,
        min_variance: float = 1e-5,
    ) -> None:
        try:
            self.box = FeatureBox(np.asarray(bounds, dtype=np.float64))
            self.weight_norm = bootstrap_weight_norm(replicates, weight_cap)
        except ValueError as err:
            raise InvalidSpecError(f"bootstrap: {err}") from None
        if params.n_features != self.box.n_features:
            raise InvalidSpecError(
                f"bootstrap: the model has {params.n_features} features, the bounds "
                f"{self.box.n_features}."
            )
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise InvalidSpecError(
                f"bootstrap: noise_multiplier must be positive, got {noise_multiplier}."
            )
        check_bootstrap_size(
            replicates, params.n_components, params.n_features, params.covariance_type
        )
        self.params = params
        self.replicates = int(replicates)
        self.weight_cap = int(weight_cap)
        self.noise_multiplier = float(noise_multiplier)
        self.round = int(round)
        self.min_variance = float(min_variance)
        self.sensitivity = bootstrap_sensitivity(
            params.n_features, params.covariance_type, self.weight_norm
        )
        self.n_sites = 0

    @property
    def key(self) -> str:
        return f"K={self.params.n_components}"

    def request(self) -> dict[str, Any]:
        req = BootRequest(
            round=self.round,
            bounds=tuple((float(lo), float(hi)) for lo, hi in self.box.bounds),
            covariance_type="full" if self.params.covariance_type == "full" else "diag",
            noise_multiplier=self.noise_multiplier,
            replicates=self.replicates,
            weight_cap=self.weight_cap,
            model=ModelRequest(key=self.key, params=self.params.to_dict()),
        )
        return req.model_dump(mode="json")

    def planned_events(self) -> list[DpEvent]:
        """What every site that answers is charged: one Gaussian mechanism."""
        return [DpEvent(self.noise_multiplier, 1.0, 1)]

    def noise_sd(self, n_sites: int) -> float:
        """Standard deviation of the noise on every coordinate of a replicate summed over
        ``n_sites`` sites (unit box; public)."""
        return self.noise_multiplier * self.sensitivity * math.sqrt(max(1, n_sites))

    def absorb(self, site_results: Sequence[Mapping[str, Any]]) -> MixtureStandardErrors:
        """Sum the sites' replicates, run one M-step each, return the standard errors.

        Raises :class:`~common.errors.InvalidUpdateError` if a result does not answer the
        request (kind, round, model key, shapes).
        """
        if not site_results:
            raise InvalidUpdateError("absorb needs at least one site result.")
        K, D = self.params.n_components, self.params.n_features
        R = self.replicates
        total: ReplicateStats | None = None
        for i, raw in enumerate(site_results):
            try:
                res = parse_result(raw)
            except InvalidSpecError as err:
                raise InvalidUpdateError(f"Site result {i}: {err}") from None
            if not isinstance(res, BootResult) or res.round != self.round or res.key != self.key:
                raise InvalidUpdateError(
                    f"Site result {i} does not answer bootstrap round {self.round}."
                )
            try:
                stats = ReplicateStats.from_dict(res.stats)
            except ValueError as err:
                raise InvalidUpdateError(f"Site result {i}: {err}") from None
            if stats.s1.shape != (R, K, D) or stats.covariance_type != self.params.covariance_type:
                raise InvalidUpdateError(f"Site result {i}: wrong replicate statistics shape.")
            total = stats if total is None else total + stats
        assert total is not None
        self.n_sites = len(site_results)
        sd = self.noise_sd(self.n_sites)
        # The bootstrap variance of a smooth statistic scales with Var(w)/E[w]²; capping the
        # Poisson weights lowers it slightly, so scale back to Poisson(1)'s ratio of 1.
        mean_w, var_w, _, _ = capped_poisson_moments(self.weight_cap)
        boot = self._spread(total, sd, mean_w / math.sqrt(var_w))
        # What the noise alone does (post-processing of public quantities): fresh noise of the
        # same scale around the mean replicate, through the same M-step.
        mean = ReplicateStats(
            np.repeat(total.nk.mean(axis=0, keepdims=True), _NOISE_SIMULATIONS, axis=0),
            np.repeat(total.s1.mean(axis=0, keepdims=True), _NOISE_SIMULATIONS, axis=0),
            np.repeat(total.s2.mean(axis=0, keepdims=True), _NOISE_SIMULATIONS, axis=0),
        )
        simulated = noise_replicate_stats(
            mean, noise_multiplier=1.0, sensitivity=sd, rng=np.random.default_rng(self.round)
        )
        noise = self._spread(simulated, sd, 1.0)
        return MixtureStandardErrors(
            weights=boot["weights"],
            means=boot["means"],
            variances=boot["variances"],
            replicates=R,
            weight_cap=self.weight_cap,
            weight_norm=self.weight_norm,
            noise_multiplier=self.noise_multiplier,
            noise_only=noise,
        )

    def _spread(
        self, reps: ReplicateStats, sd: float, factor: float
    ) -> dict[str, npt.NDArray[np.float64]]:
        """``factor`` × the standard deviation over replicates of the M-step's parameters."""
        draws: dict[str, list[npt.NDArray[np.float64]]] = {
            "weights": [],
            "means": [],
            "variances": [],
        }
        for r in range(reps.n_replicates):
            unit = m_step(
                reps.replicate(r),
                covariance_type=self.params.covariance_type,
                min_variance=self.min_variance,
                min_count=max(1.0, sd),
                bound=1.0,
                noise_sd=sd,
            )
            est = self.box.params_from_unit(unit)
            cov = est.covariances
            draws["weights"].append(est.weights)
            draws["means"].append(est.means)
            draws["variances"].append(np.diagonal(cov, axis1=1, axis2=2) if cov.ndim == 3 else cov)
        return {
            k: np.asarray(np.std(np.stack(v), axis=0, ddof=1) * factor) for k, v in draws.items()
        }


def check_bootstrap_size(replicates: int, K: int, D: int, covariance_type: str) -> None:
    """Raise :class:`~common.errors.InvalidSpecError` if a bootstrap release of R replicates of
    K components in D dimensions is too large to travel (before any budget is spent)."""
    size = bootstrap_release_size(replicates, K, D, covariance_type)
    if size > MAX_BOOTSTRAP_VALUES:
        raise InvalidSpecError(
            f"bootstrap: {replicates} replicates of {K} components in {D} dimensions "
            f"({covariance_type}) release {size:,} values, above the limit of "
            f"{MAX_BOOTSTRAP_VALUES:,}; ask for fewer replicates (or diag covariances)."
        )


def request_events(request: Mapping[str, Any]) -> list[DpEvent]:
    """What a site is charged for answering ``request``: the same rule its own
    ``site_agent.gmm_stats.request_cost`` applies (:func:`common.gmm.release_event`)."""
    return [release_event(parse_request(request))]


def machine_from_state(state: Mapping[str, Any]) -> FederatedEM | FederatedBIC:
    """Rebuild a machine from :meth:`FederatedEM.state_dict` (either class).

    Raises :class:`~common.errors.InvalidSpecError` if ``state`` is not such a checkpoint.
    """
    try:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported version {state.get('version')!r}")
        cfg = dict(state["config"])
        common: dict[str, Any] = {
            "covariance_type": str(cfg["covariance_type"]),
            "bounds": np.asarray(cfg["bounds"], dtype=np.float64),
            "max_rounds": int(cfg["max_rounds"]),
            "tol": float(cfg["tol"]),
            "noise_multiplier": float(cfg["noise_multiplier"]),
            "seed": int(cfg["seed"]),
            "min_variance": float(cfg["min_variance"]),
            "n_candidates": int(cfg["n_candidates"]),
            "init_noise_multiplier": float(cfg["init_noise_multiplier"]),
            "loglik_weight": float(cfg["loglik_weight"]),
            "average_last": None if cfg["average_last"] is None else int(cfg["average_last"]),
            "min_rounds": int(cfg["min_rounds"]),
        }
        machine: FederatedEM | FederatedBIC
        if state["class"] == "FederatedEM":
            machine = FederatedEM(
                K=int(cfg["K"]), evaluate_final=bool(cfg["evaluate_final"]), **common
            )
        elif state["class"] == "FederatedBIC":
            machine = FederatedBIC(
                k_values=[int(k) for k in cfg["k_values"]], z=float(cfg["z"]), **common
            )
        else:
            raise ValueError(f"unknown machine {state['class']!r}")
        machine._load_state(state)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise InvalidSpecError(f"Not a mixture checkpoint: {err}") from None
    return machine
