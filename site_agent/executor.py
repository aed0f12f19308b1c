"""The trust boundary: decide whether a task may run on this site's data, run it, and say
exactly what leaves.

Order of operations for every task (no gRPC here; ``site_agent.agent`` carries the bytes):

1. validate the declarative spec again (never trust the orchestrator's validation);
2. check the global model matches the spec's architecture;
3. project the task's privacy cost with RDP and refuse it if the site's policy or the
   dataset's remaining budget does not allow it (``PolicyRefusal``);
4. **charge the ledger (durable) before anything computed on the data exists**, so a crash
   can over-count but never under-count (write-ahead);
5. train with Opacus DP-SGD, release validation metrics through the Gaussian mechanism;
6. return only the noised delta, the example count and the DP report.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from common import noise
from common.accounting import DpEvent, EpsilonBound, compute_epsilon
from common.domain import (
    ChargedEvent,
    DatasetInfo,
    DpReport,
    Metrics,
    PolicySummary,
    TaskAssignment,
    UpdateMeta,
)
from common.errors import InvalidSpecError, NotFoundError
from common.models import build_model, count_parameters
from common.schedule import task_schedule
from common.specs import JobSpec, job_spec_from_json
from common.tensors import check_update, state_from_bytes, state_to_bytes
from site_agent.admission import RoundCharges, run_admit
from site_agent.budget import budget_limit, release_update
from site_agent.canaries import canaries_for, score_canaries
from site_agent.catalog import CatalogCounts, schema_of
from site_agent.config import SiteConfig
from site_agent.data import LocalDataset, load_dataset, split_train_validation
from site_agent.evaluation import run_evaluate
from site_agent.ledger import Ledger
from site_agent.mixture import run_gmm, run_gmm_local
from site_agent.policy import Projection, TaskCost, check_task
from site_agent.synthesis import run_synth
from site_agent.trainer import TrainParams, evaluate, train_local

log = logging.getLogger("dpfed.site_agent")

ACCOUNTANT = "prv"


@dataclass(frozen=True)
class _ReportEpsilons:
    task: EpsilonBound
    job: EpsilonBound
    lifetime: EpsilonBound


def _report_epsilons_in_background(
    ledger: Ledger,
    *,
    task_events: Sequence[DpEvent],
    dataset: str,
    job_id: str,
    delta: float,
    policy_delta: float,
) -> Future[_ReportEpsilons]:
    """The DP report's three ε, composed in a thread while the site trains.

    They depend only on the ledger as charged (write-ahead, before training), so computing
    them alongside training gives the same numbers, and a PRV composition (tens to hundreds
    of ms each) no longer adds to the round. Nothing here touches the data.
    """
    history = ledger.events(dataset, job_id=job_id)
    lifetime = ledger.events(dataset)
    out: Future[_ReportEpsilons] = Future()

    def run() -> None:
        try:
            out.set_result(
                _ReportEpsilons(
                    task=compute_epsilon(list(task_events), delta=delta, accountant=ACCOUNTANT),
                    job=compute_epsilon(history, delta=delta, accountant=ACCOUNTANT),
                    lifetime=compute_epsilon(lifetime, delta=policy_delta, accountant=ACCOUNTANT),
                )
            )
        except BaseException as err:  # handed to the caller, who raises it
            out.set_exception(err)

    threading.Thread(target=run, name="dp-report-accounting", daemon=True).start()
    return out


def _wait_for_report(pending: Future[_ReportEpsilons]) -> _ReportEpsilons:
    """The report's ε once composed (the part of the accounting training did not hide)."""
    return pending.result()


@dataclass(frozen=True)
class _Split:
    train: LocalDataset
    validation: LocalDataset | None


class TaskExecutor:
    def __init__(self, config: SiteConfig, ledger: Ledger) -> None:
        self.config = config
        self.ledger = ledger
        self._splits: dict[str, _Split] = {}
        self._lock = threading.Lock()
        for ds in config.datasets:
            self._split(ds.name)  # fail fast on a broken dataset at start-up
        self._catalog = CatalogCounts(
            config.state_dir,
            ledger,
            config.policy,
            budget_limit=functools.partial(budget_limit, config),
        )
        self._infos: list[DatasetInfo] = self._compute_infos()

    # ------------------------------------------------------------ what the site discloses

    def _split(self, name: str) -> _Split:
        with self._lock:
            if name not in self._splits:
                cfg = self.config.dataset(name)
                if cfg is None:
                    raise NotFoundError(f"site {self.config.site_id} has no dataset named {name!r}")
                full = load_dataset(cfg)
                if cfg.validation_fraction > 0 and len(full.labels) >= 10:
                    # A stable split (seeded by site and dataset) keeps each record on one side.
                    seed = zlib.crc32(f"{self.config.site_id}/{name}".encode())
                    train, val = split_train_validation(full, cfg.validation_fraction, seed)
                    self._splits[name] = _Split(train, val if len(val.labels) else None)
                else:
                    self._splits[name] = _Split(full, None)
            return self._splits[name]

    def dataset_infos(self) -> list[DatasetInfo]:
        """What the site discloses about its datasets; recomputed only when the ledger moves."""
        return list(self._infos)

    def _compute_infos(self) -> list[DatasetInfo]:
        with noise.secure_noise(self.config.policy.secure_noise):  # the catalog's DP counts
            return self._compute_infos_now()

    def _compute_infos_now(self) -> list[DatasetInfo]:
        out = []
        for cfg in self.config.datasets:
            sp = self._split(cfg.name)
            n_val = 0 if sp.validation is None else len(sp.validation.labels)
            # Charged (once, then cached) before the spend below is computed and disclosed.
            dp_rows = self._catalog.noisy_count(cfg.name, len(sp.train.labels) + n_val)
            spent = self.ledger.spent(cfg.name, delta=self.config.policy.delta).epsilon
            out.append(
                DatasetInfo(
                    name=cfg.name,
                    num_rows=len(sp.train.labels),
                    columns=sp.train.feature_names,
                    label=sp.train.label_name,
                    epsilon_spent=spent,
                    max_epsilon=budget_limit(self.config, cfg.name),
                    policy_delta=self.config.policy.delta,
                    num_validation_rows=n_val,
                    dp_num_rows=dp_rows,
                    schema=schema_of(cfg, sp.train.feature_names),
                    source=cfg.source_format(),
                )
            )
        return out

    def policy_summary(self) -> PolicySummary:
        p = self.config.policy
        return PolicySummary(
            max_epsilon=p.max_epsilon,
            delta=p.delta,
            min_noise_multiplier=p.min_noise_multiplier,
            max_rounds=p.max_rounds,
            allowed_models=tuple(p.allowed_models),
            allow_exact_metrics=p.allow_exact_metrics,
            max_steps_per_task=p.max_steps_per_task,
            max_parameters=p.max_parameters,
            secure_noise=p.secure_noise,
        )

    # ------------------------------------------------------------ one task

    def _round_charges(self, task: TaskAssignment) -> RoundCharges:
        """One round of the job an ``admit`` task asks about: the policy's checks on a round
        and the events it would charge, exactly as its train tasks will derive them."""
        spec: JobSpec = job_spec_from_json(task.job_spec_json)
        split = self._split(task.dataset)
        n = len(split.train.labels)
        if spec.audit is not None:
            cfg = self.config.dataset(task.dataset)
            assert cfg is not None
            _, _, included = canaries_for(
                self.config.state_dir, task.job_id, spec, cfg, split.train.feature_names
            )
            n += int(included.sum())
        q, steps = task_schedule(
            num_examples=n,
            batch_size=spec.batch_size,
            local_epochs=spec.local_epochs,
            local_steps=spec.local_steps,
        )
        exact = spec.metrics.enabled and spec.metrics.exact
        want_metrics = spec.metrics.enabled and split.validation is not None
        train_event = DpEvent(noise_multiplier=task.noise_multiplier, sample_rate=q, steps=steps)
        charges: RoundCharges = (("train", train_event),)
        if want_metrics and not exact:
            metric = DpEvent(spec.metrics.noise_multiplier, 1.0, 1)
            charges = (*charges, ("metrics", metric))
        check_task(
            policy=self.config.policy,
            max_epsilon=budget_limit(self.config, task.dataset),
            dataset=task.dataset,
            model_kind=spec.model.kind,
            num_parameters=count_parameters(build_model(spec.model)),
            round=1,
            rounds=task.rounds,
            noise_multiplier=task.noise_multiplier,
            task_delta=spec.dp.delta,
            steps=steps,
            cost=TaskCost(events=tuple(e for _, e in charges), delta=spec.dp.delta),
            history=[],  # the whole job's budget check is admission's, on the commitments
            exact_metrics=exact and want_metrics,
        )
        return charges

    def _execute_other(self, task: TaskAssignment, blob: bytes) -> tuple[UpdateMeta, bytes]:
        """The closed set of non-training tasks; each admits and charges its own release."""
        if task.kind == "admit":  # admission before any spend (site_agent.admission)
            return run_admit(
                config=self.config,
                ledger=self.ledger,
                task=task,
                round_charges=self._round_charges,
            )
        if task.kind == "audit":
            result_json = score_canaries(
                self.config.state_dir, task.job_id, task.request_json, blob
            )
            return release_update(
                config=self.config,
                ledger=self.ledger,
                task=task,
                delta=self.config.policy.delta,
                num_examples=len(json.loads(result_json)["losses"]),
                result_json=result_json,
                accountant=ACCOUNTANT,
            )
        handlers: dict[str, Callable[..., tuple[UpdateMeta, bytes]]] = {
            "evaluate": functools.partial(run_evaluate, blob=blob),
            "synth": run_synth,
            "gmm": run_gmm,
            "gmm_local": run_gmm_local,
        }
        handler = handlers.get(task.kind)
        if handler is None:
            raise InvalidSpecError(
                f"unknown task kind {task.kind!r}; this agent runs train, "
                f"{', '.join(handlers)}, audit, admit"
            )
        split = self._split(task.dataset)
        result = handler(
            config=self.config,
            ledger=self.ledger,
            task=task,
            data=(split.train, split.validation),
        )
        self._infos = self._compute_infos()  # the spend moved
        return result

    def execute(self, task: TaskAssignment, global_blob: bytes) -> tuple[UpdateMeta, bytes]:
        """Run one task; raises PolicyRefusal / InvalidSpecError / NotFoundError to refuse it.

        Every noise value the task draws comes from the source the site's policy names
        (``policy.secure_noise``; :mod:`common.noise`), set for this thread while it runs.
        """
        with noise.secure_noise(self.config.policy.secure_noise):
            return self._execute(task, global_blob)

    def _execute(self, task: TaskAssignment, global_blob: bytes) -> tuple[UpdateMeta, bytes]:
        if task.kind != "train":
            return self._execute_other(task, global_blob)
        spec: JobSpec = job_spec_from_json(task.job_spec_json)
        if spec.dataset != task.dataset:
            raise InvalidSpecError(
                f"task names dataset {task.dataset!r} but its spec names {spec.dataset!r}"
            )
        split = self._split(task.dataset)
        train = split.train
        n_features = train.features.shape[1]
        if spec.model.input_dim != n_features:
            raise InvalidSpecError(
                f"model.input_dim={spec.model.input_dim} but dataset {task.dataset!r} has "
                f"{n_features} feature columns"
            )
        if train.num_classes_seen > spec.model.num_classes:
            raise InvalidSpecError(
                f"model.num_classes={spec.model.num_classes} is too small for the labels of "
                f"dataset {task.dataset!r}"
            )
        if hashlib.sha256(global_blob).hexdigest() != task.model_sha256:
            raise InvalidSpecError("the global model's bytes do not match the task's sha256")
        model = build_model(spec.model)
        reference = model.state_dict()
        global_state = state_from_bytes(global_blob)
        check_update(global_state, reference)

        sigma = task.noise_multiplier
        train_x, train_y = train.features, train.labels
        if spec.audit is not None:
            # The audit's canaries train like any record: the ones whose secret coin came up.
            cfg = self.config.dataset(task.dataset)
            assert cfg is not None
            cx, cy, included = canaries_for(
                self.config.state_dir, task.job_id, spec, cfg, train.feature_names
            )
            train_x = np.concatenate([train_x, cx[included]])
            train_y = np.concatenate([train_y, cy[included]])
        q, steps = task_schedule(
            num_examples=len(train_y),
            batch_size=spec.batch_size,
            local_epochs=spec.local_epochs,
            local_steps=spec.local_steps,
        )
        exact = spec.metrics.enabled and spec.metrics.exact
        # Only in the rounds the job releases metrics (metrics.every; by default the last).
        want_metrics = (
            spec.metrics.releases_at(task.round, task.rounds) and split.validation is not None
        )
        train_event = DpEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)
        metric_event = (
            DpEvent(noise_multiplier=spec.metrics.noise_multiplier, sample_rate=1.0, steps=1)
            if want_metrics and not exact
            else None
        )
        cost_events = (train_event,) + ((metric_event,) if metric_event else ())
        cost = TaskCost(events=cost_events, delta=spec.dp.delta)
        policy = self.config.policy
        projections: list[Projection] = []

        def admit(history: list[DpEvent]) -> None:
            projections.append(
                check_task(
                    policy=policy,
                    max_epsilon=budget_limit(self.config, task.dataset),
                    dataset=task.dataset,
                    model_kind=spec.model.kind,
                    num_parameters=count_parameters(model),
                    round=task.round,
                    rounds=task.rounds,
                    noise_multiplier=sigma,
                    task_delta=spec.dp.delta,
                    steps=steps,
                    cost=cost,
                    history=history,
                    exact_metrics=exact and want_metrics,
                )
            )

        # Write-ahead: durable before anything computed on the data exists. The policy and
        # budget check runs inside the charge's transaction, on every charge to the dataset's
        # budget and every other admitted job's reservation (site_agent.ledger).
        self.ledger.charge(
            dataset=task.dataset,
            job_id=task.job_id,
            round=task.round,
            task_id=task.task_id,
            kind=["train"] + (["metrics"] if metric_event is not None else []),
            events=list(cost_events),
            delta=spec.dp.delta,
            check=admit,
        )
        projection = projections[-1]
        log.info(
            "site=%s job=%s round=%d accepted: projected ε %.3f → %.3f of %.3f",
            self.config.site_id,
            task.job_id,
            task.round,
            projection.epsilon_before,
            projection.epsilon_after,
            projection.max_epsilon,
        )
        epsilons = _report_epsilons_in_background(
            self.ledger,
            task_events=cost_events,
            dataset=task.dataset,
            job_id=task.job_id,
            delta=spec.dp.delta,
            policy_delta=policy.delta,
        )

        result = train_local(
            model_spec=spec.model,
            global_state=global_state,
            features=train_x,
            labels=train_y,
            params=TrainParams(
                noise_multiplier=sigma,
                max_grad_norm=spec.dp.max_grad_norm,
                batch_size=spec.batch_size,
                # Exactly the steps charged above: the trainer must not recompute them (its
                # rounding of local_epochs could differ and run more than was charged).
                local_epochs=None,
                local_steps=steps,
                optimizer=spec.optimizer,
                seed=spec.seed,
            ),
        )
        if result.steps != steps or abs(result.sample_rate - q) > 1e-12 * q:
            # Never release an update whose DP event differs from the one in the ledger.
            raise InvalidSpecError(
                f"internal: trained {result.steps} steps at q={result.sample_rate:g}, "
                f"charged {steps} at q={q:g}; update withheld"
            )
        metrics: Metrics | None = None
        if want_metrics and split.validation is not None:
            local = {k: global_state[k] + result.delta[k] for k in global_state}
            ev = evaluate(
                model_spec=spec.model,
                state=local,
                features=split.validation.features,
                labels=split.validation.labels,
                loss_bound=spec.metrics.loss_bound,
                auc_bins=spec.metrics.auc_bins,
                noise_multiplier=None if exact else spec.metrics.noise_multiplier,
            )
            metrics = ev.released()

        charged = tuple(
            ChargedEvent("train" if e is train_event else "metrics", e) for e in cost_events
        )
        eps = _wait_for_report(epsilons)
        report = DpReport(
            events=charged,
            max_grad_norm=spec.dp.max_grad_norm,
            delta=spec.dp.delta,
            task_epsilon=eps.task.epsilon,
            job_epsilon=eps.job.epsilon,
            dataset_epsilon=eps.lifetime.epsilon,
            policy_delta=policy.delta,
            accountant=eps.task.accountant,
            grad_sample_mode=result.grad_sample_mode,
        )
        blob = state_to_bytes(
            {k: v.to(torch.float32).contiguous() for k, v in result.delta.items()}
        )
        self._infos = self._compute_infos()
        meta = UpdateMeta(
            site_id=self.config.site_id,
            task_id=task.task_id,
            num_examples=result.num_examples,
            dp_report=report,
            metrics=metrics,
            total_size=len(blob),
            sha256=hashlib.sha256(blob).hexdigest(),
        )
        return meta, blob
