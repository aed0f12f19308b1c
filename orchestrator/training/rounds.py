"""The round loop of one training job (no gRPC here: the broker stands between).

Each round: send the global model to every participating site, check each update as it
arrives against what its task allows (``orchestrator.training.update_bounds``: the report must match
the task, the norm must fit the task's bound), fold it into a running weighted mean (FedAvg,
no site's share above ``aggregation.max_site_weight``) or keep it for a coordinate-wise robust
aggregate, stop when every site answered or the deadline passed, require ``min_sites``
accepted updates, apply the mean delta, checkpoint, and account. After the last round the
model is released with its model card.

Privacy: the job's ε is composed per site from the events the orchestrator *assigned* for each
update it accepted (never the numbers a site reports), and the released ε is the maximum over
sites (disjoint records: parallel composition). Averaging noised deltas is post-processing.
Each update is charged to the job when it is accepted, so a round that a crash or a shutdown
interrupts (and that is then run again) still counts what it received.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from common.domain import SiteStatus, TaskAssignment, UpdateMeta
from common.errors import InvalidUpdateError, JobFailedError
from common.specs import JobSpec, job_spec_from_json
from common.training.models import build_model, save_model
from common.training.schedule import task_schedule
from common.training.tensors import (
    SafetensorsPieces,
    iter_chunks,
    l2_norm,
    state_from_bytes,
    state_to_bytes,
)
from orchestrator.admission import admit, release_at_end
from orchestrator.core import spool
from orchestrator.core.broker import FailureResult, Result, UpdateResult
from orchestrator.core.store import RoundRow, atomic_write
from orchestrator.jobs.accounting import charge_row
from orchestrator.jobs.base import JobStopped, JobThread
from orchestrator.metric_pooling import pool_metrics, pooled_to_dict
from orchestrator.planning import ACCOUNTANT, plan_site, site_dataset
from orchestrator.schemas import job_disagreement
from orchestrator.training.aggregation import (
    CoordinateRound,
    FedAvgRound,
    RoundAggregation,
    apply_delta,
    capped_weights,
)
from orchestrator.training.auditing import run_audit
from orchestrator.training.card import training_card
from orchestrator.training.posterior import released_state
from orchestrator.training.quantiles import release_quantile_edges
from orchestrator.training.site_dp import SiteDPAggregation, sum_noise_multiplier
from orchestrator.training.update_bounds import (
    MAX_STEPS_PER_TASK,
    Assignment,
    Matched,
    assigned_worst_case,
    check_received,
    match_report,
)
from orchestrator.views import site_status

log = logging.getLogger("dpfed.orchestrator")


@dataclass(frozen=True)
class Participant:
    site_id: str
    noise_multiplier: float
    num_examples: int


class JobRunner(JobThread):
    """The round loop of one training job."""

    accountant_used: str = ACCOUNTANT

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec: JobSpec = job_spec_from_json(self.store.job(self.job_id).spec_json)
        self._held: list[spool.Payload] = []  # closed when the round ends

    def run(self) -> None:
        try:
            super().run()
        finally:  # the sites' reservations end with the job (not with a shutdown)
            release_at_end(
                store=self.store,
                broker=self.broker,
                job_id=self.job_id,
                spec=self.spec,
                stopping=self.stopping,
            )

    def _run(self) -> None:
        row = self.store.job(self.job_id)
        participants = self._participants(row.participants)
        # Quantile bin edges (encoding.numeric: quantile) are released once, before round 1.
        self.spec = release_quantile_edges(
            store=self.store,
            broker=self.broker,
            job_id=self.job_id,
            spec=self.spec,
            site_ids=[p.site_id for p in participants],
            check=self._abandon_if_stopped,
            event=self._event,
            charge_ahead=self._charge_ahead,
        )
        self.store.update_job(self.job_id, state="running")
        self.on_change(self.job_id)
        state = self._load_global(row.round)
        for rnd in range(row.round + 1, self.spec.rounds + 1):
            self._check_cancelled()
            if self.stopping.is_set():
                return  # orchestrator shutting down: resume from the checkpoint later
            state, participants = self._round(rnd, state, participants)
        if self.stopping.is_set():
            return
        self._release(state)

    # ------------------------------------------------------------------ participants

    def _participants(self, fixed: dict[str, float]) -> list[Participant]:
        """Sites with the dataset, online, at least min_sites of them (waits up to
        start_timeout_s); a resumed job's (``fixed``) once they are back online."""
        spec = self.spec
        left_out: set[str] = set()  # sites whose registered size the job cannot take
        excluded: dict[str, str] = {}
        online: list[Participant] = []

        def ready() -> list[Participant] | None:
            nonlocal online
            chosen = [
                p
                for r in self.store.each_site()  # row by row, in site id order
                if (p := self._candidate(site_status(r, self.broker), fixed, excluded, left_out))
            ]
            # A resumed job must also wait for its sites: after an orchestrator restart they
            # dial back in with backoff, and a task dispatched to a site with no session yet
            # fails at once, so the first resumed round would fail with no update at all.
            online = [p for p in chosen if not fixed or self.broker.online(p.site_id)]
            need = min(spec.min_sites, len(chosen)) if fixed else spec.min_sites
            return chosen if len(online) >= need else None

        def timed_out() -> list[Participant]:
            raise JobFailedError(
                f"only {len(online)} online site(s) expose dataset {spec.dataset!r} "
                f"({', '.join(p.site_id for p in online) or 'none'}); the job needs "
                f"min_sites={spec.min_sites} (waited {spec.start_timeout_s:g} s)"
            )

        chosen = self._wait(
            ready,
            timeout_s=spec.start_timeout_s,
            on_timeout=timed_out,
            waiting=lambda: (
                f"waiting for {spec.min_sites} online site(s) with dataset "
                f"{spec.dataset!r}; {len(online)} now"
            ),
        )
        if spec.site_dp is not None and spec.site_dp.adaptive:
            # Fails the job early with a clear reason when 2·σ_b <= z.
            sum_noise_multiplier(
                spec.site_dp.noise_multiplier,
                spec.site_dp.count_noise_multiplier or len(chosen) / 20.0,
            )
        if not fixed:
            # Admission before any spend (orchestrator.admission): every site checks the whole
            # job and reserves its cost, or the job fails here, before round 1.
            admitted, _ = admit(
                self.broker,
                job_id=self.job_id,
                spec=spec,
                noise_multipliers={p.site_id: p.noise_multiplier for p in chosen},
                timeout_s=spec.round_timeout_s,
                check=self._check_cancelled,
                event=self._event,
            )
            chosen = [p for p in chosen if p.site_id in admitted]
            self.store.update_job(
                self.job_id, participants={p.site_id: p.noise_multiplier for p in chosen}
            )
            self._event(
                "info",
                "sites: " + ", ".join(f"{p.site_id} (σ={p.noise_multiplier:.3g})" for p in chosen),
            )
        return chosen

    def _candidate(
        self,
        site: SiteStatus,
        fixed: dict[str, float],
        excluded: dict[str, str],
        left_out: set[str],
    ) -> Participant | None:
        """``site`` as a participant, or None: without the job's dataset, disabled, offline (a
        new job), not among a resumed job's sites, its declared schema not the job's
        (``orchestrator.schemas``), or a registered size that would give more steps per task
        than the orchestrator allows. Warns once per site and reason."""
        spec, sid = self.spec, site.site_id
        ds = site_dataset(site, spec.dataset)
        if ds is None or site.state == "disabled":
            return None
        why = None if sid in fixed else job_disagreement(spec, ds)
        if why is not None:
            if excluded.get(sid) != why:
                excluded[sid] = why
                self._event("warning", f"site {sid} is excluded from the job: {why}", sid)
            return None
        if sid in fixed:
            return Participant(sid, fixed[sid], ds.num_rows)
        if site.state == "offline" or fixed or ds.num_rows < 1:
            return None
        _, steps = task_schedule(
            num_examples=ds.num_rows,
            batch_size=spec.batch_size,
            local_epochs=spec.local_epochs,
            local_steps=spec.local_steps,
        )
        if steps > MAX_STEPS_PER_TASK:
            # A claimed size must not buy unboundedly many steps per round (and accounting).
            if sid not in left_out:
                left_out.add(sid)
                self._event(
                    "warning",
                    f"site {sid} is left out of the job: its {ds.num_rows} registered rows "
                    f"give {steps} steps per round, above the orchestrator's limit of "
                    f"{MAX_STEPS_PER_TASK} (set local_steps)",
                    sid,
                )
            return None
        return Participant(sid, plan_site(spec, sid, ds).noise_multiplier, ds.num_rows)

    # ------------------------------------------------------------------ model state

    def _load_global(self, completed_rounds: int) -> dict[str, torch.Tensor]:
        if completed_rounds > 0:
            path = self.store.paths.checkpoint(self.job_id, completed_rounds)
            self._event("info", f"resuming after round {completed_rounds} from its checkpoint")
            return state_from_bytes(path.read_bytes())
        seed = self.spec.seed if self.spec.seed is not None else 0
        model = build_model(self.spec.model, seed=seed)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    # ------------------------------------------------------------------ one round

    def _round(
        self, rnd: int, state: dict[str, torch.Tensor], participants: list[Participant]
    ) -> tuple[dict[str, torch.Tensor], list[Participant]]:
        t0 = time.time()
        # The sites fetch the model from a spool file (read a chunk at a time), so the round
        # holds no serialised copy of it. A fetch still running when the round is over (its
        # task was cancelled) is told NOT_FOUND.
        blob = state_to_bytes(state)
        model = spool.receive(iter_chunks(blob), size=len(blob), spool_dir=self.store.paths.spool)
        del blob
        try:
            return self._run_round(rnd, state, participants, model, t0)
        finally:
            model.close()
            for payload in self._held:  # updates a robust aggregation kept until now
                payload.close()
            self._held.clear()

    def _run_round(
        self,
        rnd: int,
        state: dict[str, torch.Tensor],
        participants: list[Participant],
        model: spool.Payload,
        t0: float,
    ) -> tuple[dict[str, torch.Tensor], list[Participant]]:
        spec = self.spec
        sha = model.sha256
        deadline = t0 + spec.round_timeout_s
        results: queue.Queue[Result] = queue.Queue()
        outstanding: dict[str, Participant] = {}
        spec_json = spec.model_dump_json()
        for p in participants:
            task = TaskAssignment(
                task_id=uuid.uuid4().hex,
                job_id=self.job_id,
                round=rnd,
                rounds=spec.rounds,
                job_spec_json=spec_json,
                dataset=spec.dataset,
                noise_multiplier=p.noise_multiplier,
                model_size=model.size,
                model_sha256=sha,
                deadline_unix=deadline,
            )
            outstanding[task.task_id] = p
            self.broker.dispatch_into(p.site_id, task, model, results)

        agg = self._aggregation(rnd, state, participants)
        start_norm = l2_norm(state)
        accepted: list[UpdateMeta] = []
        refused: set[str] = set()
        problems: list[str] = []
        while outstanding and time.time() < deadline and not self.stopping.is_set():
            if self._cancelled_by is not None:
                self.broker.cancel(list(outstanding))
                self._check_cancelled()
            try:
                res = results.get(timeout=self.poll_s)
            except queue.Empty:
                self.broker.check_liveness(list(outstanding))
                continue
            if isinstance(res, FailureResult):
                f = res.failure
                if f.task_id not in outstanding:
                    continue
                p = outstanding.pop(f.task_id)
                if f.code == "FAILED_PRECONDITION":
                    refused.add(p.site_id)
                    msg = f"site {p.site_id} refused round {rnd}: {f.reason}"
                else:
                    msg = f"site {p.site_id} failed round {rnd} ({f.code}): {f.reason}"
                problems.append(msg)
                self._event("warning", msg, p.site_id)
                continue
            assert isinstance(res, UpdateResult)
            if res.meta.task_id not in outstanding:
                continue
            p = outstanding.pop(res.meta.task_id)
            try:  # read piece by piece from its spool file, then let go of it (or keep it)
                try:
                    delta, norm, matched = self._check(res, state, p, start_norm, rnd)
                except InvalidUpdateError as err:
                    # A rejected update is not part of the model, but it depended on the
                    # site's data and its rejection is published (this event, the round's
                    # sites): it counts in the job's ε, at the most its task could have cost
                    # (from the assignment, never the site's report; issue 16.8).
                    self._record_rejected(rnd, p, res.meta.task_id)
                    msg = f"rejected the update of site {p.site_id} in round {rnd}: {err}"
                    problems.append(msg)
                    self._event("warning", msg, p.site_id)
                    continue
                self._record_received(rnd, p, res, matched)
                agg.add(p.site_id, delta, norm)
                if agg.keeps_updates:
                    self._held.append(res.payload)
            finally:
                if not (self._held and self._held[-1] is res.payload):
                    res.payload.close()
            accepted.append(res.meta)
            del delta, res

        late = list(outstanding)
        self.broker.cancel(late)
        if self.stopping.is_set():
            # Shutdown mid-round: the round is not committed and reruns after restart. The
            # broker stopped taking results before `stopping` was set (Coordinator.stop), so
            # the queue holds the rest of what this round received: count it too. The sites'
            # own ledgers keep every charge they made (over-count, never under).
            while True:
                try:
                    res = results.get_nowait()
                except queue.Empty:
                    break
                if isinstance(res, UpdateResult):
                    res.payload.close()
                if isinstance(res, UpdateResult) and res.meta.task_id in outstanding:
                    p = outstanding[res.meta.task_id]
                    try:
                        matched = match_report(self._assignment(p, rnd), res.meta)
                    except InvalidUpdateError:
                        self._record_rejected(rnd, p, res.meta.task_id)
                        continue
                    self._record_received(rnd, p, res, matched)
            raise JobStopped()
        for tid in late:
            p = outstanding[tid]
            msg = f"site {p.site_id} did not answer round {rnd} within {spec.round_timeout_s:g} s"
            problems.append(msg)
            self._event("warning", msg, p.site_id)

        if len(accepted) < spec.min_sites:
            # What was received is already recorded: it was seen, so it counts against ε.
            raise JobFailedError(
                f"round {rnd}: {len(accepted)} site update(s) accepted, "
                f"min_sites={spec.min_sites}. " + " | ".join(problems)
            )

        aggregated = agg.finish([m.site_id for m in accepted])
        aggregated_fields = aggregated.job_fields
        for level, note in aggregated.notes:
            self._event(level, note)
        del agg  # the float64 sum (twice the model) goes before the new state is built
        new_state = apply_delta(state, aggregated.mean)
        del aggregated
        atomic_write(self.store.paths.checkpoint(self.job_id, rnd), state_to_bytes(new_state))
        # Pooled over sites from their noised sums, with standard errors (issue 15.7).
        pooled = pool_metrics(
            [m.metrics for m in accepted if m.metrics is not None],
            noise_multiplier=spec.metrics.noise_multiplier,
            loss_bound=spec.metrics.loss_bound,
        )
        # The last round's figure is the one the card will state (exact); earlier rounds
        # show the running bound (issue 19.1), at most ~2% above exact.
        epsilon = self._job_epsilon()[0] if rnd == spec.rounds else self._round_epsilon()
        self.store.commit_round(
            RoundRow(
                job_id=self.job_id,
                round=rnd,
                site_ids=[m.site_id for m in accepted],
                loss=None if pooled is None else pooled.loss.value,
                accuracy=None if pooled is None else pooled.accuracy.value,
                num_examples=sum(m.num_examples for m in accepted),
                duration_s=time.time() - t0,
                epsilon=epsilon,
                metrics_exact=pooled is not None and pooled.exact,
                metrics=None if pooled is None else pooled_to_dict(pooled),
            ),
            [],  # the round's charges were recorded as each update arrived
            round=rnd,
            epsilon=epsilon,
            accountant=self.accountant_used,
            **aggregated_fields,
        )
        self.on_change(self.job_id)
        remaining = [p for p in participants if p.site_id not in refused]
        if refused:
            self._event(
                "warning",
                f"dropped site(s) {', '.join(sorted(refused))} from the job after refusal",
            )
        return new_state, remaining

    def _aggregation(
        self, rnd: int, state: dict[str, torch.Tensor], participants: list[Participant]
    ) -> RoundAggregation:
        """The round's aggregation: the job's method, wrapped in site-level DP when it has
        ``site_dp``. FedAvg weighs by the rows each site registered, no share above the
        job's ``aggregation.max_site_weight``."""
        spec = self.spec
        if spec.site_dp is not None:
            clip = self.store.job(self.job_id).site_clip_norm or spec.site_dp.clip_norm
            return SiteDPAggregation(
                spec.site_dp, clip_norm=clip, num_sites=len(participants), round=rnd
            )
        how = spec.aggregation
        if how.method != "fedavg":
            return CoordinateRound(state, method=how.method, trim=how.trim)
        weights = capped_weights(
            {p.site_id: float(p.num_examples) for p in participants}, how.max_site_weight
        )
        for p in participants:
            if weights[p.site_id] < p.num_examples:
                # Honest sites of unequal size are capped too (two sites: equal weights); a
                # claimed size far beyond the others' is worth a warning.
                level = "warning" if p.num_examples > 10 * weights[p.site_id] else "info"
                self._event(
                    level,
                    f"round {rnd}: the FedAvg weight of site {p.site_id} is capped at "
                    f"{how.max_site_weight:.0%} of the round's (it registered "
                    f"{p.num_examples} rows)",
                    p.site_id,
                )
        return FedAvgRound(state, weights, how.max_site_weight, round=rnd)

    def _record_received(
        self, rnd: int, p: Participant, res: UpdateResult, matched: Matched
    ) -> None:
        """Charge the job for an accepted update as soon as it is checked, before it is used.

        What is charged is the event the orchestrator assigned (``matched``), never the
        numbers of the site's report. A round that a crash or a shutdown interrupts is run
        again, and what the lost attempt received was seen all the same: recording at commit
        time only would drop those charges (the card would under-state what left the sites).
        """
        r = res.meta.dp_report
        self._record(
            [
                charge_row(
                    job_id=self.job_id,
                    round=rnd,
                    site_id=p.site_id,
                    dataset=self.spec.dataset,
                    task_id=res.meta.task_id,
                    events=matched.events(),
                    delta=self.spec.dp.delta,
                    num_examples=matched.num_examples,
                    max_grad_norm=self.spec.dp.max_grad_norm,
                    dataset_epsilon=r.dataset_epsilon,
                    policy_delta=r.policy_delta,
                    grad_sample_mode=r.grad_sample_mode,
                )
            ]
        )

    def _record_rejected(self, rnd: int, p: Participant, task_id: str) -> None:
        """Charge the job for a rejected update: its assigned task's worst case."""
        self._record(
            [
                charge_row(
                    job_id=self.job_id,
                    round=rnd,
                    site_id=p.site_id,
                    dataset=self.spec.dataset,
                    task_id=task_id,
                    events=assigned_worst_case(self._assignment(p, rnd)),
                    delta=self.spec.dp.delta,
                    num_examples=p.num_examples,
                    max_grad_norm=self.spec.dp.max_grad_norm,
                )
            ]
        )

    def _assignment(self, p: Participant, rnd: int) -> Assignment:
        canaries = self.spec.audit.canaries if self.spec.audit is not None else 0
        return Assignment(
            p.site_id, p.noise_multiplier, p.num_examples, canaries, self.spec, round=rnd
        )

    def _check(
        self,
        res: UpdateResult,
        state: dict[str, torch.Tensor],
        p: Participant,
        start_norm: float,
        rnd: int,
    ) -> tuple[SafetensorsPieces, float, Matched]:
        """``orchestrator.training.update_bounds.check_received`` against the site's assignment."""
        a = self._assignment(p, rnd)
        return check_received(
            res.meta, res.payload, res.payload.sha256, state, a, start_norm=start_norm
        )

    # ------------------------------------------------------------------ accounting

    def _job_epsilon(self) -> tuple[float, dict[str, float]]:
        """The job's exact ε and each site's (``JobAccount.exact``); sets ``accountant_used``
        to the accountant that produced them."""
        je = self.account.sync(self.store).exact()
        self.accountant_used = je.accountant
        return je.epsilon, je.site_epsilons()

    def _round_epsilon(self) -> float:
        """The job's ε so far, for the round's history row: informational and growing every
        round, so each site's bound is the running one (``JobAccount.running``: at most ~2%
        above exact, recomputed once per step bucket); the released ε (:meth:`_release`) is
        exact. Sets ``accountant_used``."""
        je = self.account.sync(self.store).running()
        if je.per_site:
            self.accountant_used = je.accountant
        return je.epsilon

    # ------------------------------------------------------------------ release

    def _release(self, state: dict[str, torch.Tensor]) -> None:
        epsilon, per_site = self._job_epsilon()
        card = training_card(
            row=self.store.job(self.job_id),
            spec=self.spec,
            rounds=self.store.rounds(self.job_id),
            sites=self.account.spends(per_site),
            epsilon=epsilon,
            accountant=self.accountant_used,
            secure_noise={
                sid: bool(policy.get("secure_noise", False))
                for sid, policy in self.store.site_policies().items()
            },
        )
        if self.spec.audit is not None:
            # Before anything is released: a failed audit raises JobFailedError (job failed,
            # model withheld, the reason in the job's events).
            self._event("info", "running the privacy audit (canaries at each site)")
            card["audit"] = run_audit(
                broker=self.broker,
                site_ids=self.account.site_ids(),
                job_id=self.job_id,
                spec=self.spec,
                weights=state_to_bytes(state),
                claimed_epsilon=epsilon,
                timeout_s=self.spec.round_timeout_s,
            )
            a = card["audit"]
            self._event(
                "info",
                f"privacy audit: empirical ε lower bound {a['epsilon_lower_bound']:.3f} ≤ "
                f"claimed ε {epsilon:.3f} ({a['correct_guesses']}/{a['guesses']} correct "
                f"guesses on {a['num_canaries']} canaries)",
            )
        model = build_model(self.spec.model)
        model.load_state_dict(state)
        # DP-SGLD releases its posterior samples (orchestrator.training.posterior); others, ``state``
        released = released_state(
            self.spec, state, lambda r: self.store.paths.checkpoint(self.job_id, r), card
        )
        save_model(self.store.paths.model_dir(self.job_id), module_or_state=released, card=card)
        self.store.update_job(self.job_id, state="completed", model_released=True, epsilon=epsilon)
        self._event("info", f"model released: ε={epsilon:.4g}, δ={self.spec.dp.delta:g}")
