"""Federated EM as a transport-agnostic state machine: the machinery shared by one K and a
BIC sweep.

The caller sends :meth:`MixtureJob.initial_request` to every site, feeds the sites' answers
to :meth:`MixtureJob.absorb`, sends whatever request that returns, and stops at ``None``.
Requests and results are :mod:`common.clustering.wire` messages; nothing here touches rows.
Protocol, tail averaging, stopping and privacy: docs/clustering.md, "Federated EM".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, Unpack

import numpy as np

from common.clustering.em_state import EmRun, EmSettings, check_setting_names
from common.clustering.initialisation import (
    CandidateStats,
    candidate_sensitivity,
    draw_candidates,
    init_from_candidates,
)
from common.clustering.model import (
    MAX_CANDIDATES,
    MAX_COMPONENTS,
    MAX_MODELS_PER_REQUEST,
    FeatureBox,
    GaussianMixtureParams,
)
from common.clustering.release import (
    LOGLIK_SENSITIVITY,
    decode_loglik,
    loglik_noise_sd,
    stats_sensitivity,
)
from common.clustering.selection import noise_loglik_loss
from common.clustering.statistics import SufficientStats, loglik_clip_range, m_step
from common.clustering.wire import (
    BootResult,
    EmRequest,
    EmResult,
    EvalRequest,
    EvalResult,
    InitRequest,
    InitResult,
    ModelRequest,
    parse_request,
    parse_result,
)
from common.dp.events import DpEvent, event_from_dict, event_to_dict
from common.errors import InvalidSpecError, InvalidUpdateError

__all__ = ["STATE_VERSION", "MixtureJob"]

STATE_VERSION: Final = 2

_RANGE_RTOL: Final = 1e-6
_STOP_Z: Final = 2.0

_Result = InitResult | EmResult | EvalResult | BootResult


class MixtureJob:
    """Shared machinery: one init release, EM rounds over several K in parallel, eval.

    Raises :class:`~common.errors.InvalidSpecError` on invalid settings and ``TypeError`` on
    a missing or unknown one (:class:`~common.clustering.em_state.EmSettings`).
    """

    def __init__(
        self, *, ks: Sequence[int], evaluate_final: bool, **settings: Unpack[EmSettings]
    ) -> None:
        check_setting_names(settings)
        covariance_type = settings["covariance_type"]
        bounds = settings["bounds"]
        max_rounds = settings["max_rounds"]
        tol = settings["tol"]
        noise_multiplier = settings["noise_multiplier"]
        seed = settings["seed"]
        min_variance = settings.get("min_variance", 1e-5)
        n_candidates = settings.get("n_candidates")
        init_noise_multiplier = settings.get("init_noise_multiplier")
        loglik_weight = settings.get("loglik_weight", 1.0)
        average_last = settings.get("average_last")
        min_rounds = settings.get("min_rounds", 3)
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
        self._runs: dict[int, EmRun] = {k: EmRun(k) for k in k_sorted}
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

    def _send(
        self, models: Sequence[tuple[EmRun, GaussianMixtureParams]]
    ) -> tuple[ModelRequest, ...]:
        """Each run's model (unit box) as a request entry in data units, kept as ``run.sent``."""
        out = []
        for run, unit in models:
            run.sent = self.box.params_from_unit(unit).to_dict()
            out.append(ModelRequest(key=run.key, params=run.sent))
        return tuple(out)

    def _next_request(self) -> dict[str, Any] | None:
        active = [r for r in self._runs.values() if r.stop_reason is None]
        if active:
            self._round += 1
            sent = []
            for run in active:
                assert run.params is not None
                sent.append((run, run.params))
            em = EmRequest(
                round=self._round,
                bounds=self._wire_bounds(),
                covariance_type="full" if self.covariance_type == "full" else "diag",
                noise_multiplier=self.noise_multiplier,
                loglik_weight=self.loglik_weight,
                models=self._send(sent),
            )
            self._phase = "em"
            self._pending = em.model_dump(mode="json")
        elif self.evaluate_final and self._phase == "em":
            self._round += 1
            ev = EvalRequest(
                round=self._round,
                bounds=self._wire_bounds(),
                covariance_type="full" if self.covariance_type == "full" else "diag",
                noise_multiplier=self.noise_multiplier,
                models=self._send([(run, self._final_unit(run)) for run in self._runs.values()]),
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

    def _sent_range(self, run: EmRun) -> tuple[float, float]:
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
        self, run: EmRun, total: SufficientStats, rng: tuple[float, float], n_sites: int
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

    def _small_change(self, run: EmRun, t: int) -> bool:
        """Whether history[t] − history[t−1] is within tol·n̂ + 2·sd of the change."""
        change = abs(run.history[t] - run.history[t - 1])
        noise = math.hypot(run.history_sd[t], run.history_sd[t - 1])
        return change <= self.tol * max(run.n_hat[t], 1.0) + _STOP_Z * noise

    def _checked_stats(
        self, i: int, run: EmRun, raw: Mapping[str, Any], rng: tuple[float, float]
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

    def _tail(self, run: EmRun) -> int:
        """How many of the last rounds the final estimate averages.

        ``average_last`` if set; otherwise the trailing rounds that are stationary: walking
        back from the last round, round i joins while ``|ℓ_{i+1} − ℓ_i|`` (the noisy
        log-likelihoods of the models the two rounds used) is within ``tol·n̂ + 2·sd``,
        where ``sd`` combines the release noise of both values and the predicted jitter of
        both models (:func:`common.clustering.selection.noise_loglik_loss`). Rounds still
        climbing are left out; rounds that differ only by noise are averaged.
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

    def _final_unit(self, run: EmRun) -> GaussianMixtureParams:
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

    def _model_noise_sd(self, run: EmRun) -> float:
        """sd of the log-likelihood the final model loses to the noise of its statistics."""
        if not run.stats:
            return 0.0
        r = self._tail(run)
        noise = math.sqrt(sum(sd * sd for sd in run.count_sd[-r:])) / r
        return noise_loglik_loss(self._final_unit(run), n=self.mean_rows(), noise_sd=noise)[1]

    def _loglik_estimate(self, run: EmRun) -> tuple[float, float]:
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
        """Everything needed to continue between two requests, JSON-safe
        (docs/clustering.md, "Checkpoints");
        :func:`~common.clustering.federated_em.machine_from_state` is the inverse."""
        return {
            "version": STATE_VERSION,
            "class": type(self).__name__,
            "config": self._config(),
            "rng": self._rng.bit_generator.state,
            "candidates": self._candidates.tolist(),
            "round": self._round,
            "phase": self._phase,
            "pending": self._pending,
            "events": [event_to_dict(e) for e in self._events],
            "n_sites_last_round": self.n_sites_last_round,
            "runs": [run.to_dict() for run in self._runs.values()],
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        runs = {run.K: run for run in (EmRun.from_dict(r) for r in state["runs"])}
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
        self._events = [event_from_dict(e) for e in state["events"]]
        self.n_sites_last_round = int(state["n_sites_last_round"])
