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
where it stopped. Its state lives in the store (``orchestrator.core.store.GmmStateRow``, JSON):

* the *checkpoint*, written in the same transaction as each round it follows: the method, the
  columns, the declared box, the participating sites, the last committed round, the phase
  (``fit`` → ``boot`` → ``release``), the EM state machine with everything it holds
  (``common.clustering``, "Checkpoints": the seed, even one drawn from the clock, σ, every K's
  model, statistics, log-likelihood history and stopping state, the eval round's values for
  BIC, the pending request), the one-shot merged model, the bootstrap's standard errors;
* the *charged releases*: per site, every release it was sent (round, kind, ``DpEvent``),
  written **before** the request is dispatched (write-ahead, like the sites' own ledgers).

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
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.clustering.bootstrap import BOOTSTRAP_NOTE, MixtureStandardErrors
from common.clustering.federated_bootstrap import FederatedBootstrap, check_bootstrap_size
from common.clustering.federated_em import (
    FederatedBIC,
    FederatedEM,
    machine_from_state,
    request_events,
)
from common.clustering.merge import merge_mixtures
from common.clustering.model import GaussianMixtureParams
from common.domain import SiteStatus
from common.dp.accounting import EpsilonBound, compute_epsilon
from common.dp.calibrate import calibrate_noise_multiplier
from common.dp.events import DpEvent
from common.errors import InvalidSpecError, InvalidUpdateError, JobFailedError
from common.specs import GmmJobSpec
from common.version import __version__
from orchestrator import job_ledger
from orchestrator.core.fanout import FanOutResult, fan_out
from orchestrator.core.store import GmmStateRow, RoundRow, atomic_write
from orchestrator.job_thread import JobStopped, JobThread
from orchestrator.planning import ACCOUNTANT, online_holders, site_dataset
from orchestrator.release import LIMITS, noise_limits
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


_CHECKPOINT_VERSION = 1
_PHASES = ("fit", "boot", "release")


@dataclass
class _Progress:
    """Where a mixture job stands after its last committed round (the checkpoint)."""

    method: str
    columns: list[str]
    bounds: np.ndarray
    site_ids: list[str]
    round: int  # the last committed round (0: none yet)
    phase: str  # fit → (boot →) release
    machine: FederatedEM | FederatedBIC
    merged: GaussianMixtureParams | None = None  # one-shot's merged model
    standard_errors: MixtureStandardErrors | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": _CHECKPOINT_VERSION,
                "method": self.method,
                "columns": self.columns,
                "bounds": self.bounds.tolist(),
                "site_ids": self.site_ids,
                "round": self.round,
                "phase": self.phase,
                "machine": self.machine.state_dict(),
                "merged": None if self.merged is None else self.merged.to_dict(),
                "standard_errors": (
                    None if self.standard_errors is None else self.standard_errors.to_dict()
                ),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> _Progress:
        try:
            d = json.loads(text)
            if d["version"] != _CHECKPOINT_VERSION or d["phase"] not in _PHASES:
                raise ValueError(f"version {d['version']!r}, phase {d['phase']!r}")
            return cls(
                method=str(d["method"]),
                columns=[str(c) for c in d["columns"]],
                bounds=np.asarray(d["bounds"], dtype=np.float64),
                site_ids=[str(s) for s in d["site_ids"]],
                round=int(d["round"]),
                phase=str(d["phase"]),
                machine=machine_from_state(d["machine"]),
                merged=None
                if d["merged"] is None
                else GaussianMixtureParams.from_dict(d["merged"]),
                standard_errors=(
                    None
                    if d["standard_errors"] is None
                    else MixtureStandardErrors.from_dict(d["standard_errors"])
                ),
            )
        except (KeyError, TypeError, ValueError, InvalidSpecError, RecursionError) as err:
            raise JobFailedError(
                f"the job's checkpoint is unreadable ({err}); cannot resume"
            ) from None


# One charged release: {"round", "release", "noise_multiplier", "sample_rate", "steps"}.
_Charged = dict[str, list[dict[str, Any]]]


def _charged_event(c: dict[str, Any]) -> DpEvent:
    return DpEvent(float(c["noise_multiplier"]), float(c["sample_rate"]), int(c["steps"]))


def _event_dict(e: DpEvent) -> dict[str, Any]:
    return {"noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate, "steps": e.steps}


def build_machine(spec: GmmJobSpec, bounds: np.ndarray) -> FederatedEM | FederatedBIC:
    """The job's EM (fixed K) or BIC (K range) machine, with σ calibrated to
    ``dp.target_epsilon`` when the spec asks for one.

    Raises:
        PrivacyAccountingError: no σ meets the target (e.g. a bootstrap σ that alone spends it).
    """
    # The seed is part of the checkpoint, so a resumed job continues the same run.
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


class GmmRunner(JobThread):
    """The loop of one mixture job."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = GmmJobSpec.model_validate_json(self.store.job(self.job_id).spec_json)
        self._charged: _Charged = {}

    def _sites(self) -> list[SiteStatus]:
        spec = self.spec
        deadline = time.time() + spec.start_timeout_s
        while True:
            known = (site_status(r, self.broker) for r in self.store.each_site())
            sites = [s for s, _ in online_holders(known, spec.dataset)]
            if len(sites) >= spec.min_sites:
                return sites
            self._check_cancelled()
            if self.stopping.is_set():
                raise JobStopped()  # shutting down: the job starts after the restart
            if time.time() > deadline:
                raise JobFailedError(
                    f"only {len(sites)} online site(s) expose dataset {spec.dataset!r}; the job "
                    f"needs min_sites={spec.min_sites}"
                )
            time.sleep(self.poll_s)

    def _wait_for(self, site_ids: list[str]) -> list[str]:
        """A resumed job's sites, once they are back online (they dial in again with backoff
        after a restart); those still away after ``start_timeout_s`` are left out."""
        spec = self.spec
        deadline = time.time() + spec.start_timeout_s
        while True:
            online = [s for s in site_ids if self.broker.online(s)]
            if len(online) == len(site_ids):
                return online
            self._check_cancelled()
            if self.stopping.is_set():
                raise JobStopped()
            if time.time() > deadline:
                if len(online) < spec.min_sites:
                    raise JobFailedError(
                        f"after the restart only {len(online)} of the job's site(s) came back "
                        f"online ({', '.join(online) or 'none'}); min_sites={spec.min_sites}"
                    )
                gone = sorted(set(site_ids) - set(online))
                self._event("warning", f"site(s) {', '.join(gone)} did not come back; left out")
                return online
            time.sleep(self.poll_s)

    def _machine(self, bounds: np.ndarray) -> FederatedEM | FederatedBIC:
        return build_machine(self.spec, bounds)

    def _bootstrap_events(self, machine: FederatedEM | FederatedBIC) -> list[DpEvent]:
        """The bootstrap release's event (empty without the option)."""
        b = self.spec.bootstrap
        if b is None:
            return []
        sigma = machine.noise_multiplier if b.noise_multiplier is None else b.noise_multiplier
        return [DpEvent(sigma, 1.0, 1)]

    # ------------------------------------------------------------------ the job

    def _run(self) -> None:
        row = self.store.job(self.job_id)
        if row.state in ("completed", "failed"):
            return
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

    def _start(self) -> _Progress:
        spec = self.spec
        sites = self._sites()
        columns, bounds = declared_box(spec, sites)
        machine = self._machine(bounds)
        site_ids = [s.site_id for s in sites]
        if spec.method != "one_shot":
            machine.initial_request()  # the first pending request, part of the checkpoint
        prog = _Progress(
            method=spec.method,
            columns=columns,
            bounds=bounds,
            site_ids=site_ids,
            round=0,
            phase="fit",
            machine=machine,
        )
        self._charged = {}
        self.store.save_gmm_state(
            self.job_id,
            checkpoint=prog.to_json(),
            charged=json.dumps(self._charged),
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

    def _resume(self, saved: GmmStateRow) -> _Progress:
        """The job's state after its last committed round, with every release sent so far."""
        prog = _Progress.from_json(saved.checkpoint)
        try:
            self._charged = json.loads(saved.charged) if saved.charged else {}
            for records in self._charged.values():
                for c in records:
                    _charged_event(c), int(c["round"]), str(c["release"])
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise JobFailedError(
                f"the job's charged releases are unreadable ({err}); cannot resume"
            ) from None
        interrupted = sorted(
            {int(c["round"]) for recs in self._charged.values() for c in recs}
            - set(range(prog.round + 1))
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

    def _send(
        self,
        site_ids: list[str],
        rnd: int,
        *,
        kind: str,
        request_json: str,
        events: list[DpEvent],
        release: str,
    ) -> FanOutResult:
        """Record the release for every site (write-ahead), then send it: a restart anywhere
        after this leaves it counted, whether or not a site answered (or was charged)."""
        for sid in site_ids:
            self._charged.setdefault(sid, []).extend(
                {"round": rnd, "release": release, **_event_dict(e)} for e in events
            )
        self.store.save_gmm_state(
            self.job_id, charged=json.dumps(self._charged), epsilon=self._epsilon().epsilon
        )
        # The job ledger that status and ledger read (orchestrator.job_ledger), like training's.
        job_ledger.record(
            self.store,
            [
                job_ledger.charge_row(
                    job_id=self.job_id,
                    round=rnd,
                    site_id=sid,
                    dataset=self.spec.dataset,
                    task_id=uuid.uuid4().hex,
                    # a noised statistic: the wire's kind for any release but a model update
                    events=[("metrics", e) for e in events],
                    delta=self.spec.dp.delta,
                )
                for sid in site_ids
            ],
        )
        return self._fan_out(site_ids, rnd, kind=kind, request_json=request_json)

    def _fan_out(
        self, site_ids: list[str], rnd: int, *, kind: str, request_json: str
    ) -> FanOutResult:
        """``orchestrator.core.fanout.fan_out`` that also stops at cancellation or shutdown (the
        round is then sent again after the restart)."""

        def abandon_if_stopped() -> None:
            self._check_cancelled()
            if self.stopping.is_set():
                raise JobStopped()

        return fan_out(
            self.broker,
            site_ids=site_ids,
            job_id=self.job_id,
            kind=kind,
            dataset=self.spec.dataset,
            request_json=request_json,
            timeout_s=self.spec.round_timeout_s,
            poll_s=self.poll_s,
            round_=rnd,
            rounds=1,
            check=abandon_if_stopped,
        )

    def _site_epsilons(self) -> dict[str, EpsilonBound]:
        """Each site's ε, composed from every release it was sent (the resumable record, which
        also holds what a job started before the job ledger had), by the one composition
        every job kind uses (``orchestrator.job_ledger.job_epsilon``)."""
        rows = [
            job_ledger.charge_row(
                job_id=self.job_id,
                round=int(c["round"]),
                site_id=sid,
                dataset=self.spec.dataset,
                task_id=f"{sid}/{i}",
                events=[(str(c["release"]), _charged_event(c))],
                delta=self.spec.dp.delta,
            )
            for sid, records in sorted(self._charged.items())
            for i, c in enumerate(records)
        ]
        return job_ledger.job_epsilon(rows, delta=self.spec.dp.delta).per_site

    def _epsilon(self) -> EpsilonBound:
        """The job's ε: the maximum over sites (disjoint rows)."""
        eps = self._site_epsilons()
        if not eps:
            return compute_epsilon([], delta=self.spec.dp.delta, accountant=ACCOUNTANT)
        return max(eps.values(), key=lambda b: b.epsilon)

    def _commit(self, prog: _Progress, row: RoundRow) -> None:
        eps = self._epsilon().epsilon
        row.epsilon = eps
        self.store.commit_gmm_round(
            row, prog.to_json(), round=row.round, epsilon=eps, accountant=self._epsilon().accountant
        )
        self.on_change(self.job_id)

    # ------------------------------------------------------------------ phases

    def _fit(self, prog: _Progress) -> None:
        """Federated EM from the checkpoint's pending request to the end."""
        spec = self.spec
        machine = prog.machine
        request = machine.pending_request
        if request is None and not machine.finished:
            request = machine.initial_request()
        while request is not None:
            self._check_cancelled()
            if self.stopping.is_set():
                raise JobStopped()
            rnd = prog.round + 1
            t0 = time.time()
            body = json.dumps({"columns": prog.columns, "request": request})
            res = self._send(
                prog.site_ids,
                rnd,
                kind="gmm",
                request_json=body,
                events=request_events(request),
                release=str(request.get("kind", "gmm")),
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

    def _bootstrap_round(self, prog: _Progress) -> None:
        """The bootstrap round: standard errors into ``prog`` (None if it failed); its release
        counts as soon as it is sent."""
        spec = self.spec
        assert spec.bootstrap is not None
        self._check_cancelled()
        if self.stopping.is_set():
            raise JobStopped()
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
        res = self._send(
            prog.site_ids,
            rnd,
            kind="gmm",
            request_json=json.dumps({"columns": prog.columns, "request": boot.request()}),
            events=boot.planned_events(),
            release="gmm.boot",
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

    def _one_shot(self, prog: _Progress) -> None:
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
        res = self._send(
            prog.site_ids,
            1,
            kind="gmm_local",
            request_json=body,
            events=machine.planned_events(),
            release="gmm.local",
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

    def _release(self, prog: _Progress) -> None:
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
        self, params: GaussianMixtureParams, prog: _Progress, *, extra: dict[str, Any]
    ) -> None:
        spec = self.spec
        standard_errors = prog.standard_errors
        site_eps = self._site_epsilons()
        eps = self._epsilon()
        released: dict[str, Any] = params.to_dict()
        if standard_errors is not None:
            released["standard_errors"] = standard_errors.to_dict()
        policies = self.store.site_policies()
        declared = {
            sid: bool(policies.get(sid, {}).get("secure_noise", False)) for sid in self._charged
        }
        card: dict[str, Any] = {
            "job_id": self.job_id,
            "kind": "gmm",
            "name": spec.name or "",
            "dataset": spec.dataset,
            "model": {
                "kind": "gaussian_mixture",
                "covariance_type": spec.covariance_type,
                "columns": prog.columns,
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
                + "), composed with the PRV accountant over every release each site was sent "
                "(a round interrupted by an orchestrator restart included); the mixture"
                + (" and its standard errors are" if spec.bootstrap is not None else " is")
                + " post-processing."
            ),
            "limits": LIMITS + noise_limits(declared),
            "rounds": len(self.store.rounds(self.job_id)),
            "sites": [
                {
                    "site_id": sid,
                    "epsilon": site_eps[sid].epsilon,
                    "noise_source": "csprng" if declared[sid] else "standard",
                    "events": [_event_dict(_charged_event(c)) for c in records],
                }
                for sid, records in sorted(self._charged.items())
            ],
            "bounds": prog.bounds.tolist(),
            "released_at": time.time(),
            "dpfed_version": __version__,
        }
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

    def _uncertainty_card(
        self, se: MixtureStandardErrors | None, prog: _Progress
    ) -> dict[str, Any]:
        """The card's account of the bootstrap: what was released, at what cost, what the
        standard errors mean (and do not)."""
        spec = self.spec
        assert spec.bootstrap is not None
        # The site with the largest ε; its ε without its bootstrap release(s).
        site_eps = self._site_epsilons()
        top = max(site_eps, key=lambda s: site_eps[s].epsilon) if site_eps else None
        records = self._charged.get(top, []) if top is not None else []
        rest = [_charged_event(c) for c in records if c["release"] != "gmm.boot"]
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
