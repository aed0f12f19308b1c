"""The round loop of one training job (no gRPC here: the broker stands between).

Each round: send the global model to every participating site, fold each update into a running
weighted mean as it arrives (after checking it), stop when every site answered or the deadline
passed, require ``min_sites`` accepted updates, apply the mean delta, checkpoint, and account.
After the last round the model is released with its model card.

Privacy: the job's ε is composed per site from every update the orchestrator *received* (even
one it then rejected: it was seen), and the released ε is the maximum over sites (disjoint
records: parallel composition). Averaging noised deltas is post-processing. Each update is
charged to the job when it arrives, so a round that a crash or a shutdown interrupts (and that
is then run again) still counts what it received.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from common.accounting import DpEvent, compute_epsilon
from common.domain import TaskAssignment, UpdateMeta
from common.errors import InvalidUpdateError, JobFailedError, PrivacyAccountingError
from common.models import build_model, save_model
from common.specs import JobSpec, job_spec_from_json
from common.tensors import (
    SafetensorsPieces,
    check_update,
    iter_chunks,
    state_from_bytes,
    state_to_bytes,
)
from common.version import __version__
from orchestrator import spool
from orchestrator.aggregation import RunningWeightedMean, apply_delta
from orchestrator.auditing import run_audit
from orchestrator.broker import FailureResult, Result, UpdateResult
from orchestrator.job_thread import JobStopped, JobThread
from orchestrator.planning import ACCOUNTANT, plan_site, site_dataset
from orchestrator.site_dp import round_for, site_level_events, sum_noise_multiplier
from orchestrator.store import ChargeRow, RoundRow, atomic_write
from orchestrator.views import charged_event_dict, site_status

log = logging.getLogger("dpfed.orchestrator")

# Sites whose clipped, noised update is implausibly large are rejected: the delta of `steps`
# steps of clipped SGD has norm at most lr·steps·(C + noise), and noise of std σC per coordinate
# over d coordinates has norm ≈ σC√d per step. The factor leaves room for momentum/Adam.
_NORM_SLACK = 10.0


@dataclass(frozen=True)
class Participant:
    site_id: str
    noise_multiplier: float
    num_examples: int


class JobRunner(JobThread):
    """The round loop of one training job."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec: JobSpec = job_spec_from_json(self.store.job(self.job_id).spec_json)

    def _run(self) -> None:
        row = self.store.job(self.job_id)
        if row.state in ("completed", "failed"):
            return
        participants = self._participants(row.participants)
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
        """Sites with the dataset, online, at least min_sites of them (waits up to start_timeout)."""
        spec = self.spec
        deadline = time.time() + spec.start_timeout_s
        announced = False
        while True:
            chosen: list[Participant] = []
            # Row by row (in site id order): only the job's dataset of each site is kept.
            for site in (site_status(r, self.broker) for r in self.store.each_site()):
                sid = site.site_id
                ds = site_dataset(site, spec.dataset)
                if ds is None or site.state == "disabled":
                    continue
                if site.state == "offline" and sid not in fixed:
                    continue
                if fixed and sid not in fixed:
                    continue
                if sid in fixed:
                    chosen.append(Participant(sid, fixed[sid], ds.num_rows))
                    continue
                if ds.num_rows < 1:
                    continue
                plan = plan_site(spec, sid, ds)
                chosen.append(Participant(sid, plan.noise_multiplier, ds.num_rows))
            # A resumed job (its participants are fixed) must also wait for its sites: after
            # an orchestrator restart they dial back in with backoff, and a task dispatched
            # to a site with no session yet fails at once, so the first resumed round would
            # fail with no update at all (seen with SIGKILL and SIGTERM of the orchestrator).
            online = [p for p in chosen if not fixed or self.broker.online(p.site_id)]
            need = min(spec.min_sites, len(chosen)) if fixed else spec.min_sites
            if len(online) >= need:
                break
            if not announced:
                self._event(
                    "info",
                    f"waiting for {spec.min_sites} online site(s) with dataset "
                    f"{spec.dataset!r}; {len(online)} now",
                )
                announced = True
            self._check_cancelled()
            if self.stopping.is_set():
                raise JobStopped()  # shutting down: not the job's fault, resume after restart
            if time.time() > deadline:
                raise JobFailedError(
                    f"only {len(online)} online site(s) expose dataset {spec.dataset!r} "
                    f"({', '.join(p.site_id for p in online) or 'none'}); the job needs "
                    f"min_sites={spec.min_sites} (waited {spec.start_timeout_s:g} s)"
                )
            time.sleep(self.poll_s)
        if spec.site_dp is not None and spec.site_dp.adaptive:
            # Fails the job early with a clear reason when 2·σ_b <= z.
            sum_noise_multiplier(
                spec.site_dp.noise_multiplier,
                spec.site_dp.count_noise_multiplier or len(chosen) / 20.0,
            )
        if not fixed:
            self.store.update_job(
                self.job_id, participants={p.site_id: p.noise_multiplier for p in chosen}
            )
            self._event(
                "info",
                "sites: " + ", ".join(f"{p.site_id} (σ={p.noise_multiplier:.3g})" for p in chosen),
            )
        return chosen

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

        agg = RunningWeightedMean(state)
        sdp = None
        if spec.site_dp is not None:
            clip = self.store.job(self.job_id).site_clip_norm or spec.site_dp.clip_norm
            sdp = round_for(spec.site_dp, clip_norm=clip, num_sites=len(participants))
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
            with res.payload:  # read piece by piece from its spool file, then let go of it
                try:
                    delta, norm = self._check(res, state, p)
                except InvalidUpdateError as err:
                    # A rejected update is not part of the model, so it is not charged to the
                    # job's ε (a site claiming σ≈0 must not be able to void everyone's job);
                    # the event names the site and the reason, and the site's own ledger
                    # keeps it.
                    msg = f"rejected the update of site {p.site_id} in round {rnd}: {err}"
                    problems.append(msg)
                    self._event("warning", msg, p.site_id)
                    continue
                self._record_received(rnd, p, res)
                if sdp is not None:
                    sdp.add(delta, norm)
                else:
                    agg.add(delta, res.meta.num_examples)
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
                        self._check_report(res, p)
                    except InvalidUpdateError:
                        continue
                    self._record_received(rnd, p, res)
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

        job_fields: dict[str, Any] = {}
        if sdp is not None and spec.site_dp is not None:
            mean, next_clip = sdp.finish(spec.site_dp)
            job_fields["site_clip_norm"] = next_clip
            if spec.site_dp.adaptive:
                self._event(
                    "info",
                    f"round {rnd}: site-level clip norm {sdp.clip_norm:.4g} → {next_clip:.4g}",
                )
        else:
            mean = agg.mean()
        del agg, sdp  # the float64 sum (twice the model) goes before the new state is built
        new_state = apply_delta(state, mean)
        del mean
        atomic_write(self.store.paths.checkpoint(self.job_id, rnd), state_to_bytes(new_state))
        loss, acc, exact = _pooled_metrics(accepted)
        epsilon, _ = self._job_epsilon()
        self.store.commit_round(
            RoundRow(
                job_id=self.job_id,
                round=rnd,
                site_ids=[m.site_id for m in accepted],
                loss=loss,
                accuracy=acc,
                num_examples=sum(m.num_examples for m in accepted),
                duration_s=time.time() - t0,
                epsilon=epsilon,
                metrics_exact=exact,
            ),
            [],  # the round's charges were recorded as each update arrived
            round=rnd,
            epsilon=epsilon,
            accountant=ACCOUNTANT,
            **job_fields,
        )
        self.on_change(self.job_id)
        remaining = [p for p in participants if p.site_id not in refused]
        if refused:
            self._event(
                "warning",
                f"dropped site(s) {', '.join(sorted(refused))} from the job after refusal",
            )
        return new_state, remaining

    def _record_received(self, rnd: int, p: Participant, res: UpdateResult) -> None:
        """Charge the job for an update as soon as it arrives, before it is checked or used.

        The job's ε covers every update the orchestrator received, even one it rejects or one
        whose round never commits: a round that a crash or a shutdown interrupts is run again,
        and what the lost attempt received was seen all the same. Recording at commit time
        only would drop those charges (the card would under-state what left the sites).
        """
        self.store.add_charges([self._charge_row(rnd, p, res.meta)])

    def _charge_row(self, rnd: int, p: Participant, meta: UpdateMeta) -> ChargeRow:
        r = meta.dp_report
        return ChargeRow(
            job_id=self.job_id,
            round=rnd,
            site_id=p.site_id,
            dataset=self.spec.dataset,
            task_id=meta.task_id,
            num_examples=meta.num_examples,
            max_grad_norm=r.max_grad_norm,
            delta=r.delta,
            dataset_epsilon=r.dataset_epsilon,
            policy_delta=r.policy_delta,
            events=[charged_event_dict(e) for e in r.events],
            grad_sample_mode=r.grad_sample_mode,
        )

    def _check_report(self, res: UpdateResult, p: Participant) -> DpEvent:
        """The DP report must match the task: σ at least the assigned one, the metrics release
        at the job's σ, and no more examples than the site registered (plus its canaries)."""
        meta = res.meta
        rep = meta.dp_report
        train = rep.train_event
        if train is None:
            raise InvalidUpdateError("its DP report has no training event")
        if train.noise_multiplier < p.noise_multiplier * (1 - 1e-9):
            raise InvalidUpdateError(
                f"it was trained with σ={train.noise_multiplier:g} < assigned {p.noise_multiplier:g}"
            )
        for e in rep.events:
            if (
                e.kind == "metrics"
                and e.event.noise_multiplier < self.spec.metrics.noise_multiplier * (1 - 1e-9)
            ):
                raise InvalidUpdateError("its metrics were released with less noise than asked")
        canaries = self.spec.audit.canaries if self.spec.audit is not None else 0
        if meta.num_examples > p.num_examples + canaries:
            # The weight of an update is its example count: an inflated count would let one
            # site outweigh all the others in the average.
            raise InvalidUpdateError(
                f"it claims {meta.num_examples} examples; the site registered {p.num_examples}"
            )
        return train

    def _check(
        self, res: UpdateResult, state: dict[str, torch.Tensor], p: Participant
    ) -> tuple[SafetensorsPieces, float]:
        """Reject an update that does not match the model or its own DP report; return it,
        to be read piece by piece, and its L2 norm."""
        spec = self.spec
        meta = res.meta
        if res.payload.sha256 != meta.sha256:
            raise InvalidUpdateError("its bytes do not match the announced sha256")
        train = self._check_report(res, p)
        rep = meta.dp_report
        if abs(rep.max_grad_norm - spec.dp.max_grad_norm) > 1e-9 * spec.dp.max_grad_norm:
            raise InvalidUpdateError(
                f"max_grad_norm {rep.max_grad_norm:g} differs from the job's {spec.dp.max_grad_norm:g}"
            )
        if rep.delta > spec.dp.delta:
            raise InvalidUpdateError(f"its δ={rep.delta:g} is above the job's {spec.dp.delta:g}")
        if meta.metrics is not None and meta.metrics.exact and not spec.metrics.exact:
            raise InvalidUpdateError("it carries exact metrics the job did not ask for")
        try:
            delta = SafetensorsPieces(res.payload)  # checks the header; reads no value yet
        except InvalidUpdateError as err:
            raise InvalidUpdateError(f"its tensors cannot be decoded: {err}") from None
        norm = check_update(delta, state)
        bound = _norm_bound(spec, train, num_params=sum(v.numel() for v in state.values()))
        if norm > bound:
            raise InvalidUpdateError(
                f"its norm {norm:.3g} is inconsistent with its DP report (bound {bound:.3g})"
            )
        return delta, norm

    # ------------------------------------------------------------------ accounting

    def _job_epsilon(self) -> tuple[float, dict[str, float]]:
        by_site: dict[str, list[DpEvent]] = {}
        for c in self.store.charges(self.job_id):
            by_site.setdefault(c.site_id, []).extend(
                DpEvent(e["noise_multiplier"], e["sample_rate"], int(e["steps"])) for e in c.events
            )
        per_site: dict[str, float] = {}
        for sid, events in by_site.items():
            b = compute_epsilon(events, delta=self.spec.dp.delta, accountant=ACCOUNTANT)
            if not math.isfinite(b.epsilon):
                raise PrivacyAccountingError(f"no finite ε for site {sid}")
            per_site[sid] = b.epsilon
        return max(per_site.values(), default=0.0), per_site

    # ------------------------------------------------------------------ release

    def _release(self, state: dict[str, torch.Tensor]) -> None:
        from orchestrator.release import build_model_card

        epsilon, per_site = self._job_epsilon()
        row = self.store.job(self.job_id)
        card = build_model_card(
            row=row,
            spec=self.spec,
            rounds=self.store.rounds(self.job_id),
            charges=self.store.charges(self.job_id),
            per_site_epsilon=per_site,
            epsilon=epsilon,
            version=__version__,
            secure_noise={
                sid: bool(policy.get("secure_noise", False))
                for sid, policy in self.store.site_policies().items()
            },
        )
        if self.spec.site_dp is not None:
            sdp = self.spec.site_dp
            site_eps = compute_epsilon(
                site_level_events(sdp, len(card["metrics"])),
                delta=self.spec.dp.delta,
                accountant=ACCOUNTANT,
            ).epsilon
            card["site_level_dp"] = {
                "epsilon": site_eps,
                "delta": self.spec.dp.delta,
                "accountant": ACCOUNTANT,
                "mechanism": "DP-FedAvg (McMahan et al. 2018): server-side clipping + Gaussian noise"
                + (", adaptive clipping (Andrew et al. 2021)" if sdp.adaptive else ""),
                "noise_multiplier": sdp.noise_multiplier,
                "initial_clip_norm": sdp.clip_norm,
                "final_clip_norm": row.site_clip_norm or sdp.clip_norm,
                "protects": (
                    "whether any one whole site (all of its records) took part, against anyone "
                    "who sees the released model; it relies on the orchestrator adding this "
                    "noise honestly. The sample-level guarantee above holds independently."
                ),
            }
        if self.spec.audit is not None:
            # Before anything is released: a failed audit raises JobFailedError (job failed,
            # model withheld, the reason in the job's events).
            self._event("info", "running the privacy audit (canaries at each site)")
            card["audit"] = run_audit(
                broker=self.broker,
                site_ids=sorted({c.site_id for c in self.store.charges(self.job_id)}),
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
        save_model(self.store.paths.model_dir(self.job_id), module_or_state=model, card=card)
        self.store.update_job(self.job_id, state="completed", model_released=True, epsilon=epsilon)
        self._event("info", f"model released: ε={epsilon:.4g}, δ={self.spec.dp.delta:g}")


def _pooled_metrics(accepted: list[UpdateMeta]) -> tuple[float | None, float | None, bool]:
    ms = [m.metrics for m in accepted if m.metrics is not None]
    n = sum(m.num_examples for m in ms)
    if not ms or n <= 0:
        return None, None, False
    acc = min(1.0, max(0.0, sum(m.correct_sum for m in ms) / n))
    loss = max(0.0, sum(m.loss_sum for m in ms) / n)
    return loss, acc, any(m.exact for m in ms)


def _norm_bound(spec: JobSpec, train: DpEvent, *, num_params: int) -> float:
    lr = spec.optimizer.lr
    c = spec.dp.max_grad_norm
    per_step = c * (1.0 + train.noise_multiplier * math.sqrt(num_params) * 1.5 + 3.0)
    # Adam normalises step sizes: each coordinate moves by at most ~lr per step.
    if spec.optimizer.name == "adam":
        per_step_adam = lr * math.sqrt(num_params)
        return _NORM_SLACK * train.steps * per_step_adam
    momentum_gain = 1.0 / (1.0 - spec.optimizer.momentum)
    return _NORM_SLACK * train.steps * lr * per_step * momentum_gain


def card_json(card: dict[str, Any]) -> str:
    return json.dumps(card, indent=2, sort_keys=False)
