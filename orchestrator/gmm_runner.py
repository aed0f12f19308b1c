"""The job loop of a mixture job (``kind: gmm``): federated DP EM, K by distributed BIC.

The maths and the request/response protocol are ``orchestrator.gmm_em`` (a transport-free
state machine) and ``common.gmm``; each round here sends its request to every participating
site (``orchestrator.fanout``), feeds the noised statistics back, and records the round. The
box the sites clip to is the union of the bounds the sites *declare* for the job's columns
(never learned from data). Sites hold disjoint rows, so the released mixture's ε is the
composition of one site's releases (every site answers the same requests): the maximum over
sites.

With the ``bootstrap:`` option, one more round follows the fit (either method): every site
that contributed releases noisy Poisson-bootstrap replicates of its statistics under the final
model (``orchestrator.gmm_em.FederatedBootstrap``); the standard errors go into
``mixture.json`` and the card, and the release into every site's events and the card's ε. If
too few sites answer it, the mixture is released without standard errors, and its ε still
counts the bootstrap release (a site may have been charged before it failed).

A mixture job is not checkpointed: after an orchestrator restart it starts again, and the
sites charge the repeated releases again (over-count, never under-count).
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np

from common.accounting import DpEvent, calibrate_noise_multiplier, compute_epsilon
from common.domain import SiteStatus
from common.errors import InvalidSpecError, InvalidUpdateError, JobFailedError
from common.gmm import (
    BOOTSTRAP_NOTE,
    GaussianMixtureParams,
    MixtureStandardErrors,
    merge_mixtures,
)
from common.specs import GmmJobSpec
from common.version import __version__
from orchestrator.fanout import fan_out
from orchestrator.gmm_em import FederatedBIC, FederatedBootstrap, FederatedEM, check_bootstrap_size
from orchestrator.job_thread import JobStopped, JobThread
from orchestrator.planning import ACCOUNTANT, online_holders, site_dataset
from orchestrator.store import RoundRow, atomic_write
from orchestrator.views import site_status

log = logging.getLogger("dpfed.orchestrator")


def declared_box(spec: GmmJobSpec, sites: list[SiteStatus]) -> tuple[list[str], np.ndarray]:
    """The job's columns and the union of the sites' declared [min, max] for each."""
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}
    columns: list[str] | None = list(spec.columns) if spec.columns else None
    for s in sites:
        ds = site_dataset(s, spec.dataset)
        assert ds is not None
        declared = {c.name: c for c in ds.schema}
        cols = columns or list(ds.columns)
        columns = cols
        for name in cols:
            c = declared.get(name)
            if c is None or c.type != "numeric" or c.min is None or c.max is None:
                raise InvalidSpecError(
                    f"column {name!r} of dataset {spec.dataset!r} has no declared numeric "
                    f"bounds at site {s.site_id}; a mixture job clips to declared bounds"
                )
            lows[name] = min(lows.get(name, c.min), c.min)
            highs[name] = max(highs.get(name, c.max), c.max)
    assert columns is not None
    if spec.bootstrap is not None:  # refuse before any budget is spent
        check_bootstrap_size(
            spec.bootstrap.replicates, max(spec.k_values), len(columns), spec.covariance_type
        )
    return columns, np.array([[lows[c], highs[c]] for c in columns], dtype=np.float64)


class GmmRunner(JobThread):
    """The loop of one mixture job."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = GmmJobSpec.model_validate_json(self.store.job(self.job_id).spec_json)

    def _sites(self) -> list[SiteStatus]:
        spec = self.spec
        deadline = time.time() + spec.start_timeout_s
        while True:
            known = [site_status(r, self.broker) for r in self.store.sites()]
            sites = [s for s, _ in online_holders(known, spec.dataset)]
            if len(sites) >= spec.min_sites:
                return sites
            if time.time() > deadline or self.stopping.is_set():
                raise JobFailedError(
                    f"only {len(sites)} online site(s) expose dataset {spec.dataset!r}; the job "
                    f"needs min_sites={spec.min_sites}"
                )
            time.sleep(self.poll_s)

    def _machine(self, bounds: np.ndarray) -> FederatedEM | FederatedBIC:
        spec = self.spec
        seed = spec.seed if spec.seed is not None else int(time.time())
        common: dict[str, Any] = dict(
            covariance_type=spec.covariance_type,
            bounds=bounds,
            max_rounds=spec.max_rounds,
            tol=spec.tol,
            seed=seed,
        )

        def build(sigma: float) -> FederatedEM | FederatedBIC:
            if spec.k is not None:
                return FederatedEM(K=spec.k, noise_multiplier=sigma, **common)
            return FederatedBIC(k_values=spec.k_values, noise_multiplier=sigma, **common)

        if spec.dp.noise_multiplier is not None:
            return build(spec.dp.noise_multiplier)
        assert spec.dp.target_epsilon is not None
        # Every release of the job uses one σ and q = 1: calibrate on the worst-case count.
        # A bootstrap release at the job's σ is one more; at its own σ it is a prior event.
        steps = sum(e.steps for e in build(1.0).planned_events())
        prior: list[DpEvent] = []
        if spec.bootstrap is not None:
            if spec.bootstrap.noise_multiplier is None:
                steps += 1
            else:
                prior.append(DpEvent(spec.bootstrap.noise_multiplier, 1.0, 1))
        sigma = calibrate_noise_multiplier(
            target_epsilon=spec.dp.target_epsilon,
            sample_rate=1.0,
            steps=steps,
            delta=spec.dp.delta,
            prior_events=prior,
            accountant=ACCOUNTANT,
        )
        return build(sigma)

    def _bootstrap_events(self, machine: FederatedEM | FederatedBIC) -> list[DpEvent]:
        """The bootstrap release's event (empty without the option)."""
        b = self.spec.bootstrap
        if b is None:
            return []
        sigma = machine.noise_multiplier if b.noise_multiplier is None else b.noise_multiplier
        return [DpEvent(sigma, 1.0, 1)]

    def _run(self) -> None:
        spec = self.spec
        sites = self._sites()
        columns, bounds = declared_box(spec, sites)
        machine = self._machine(bounds)
        if spec.method == "one_shot":
            self._one_shot(machine, columns, bounds, [s.site_id for s in sites])
            return
        boot_events = self._bootstrap_events(machine)
        planned = compute_epsilon(
            machine.planned_events() + boot_events, delta=spec.dp.delta
        ).epsilon
        site_ids = [s.site_id for s in sites]
        self.store.update_job(self.job_id, state="running", participants={s: 0.0 for s in site_ids})
        self._event(
            "info",
            f"federated EM over {len(site_ids)} site(s), K ∈ {spec.k_values}, columns "
            f"{', '.join(columns)}"
            f"{', then a bootstrap round' if boot_events else ''}; worst-case ε "
            f"{planned:.3g} at δ={spec.dp.delta:g}",
        )
        request: dict[str, Any] | None = machine.initial_request()
        rnd = 0
        while request is not None:
            self._check_cancelled()
            if self.stopping.is_set():
                return
            rnd += 1
            t0 = time.time()
            body = json.dumps({"columns": columns, "request": request})
            res = fan_out(
                self.broker,
                site_ids=site_ids,
                job_id=self.job_id,
                kind="gmm",
                dataset=spec.dataset,
                request_json=body,
                timeout_s=spec.round_timeout_s,
                round_=rnd,
            )
            for sid, f in sorted(res.failures.items()):
                self._event("warning", f"site {sid} failed round {rnd} ({f.code}): {f.reason}", sid)
            if len(res.updates) < spec.min_sites:
                raise JobFailedError(
                    f"round {rnd}: {len(res.updates)} site(s) answered, min_sites={spec.min_sites}"
                )
            # A site that missed a request cannot rejoin the same EM run consistently.
            site_ids = sorted(res.updates)
            try:
                results = [json.loads(u.meta.result_json) for _, u in sorted(res.updates.items())]
            except (ValueError, RecursionError):
                raise JobFailedError(f"round {rnd}: a site sent malformed statistics") from None
            request = machine.absorb(results)
            eps = compute_epsilon(machine.privacy_events, delta=spec.dp.delta).epsilon
            self.store.commit_round(
                RoundRow(
                    job_id=self.job_id,
                    round=rnd,
                    site_ids=site_ids,
                    num_examples=int(sum(u.meta.num_examples for u in res.updates.values())),
                    duration_s=time.time() - t0,
                    epsilon=eps,
                ),
                [],
                round=rnd,
                epsilon=eps,
                accountant=ACCOUNTANT,
            )
            self.on_change(self.job_id)
        events = machine.privacy_events
        se = None
        if spec.bootstrap is not None:
            se, events = self._bootstrap_round(
                machine.result(), columns, bounds, site_ids, rnd + 1, events, boot_events
            )
        self._release(machine, columns, bounds, site_ids, events, se)

    def _bootstrap_round(
        self,
        params: GaussianMixtureParams,
        columns: list[str],
        bounds: np.ndarray,
        site_ids: list[str],
        rnd: int,
        prior: list[DpEvent],
        boot_events: list[DpEvent],
    ) -> tuple[MixtureStandardErrors | None, list[DpEvent]]:
        """The bootstrap round; returns the standard errors (None if it failed) and the job's
        events including the bootstrap release, which counts as soon as it is sent."""
        spec = self.spec
        assert spec.bootstrap is not None
        self._check_cancelled()
        if self.stopping.is_set():
            raise JobStopped()
        boot = FederatedBootstrap(
            params,
            bounds=bounds,
            replicates=spec.bootstrap.replicates,
            weight_cap=spec.bootstrap.weight_cap,
            noise_multiplier=boot_events[0].noise_multiplier,
            round=rnd,
        )
        events = prior + boot.planned_events()
        t0 = time.time()
        res = fan_out(
            self.broker,
            site_ids=site_ids,
            job_id=self.job_id,
            kind="gmm",
            dataset=spec.dataset,
            request_json=json.dumps({"columns": columns, "request": boot.request()}),
            timeout_s=spec.round_timeout_s,
            round_=rnd,
        )
        for sid, f in sorted(res.failures.items()):
            self._event(
                "warning", f"site {sid} failed the bootstrap round ({f.code}): {f.reason}", sid
            )
        se: MixtureStandardErrors | None = None
        if len(res.updates) < spec.min_sites:
            self._event(
                "warning",
                f"bootstrap round: {len(res.updates)} site(s) answered, min_sites="
                f"{spec.min_sites}; the mixture is released without standard errors",
            )
        else:
            try:
                results = [json.loads(u.meta.result_json) for _, u in sorted(res.updates.items())]
                se = boot.absorb(results)
            except (ValueError, RecursionError, InvalidUpdateError) as err:
                self._event(
                    "warning",
                    f"bootstrap round: malformed replicates ({err}); the mixture is released "
                    "without standard errors",
                )
        eps = compute_epsilon(events, delta=spec.dp.delta).epsilon
        self.store.commit_round(
            RoundRow(
                job_id=self.job_id,
                round=rnd,
                site_ids=sorted(res.updates),
                num_examples=int(sum(u.meta.num_examples for u in res.updates.values())),
                duration_s=time.time() - t0,
                epsilon=eps,
            ),
            [],
            round=rnd,
            epsilon=eps,
            accountant=ACCOUNTANT,
        )
        self.on_change(self.job_id)
        return se, events

    def _one_shot(
        self,
        machine: FederatedEM | FederatedBIC,
        columns: list[str],
        bounds: np.ndarray,
        site_ids: list[str],
    ) -> None:
        """Each site fits its own DP mixture; merge them into K components (Runnalls 2007)."""
        spec = self.spec
        assert spec.k is not None and isinstance(machine, FederatedEM)
        sigma = machine.noise_multiplier
        planned = machine.planned_events()
        self.store.update_job(self.job_id, state="running", participants={s: 0.0 for s in site_ids})
        body = json.dumps(
            {
                "columns": columns,
                "K": spec.k,
                "covariance_type": spec.covariance_type,
                "bounds": bounds.tolist(),
                "max_rounds": spec.max_rounds,
                "tol": spec.tol,
                "noise_multiplier": sigma,
                "seed": spec.seed if spec.seed is not None else 0,
            }
        )
        t0 = time.time()
        res = fan_out(
            self.broker,
            site_ids=site_ids,
            job_id=self.job_id,
            kind="gmm_local",
            dataset=spec.dataset,
            request_json=body,
            timeout_s=spec.round_timeout_s,
        )
        for sid, f in sorted(res.failures.items()):
            self._event("warning", f"site {sid} failed its local fit ({f.code}): {f.reason}", sid)
        local, weights = [], []
        for _sid, upd in sorted(res.updates.items()):
            try:
                body_ = json.loads(upd.meta.result_json)
                local.append(GaussianMixtureParams.from_dict(body_["mixture"]))
                weights.append(float(body_["rows"]))
            except (ValueError, KeyError, TypeError, RecursionError, InvalidSpecError):
                self._event("warning", f"site {_sid} sent a malformed mixture", _sid)
        if len(local) < spec.min_sites:
            raise JobFailedError(f"{len(local)} local fit(s) received, min_sites={spec.min_sites}")
        merged = merge_mixtures(local, weights, spec.k)
        boot_events = self._bootstrap_events(machine)
        eps = compute_epsilon(planned, delta=spec.dp.delta).epsilon
        self.store.commit_round(
            RoundRow(
                job_id=self.job_id,
                round=1,
                site_ids=sorted(res.updates),
                num_examples=int(sum(weights)),
                duration_s=time.time() - t0,
                epsilon=eps,
            ),
            [],
            round=1,
            epsilon=eps,
            accountant=ACCOUNTANT,
        )
        events, se = planned, None
        if boot_events:
            # Only the sites whose local fit is in the merged model resample their rows.
            se, events = self._bootstrap_round(
                merged, columns, bounds, sorted(res.updates), 2, planned, boot_events
            )
        self._write_release(
            merged,
            events,
            columns,
            bounds,
            sorted(res.updates),
            extra={"method": "one-shot: local DP mixtures merged by the Runnalls (2007) KL bound"},
            standard_errors=se,
        )

    def _release(
        self,
        machine: FederatedEM | FederatedBIC,
        columns: list[str],
        bounds: np.ndarray,
        site_ids: list[str],
        events: list[DpEvent],
        standard_errors: MixtureStandardErrors | None,
    ) -> None:
        extra: dict[str, Any] = {"method": "federated DP EM"}
        if isinstance(machine, FederatedBIC):
            curve = machine.bic_curve
            extra["model_selection"] = {
                "criterion": "distributed BIC (noisy log-likelihoods summed over sites)",
                "bic": {str(k): v for k, v in sorted(curve.items())},
                "bic_sd": {str(k): v for k, v in sorted(machine.bic_sd.items())},
                "chosen_k": machine.chosen_k,
            }
        else:
            extra["history"] = [h for h in machine.history if math.isfinite(h)]
        self._write_release(
            machine.result(),
            events,
            columns,
            bounds,
            site_ids,
            extra=extra,
            standard_errors=standard_errors,
        )

    def _write_release(
        self,
        params: GaussianMixtureParams,
        events: list[DpEvent],
        columns: list[str],
        bounds: np.ndarray,
        site_ids: list[str],
        *,
        extra: dict[str, Any],
        standard_errors: MixtureStandardErrors | None = None,
    ) -> None:
        spec = self.spec
        eps = compute_epsilon(events, delta=spec.dp.delta, accountant=ACCOUNTANT)
        released: dict[str, Any] = params.to_dict()
        if standard_errors is not None:
            released["standard_errors"] = standard_errors.to_dict()
        card: dict[str, Any] = {
            "job_id": self.job_id,
            "kind": "gmm",
            "name": spec.name or "",
            "dataset": spec.dataset,
            "model": {
                "kind": "gaussian_mixture",
                "covariance_type": spec.covariance_type,
                "columns": columns,
                "K": len(params.weights),
            },
            "epsilon": eps.epsilon,
            "delta": spec.dp.delta,
            "accountant": eps.accountant,
            "privacy_unit": "record (sample-level DP at each site)",
            "guarantee": (
                "Sample-level (ε, δ)-DP for each record at its own site, for every statistic "
                "the sites released (noised sufficient statistics, noised log-likelihoods"
                + (", noised bootstrap replicates" if spec.bootstrap is not None else "")
                + "), composed with the PRV accountant; the mixture"
                + (" and its standard errors are" if spec.bootstrap is not None else " is")
                + " post-processing."
            ),
            "rounds": len(self.store.rounds(self.job_id)),
            "sites": [
                {
                    "site_id": s,
                    "epsilon": eps.epsilon,
                    "events": [
                        {
                            "noise_multiplier": e.noise_multiplier,
                            "sample_rate": e.sample_rate,
                            "steps": e.steps,
                        }
                        for e in events
                    ],
                }
                for s in site_ids
            ],
            "bounds": bounds.tolist(),
            "released_at": time.time(),
            "dpfed_version": __version__,
        }
        card.update(extra)
        if spec.bootstrap is not None:
            card["uncertainty"] = self._uncertainty_card(standard_errors, events)
        out = self.store.paths.model_dir(self.job_id)
        atomic_write(out / "mixture.json", json.dumps(released, indent=2).encode())
        atomic_write(out / "model_card.json", json.dumps(card, indent=2).encode())
        self.store.update_job(
            self.job_id, state="completed", model_released=True, epsilon=eps.epsilon
        )
        self._event(
            "info",
            f"mixture released: K={len(params.weights)}, ε={eps.epsilon:.4g}, δ={spec.dp.delta:g}",
        )

    def _uncertainty_card(
        self, se: MixtureStandardErrors | None, events: list[DpEvent]
    ) -> dict[str, Any]:
        """The card's account of the bootstrap: what was released, at what cost, what the
        standard errors mean (and do not)."""
        spec = self.spec
        assert spec.bootstrap is not None
        boot_event = events[-1]  # the bootstrap release is always the job's last event
        without = compute_epsilon(events[:-1], delta=spec.dp.delta, accountant=ACCOUNTANT)
        return {
            "method": (
                "DP Poisson bootstrap (Hanley & MacGibbon 2006; Chamandy et al. 2012) of the "
                "final model: one EM step per replicate"
            ),
            "replicates": spec.bootstrap.replicates,
            "weight_cap": spec.bootstrap.weight_cap,
            "weight_norm": None if se is None else se.weight_norm,
            "noise_multiplier": boot_event.noise_multiplier,
            "epsilon_without_bootstrap": without.epsilon,
            "standard_errors": (
                "in mixture.json (standard_errors): weights, means, variances (diagonal of the "
                "covariances), data units; they include the DP noise of the bootstrap release "
                "(conservative)"
                if se is not None
                else "not released: the bootstrap round failed (its release is still in ε)"
            ),
            "note": BOOTSTRAP_NOTE,
        }
