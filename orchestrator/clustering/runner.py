"""The job loop of a mixture job (``kind: gmm``): federated DP EM, K by distributed BIC.

The maths, the request/response protocol and the transport-free EM state machines are in
``common.clustering``; each round here sends its request to every participating site (as
``orchestrator.core.fanout`` does, but stopping at once on shutdown or cancellation), feeds the
noised statistics back, and records the round. The box the sites clip to is the union of
the bounds the sites *declare* for the job's columns (never learned from data). Sites hold
disjoint rows, so the released mixture's ε is the composition of one site's releases (every
site answers the same requests): the maximum over sites.

With the ``bootstrap:`` option, one more round follows the fit (either method): every site
that contributed releases noisy Poisson-bootstrap replicates of its statistics under the final
model (``common.clustering.federated_bootstrap.FederatedBootstrap``); the standard errors go into
``mixture.json`` and the card, and the release into every site's events and the card's ε. If
too few sites answer it, the mixture is released without standard errors, and its ε still
counts the bootstrap release (a site may have been charged before it failed).

Restarts. A mixture job survives an orchestrator restart (SIGTERM or SIGKILL) and resumes
where it stopped. Its state lives in the store:

* the *checkpoint* (``orchestrator.clustering.checkpoint``, in ``GmmStateRow``), written in
  the same transaction as each round it follows: the method, the columns, the declared box,
  the participating sites, the last committed round, the phase (``fit`` → ``boot`` →
  ``release``), the EM state machine with everything it holds (``common.clustering``,
  "Checkpoints": the seed, even one drawn from the clock, σ, every K's model, statistics,
  log-likelihood history and stopping state, the eval round's values for BIC, the pending
  request), the one-shot merged model, the bootstrap's standard errors;
* the *charged releases*: the job ledger's rows, one per site and release (round, events),
  written **before** the request is dispatched (write-ahead, like the sites' own ledgers:
  ``JobThread._send``).

On start the coordinator resumes every pending or running job; a mixture job reloads its
checkpoint, waits for its sites to dial back in, and sends the pending request again: the round
a restart interrupted is re-issued with fresh tasks (its statistics were never absorbed). The
sites price a request from its content (``common.clustering.federated_em.request_events`` gives
the same event), so a site's ledger for the job holds at most the releases it was sent, each at
most once, and the charged releases hold every one of them, the interrupted round's included.
The card's per-site ε is composed from the charged releases and the released ε is the maximum
over sites: it over-counts (a release sent but never answered) and never under-counts. A
re-issued round is one release more than the job planned, so after a restart the card's ε can
exceed ``dp.target_epsilon`` by it (the card says what was spent).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.clustering.bootstrap import BOOTSTRAP_NOTE, MixtureStandardErrors
from common.clustering.federated_bootstrap import FederatedBootstrap
from common.clustering.federated_em import (
    FederatedBIC,
    FederatedEM,
    request_events,
)
from common.clustering.merge import merge_mixtures
from common.clustering.model import GaussianMixtureParams
from common.domain import SiteStatus
from common.dp.accounting import EpsilonBound, compute_epsilon
from common.dp.events import DpEvent, event_to_dict
from common.errors import InvalidSpecError, InvalidUpdateError, JobFailedError
from common.specs import GmmJobSpec
from orchestrator.clustering.checkpoint import Progress
from orchestrator.clustering.setup import bootstrap_events, build_machine, declared_box
from orchestrator.core.fanout import FanOutResult
from orchestrator.core.store import ChargeRow, GmmStateRow, RoundRow, atomic_write
from orchestrator.jobs.accounting import charged_events
from orchestrator.jobs.base import JobThread
from orchestrator.jobs.model_card import model_card
from orchestrator.planning import ACCOUNTANT, online_holders
from orchestrator.views import site_status

log = logging.getLogger("dpfed.orchestrator")


class GmmRunner(JobThread):
    """The loop of one mixture job."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = GmmJobSpec.model_validate_json(self.store.job(self.job_id).spec_json)

    def _sites(self) -> list[SiteStatus]:
        """The online sites holding the dataset, once there are min_sites of them."""
        spec = self.spec
        sites: list[SiteStatus] = []

        def ready() -> list[SiteStatus] | None:
            nonlocal sites
            known = (site_status(r, self.broker) for r in self.store.each_site())
            sites = [s for s, _ in online_holders(known, spec.dataset)]
            return sites if len(sites) >= spec.min_sites else None

        def timed_out() -> list[SiteStatus]:
            raise JobFailedError(
                f"only {len(sites)} online site(s) expose dataset {spec.dataset!r}; the job "
                f"needs min_sites={spec.min_sites}"
            )

        return self._wait(ready, timeout_s=spec.start_timeout_s, on_timeout=timed_out)

    def _wait_for(self, site_ids: list[str]) -> list[str]:
        """A resumed job's sites, once they are back online (they dial in again with backoff
        after a restart); those still away after ``start_timeout_s`` are left out."""
        spec = self.spec

        def online() -> list[str]:
            return [s for s in site_ids if self.broker.online(s)]

        def timed_out() -> list[str]:
            back = online()
            if len(back) < spec.min_sites:
                raise JobFailedError(
                    f"after the restart only {len(back)} of the job's site(s) came back "
                    f"online ({', '.join(back) or 'none'}); min_sites={spec.min_sites}"
                )
            gone = sorted(set(site_ids) - set(back))
            self._event("warning", f"site(s) {', '.join(gone)} did not come back; left out")
            return back

        return self._wait(
            lambda: site_ids if len(online()) == len(site_ids) else None,
            timeout_s=spec.start_timeout_s,
            on_timeout=timed_out,
        )

    def _machine(self, bounds: np.ndarray) -> FederatedEM | FederatedBIC:
        return build_machine(self.spec, bounds)

    def _bootstrap_events(self, machine: FederatedEM | FederatedBIC) -> list[DpEvent]:
        return bootstrap_events(self.spec, machine)

    # ------------------------------------------------------------------ the job

    def _run(self) -> None:
        saved = self.store.gmm_state(self.job_id)
        prog = self._resume(saved) if saved is not None and saved.checkpoint else self._start()
        if prog.phase == "fit":
            if prog.method == "one_shot":
                self._one_shot(prog)
            else:
                self._fit(prog)
        if prog.phase == "boot":
            self._bootstrap_round(prog)
        self._release(prog)

    def _start(self) -> Progress:
        spec = self.spec
        sites = self._sites()
        columns, bounds = declared_box(spec, sites)
        machine = self._machine(bounds)
        site_ids = [s.site_id for s in sites]
        if spec.method != "one_shot":
            machine.initial_request()  # the first pending request, part of the checkpoint
        prog = Progress(
            method=spec.method,
            columns=columns,
            bounds=bounds,
            site_ids=site_ids,
            round=0,
            phase="fit",
            machine=machine,
        )
        self.store.save_gmm_state(
            self.job_id,
            checkpoint=prog.to_json(),
            state="running",
            participants={s: 0.0 for s in site_ids},
        )
        if spec.method != "one_shot":
            boot_events = self._bootstrap_events(machine)
            planned = compute_epsilon(
                machine.planned_events() + boot_events, delta=spec.dp.delta
            ).epsilon
            self._event(
                "info",
                f"federated EM over {len(site_ids)} site(s), K ∈ {spec.k_values}, columns "
                f"{', '.join(columns)}"
                f"{', then a bootstrap round' if boot_events else ''}; worst-case ε "
                f"{planned:.3g} at δ={spec.dp.delta:g}",
            )
        else:
            self.on_change(self.job_id)
        return prog

    def _resume(self, saved: GmmStateRow) -> Progress:
        """The job's state after its last committed round; every release sent so far is in
        the job ledger (and its account)."""
        prog = Progress.from_json(saved.checkpoint)
        interrupted = sorted(
            {c.round for c in self.store.charges(self.job_id)} - set(range(prog.round + 1))
        )
        self.store.update_job(self.job_id, state="running")
        self._event(
            "info",
            f"resuming after round {prog.round} ({prog.phase} phase) from its checkpoint"
            + (
                f"; the interrupted round {', '.join(map(str, interrupted))} is sent again, "
                "and what the sites may have been charged for it stays in ε"
                if interrupted
                else ""
            ),
        )
        if prog.phase != "release":
            prog.site_ids = self._wait_for(prog.site_ids)
        return prog

    # ------------------------------------------------------------------ releases

    def _send_release(
        self,
        site_ids: list[str],
        rnd: int,
        *,
        kind: str,
        request_json: str,
        events: list[DpEvent],
    ) -> FanOutResult:
        """Charge the release to every site in the job ledger (write-ahead, ``JobThread._send``:
        a restart anywhere after this leaves it counted, whether or not a site answered or
        was charged), then send it."""
        return self._send(
            site_ids,
            rnd,
            kind=kind,
            dataset=self.spec.dataset,
            delta=self.spec.dp.delta,
            request_json=request_json,
            # a noised statistic: the wire's kind for any release but a model update
            events=[("metrics", e) for e in events],
            timeout_s=self.spec.round_timeout_s,
        )

    def _record(self, rows: Sequence[ChargeRow]) -> None:
        """The job ledger's write-ahead charges, and the job's ε with them."""
        super()._record(rows)
        self.store.update_job(self.job_id, epsilon=self._epsilon().epsilon)

    def _site_epsilons(self) -> dict[str, EpsilonBound]:
        """Each site's ε, composed from every release it was sent (the job's account)."""
        return self.account.sync(self.store).exact().per_site

    def _epsilon(self) -> EpsilonBound:
        """The job's ε: the maximum over sites (disjoint rows)."""
        eps = self._site_epsilons()
        if not eps:
            return compute_epsilon([], delta=self.spec.dp.delta, accountant=ACCOUNTANT)
        return max(eps.values(), key=lambda b: b.epsilon)

    def _commit(self, prog: Progress, row: RoundRow) -> None:
        eps = self._epsilon().epsilon
        row.epsilon = eps
        self.store.commit_gmm_round(
            row, prog.to_json(), round=row.round, epsilon=eps, accountant=self._epsilon().accountant
        )
        self.on_change(self.job_id)

    # ------------------------------------------------------------------ phases

    def _fit(self, prog: Progress) -> None:
        """Federated EM from the checkpoint's pending request to the end."""
        spec = self.spec
        machine = prog.machine
        request = machine.pending_request
        if request is None and not machine.finished:
            request = machine.initial_request()
        while request is not None:
            self._abandon_if_stopped()
            rnd = prog.round + 1
            t0 = time.time()
            body = json.dumps({"columns": prog.columns, "request": request})
            res = self._send_release(
                prog.site_ids,
                rnd,
                kind="gmm",
                request_json=body,
                events=request_events(request),
            )
            for sid, f in sorted(res.failures.items()):
                self._event("warning", f"site {sid} failed round {rnd} ({f.code}): {f.reason}", sid)
            if len(res.updates) < spec.min_sites:
                raise JobFailedError(
                    f"round {rnd}: {len(res.updates)} site(s) answered, min_sites={spec.min_sites}"
                )
            try:
                results = [json.loads(u.meta.result_json) for _, u in sorted(res.updates.items())]
            except (ValueError, RecursionError):
                raise JobFailedError(f"round {rnd}: a site sent malformed statistics") from None
            request = machine.absorb(results)
            # A site that missed a request cannot rejoin the same EM run consistently.
            prog.site_ids = sorted(res.updates)
            prog.round = rnd
            if request is None:
                prog.phase = "boot" if spec.bootstrap is not None else "release"
            self._commit(
                prog,
                RoundRow(
                    job_id=self.job_id,
                    round=rnd,
                    site_ids=prog.site_ids,
                    num_examples=int(sum(u.meta.num_examples for u in res.updates.values())),
                    duration_s=time.time() - t0,
                ),
            )

    def _bootstrap_round(self, prog: Progress) -> None:
        """The bootstrap round: standard errors into ``prog`` (None if it failed); its release
        counts as soon as it is sent."""
        spec = self.spec
        assert spec.bootstrap is not None
        self._abandon_if_stopped()
        params = prog.merged if prog.merged is not None else prog.machine.result()
        boot_events = self._bootstrap_events(prog.machine)
        rnd = prog.round + 1
        boot = FederatedBootstrap(
            params,
            bounds=prog.bounds,
            replicates=spec.bootstrap.replicates,
            weight_cap=spec.bootstrap.weight_cap,
            noise_multiplier=boot_events[0].noise_multiplier,
            round=rnd,
        )
        t0 = time.time()
        res = self._send_release(
            prog.site_ids,
            rnd,
            kind="gmm",
            request_json=json.dumps({"columns": prog.columns, "request": boot.request()}),
            events=boot.planned_events(),
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
        prog.standard_errors = se
        prog.round = rnd
        prog.phase = "release"
        self._commit(
            prog,
            RoundRow(
                job_id=self.job_id,
                round=rnd,
                site_ids=sorted(res.updates),
                num_examples=int(sum(u.meta.num_examples for u in res.updates.values())),
                duration_s=time.time() - t0,
            ),
        )

    def _one_shot(self, prog: Progress) -> None:
        """Each site fits its own DP mixture; merge them into K components (Runnalls 2007)."""
        spec = self.spec
        machine = prog.machine
        assert spec.k is not None and isinstance(machine, FederatedEM)
        body = json.dumps(
            {
                "columns": prog.columns,
                "K": spec.k,
                "covariance_type": spec.covariance_type,
                "bounds": prog.bounds.tolist(),
                "max_rounds": spec.max_rounds,
                "tol": spec.tol,
                "noise_multiplier": machine.noise_multiplier,
                "seed": spec.seed if spec.seed is not None else 0,
            }
        )
        t0 = time.time()
        # The site charges the whole local run's worst case up front (site_agent.handlers.clustering).
        res = self._send_release(
            prog.site_ids,
            1,
            kind="gmm_local",
            request_json=body,
            events=machine.planned_events(),
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
        prog.merged = merge_mixtures(local, weights, spec.k)
        # Only the sites whose local fit is in the merged model resample their rows.
        prog.site_ids = sorted(res.updates)
        prog.round = 1
        prog.phase = "boot" if spec.bootstrap is not None else "release"
        self._commit(
            prog,
            RoundRow(
                job_id=self.job_id,
                round=1,
                site_ids=sorted(res.updates),
                num_examples=int(sum(weights)),
                duration_s=time.time() - t0,
            ),
        )

    def _release(self, prog: Progress) -> None:
        machine = prog.machine
        if prog.merged is not None:
            extra: dict[str, Any] = {
                "method": "one-shot: local DP mixtures merged by the Runnalls (2007) KL bound"
            }
            params = prog.merged
        else:
            extra = {"method": "federated DP EM"}
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
            params = machine.result()
        self._write_release(params, prog, extra=extra)

    def _write_release(
        self, params: GaussianMixtureParams, prog: Progress, *, extra: dict[str, Any]
    ) -> None:
        spec = self.spec
        standard_errors = prog.standard_errors
        site_eps = self._site_epsilons()
        eps = self._epsilon()
        released: dict[str, Any] = params.to_dict()
        if standard_errors is not None:
            released["standard_errors"] = standard_errors.to_dict()
        policies = self.store.site_policies()
        card = model_card(
            kind="gmm",
            job_id=self.job_id,
            name=spec.name or "",
            dataset=spec.dataset,
            model={
                "kind": "gaussian_mixture",
                "covariance_type": spec.covariance_type,
                "columns": prog.columns,
                "K": len(params.weights),
            },
            epsilon=eps.epsilon,
            delta=spec.dp.delta,
            accountant=eps.accountant,
            guarantee=(
                "Sample-level (ε, δ)-DP for each record at its own site, for every statistic "
                "the sites released (noised sufficient statistics, noised log-likelihoods"
                + (", noised bootstrap replicates" if spec.bootstrap is not None else "")
                + "), composed with the PRV accountant over every release each site was sent "
                "(a round interrupted by an orchestrator restart included); the mixture"
                + (" and its standard errors are" if spec.bootstrap is not None else " is")
                + " post-processing."
            ),
            rounds=len(self.store.rounds(self.job_id)),
            sites=[
                {
                    "site_id": s.site_id,
                    "epsilon": s.epsilon,
                    "events": [event_to_dict(e.event) for e in s.events],
                }
                for s in self.account.spends({sid: b.epsilon for sid, b in site_eps.items()})
            ],
            secure_noise={
                sid: bool(policies.get(sid, {}).get("secure_noise", False)) for sid in site_eps
            },
            bounds=prog.bounds.tolist(),
        )
        card.update(extra)
        if spec.bootstrap is not None:
            card["uncertainty"] = self._uncertainty_card(standard_errors, prog)
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

    def _uncertainty_card(self, se: MixtureStandardErrors | None, prog: Progress) -> dict[str, Any]:
        """The card's account of the bootstrap: what was released, at what cost, what the
        standard errors mean (and do not)."""
        spec = self.spec
        assert spec.bootstrap is not None
        # The site with the largest ε; its ε without its bootstrap release(s): those of the
        # bootstrap round (``prog.round``, the last; a re-sent one has the same number).
        site_eps = self._site_epsilons()
        top = max(site_eps, key=lambda s: site_eps[s].epsilon) if site_eps else None
        rest = [
            e.event
            for c in self.store.charges(self.job_id)
            if c.site_id == top and c.round != prog.round
            for e in charged_events(c.events)
        ]
        without = compute_epsilon(rest, delta=spec.dp.delta, accountant=ACCOUNTANT)
        boot_sigma = self._bootstrap_events(prog.machine)[0].noise_multiplier
        return {
            "method": (
                "DP Poisson bootstrap (Hanley & MacGibbon 2006; Chamandy et al. 2012) of the "
                "final model: one EM step per replicate"
            ),
            "replicates": spec.bootstrap.replicates,
            "weight_cap": spec.bootstrap.weight_cap,
            "weight_norm": None if se is None else se.weight_norm,
            "noise_multiplier": boot_sigma,
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
