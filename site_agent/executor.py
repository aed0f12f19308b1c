"""The trust boundary: decide whether a task may run on this site's data, run it, and say
exactly what leaves.

Order of operations for every task (no gRPC here; ``site_agent.agent`` carries the bytes):

1. validate the declarative spec again (never trust the orchestrator's validation);
2. check the job's feature encoding against the site's own declared schema
   (``site_agent.encoding_check``) and project the task's privacy cost with RDP against the
   site's policy and the dataset's remaining budget, the model's size counted from the spec
   (``PolicyRefusal``). Steps 1-2 read public inputs only (task, spec, policy, declared
   schema, the dataset's disclosed row count), never the data, and run in :meth:`precheck`
   before the agent downloads the model (issue 17.4);
3. check the global model matches the spec's architecture;
4. **charge the ledger (durable) before anything computed on the data exists**, so a crash
   can over-count but never under-count (write-ahead);
5. encode the typed rows with the job's encoding, train with DP-SGD, release validation
   metrics through the Gaussian mechanism;
6. return only the noised delta, the example count and the DP report.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from common.domain import (
    ChargedEvent,
    DatasetInfo,
    DpReport,
    Metrics,
    PolicySummary,
    TaskAssignment,
    UpdateMeta,
)
from common.dp import noise
from common.dp.accounting import EpsilonBound, compute_epsilon
from common.dp.events import DpEvent
from common.dp.running import running_epsilon
from common.errors import InvalidSpecError, NotFoundError, PolicyRefusal
from common.models import build_model, count_spec_parameters
from common.schedule import task_schedule
from common.schema.encoding import FeatureEncoding
from common.specs import JobSpec, ModelSpec, job_spec_from_json
from common.tensors import check_update, state_from_bytes, state_to_bytes
from site_agent.admission import RoundCharges, run_admit
from site_agent.budget import budget_limit, release_update
from site_agent.canaries import canaries_for, score_canaries
from site_agent.catalog import WITHHELD, CatalogCounts, schema_of
from site_agent.config import DatasetConfig, SiteConfig
from site_agent.dask_engine import SYNCHRONOUS, StatsEngine, engine_client, row_count
from site_agent.data import LocalDataset, load_dataset, split_key, split_train_validation
from site_agent.device import resolve as resolve_device
from site_agent.encoding_check import checked_encoding
from site_agent.evaluation import run_evaluate
from site_agent.ledger import Ledger
from site_agent.mixture import run_gmm, run_gmm_local
from site_agent.policy import Projection, TaskCost, check_task
from site_agent.quantiles import run_quantiles
from site_agent.row_store import DiskDataset, EncodedRows
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
    of ms each) does not add to the round. Nothing here touches the data. The task's ε is
    exact; the job's and the lifetime's are :func:`common.dp.running.running_epsilon`
    bounds (at most ~2% above exact), so their cost does not grow with the history.
    """
    history = ledger.events(dataset, job_id=job_id)
    lifetime = ledger.events(dataset)
    out: Future[_ReportEpsilons] = Future()

    def run() -> None:
        try:
            out.set_result(
                _ReportEpsilons(
                    task=compute_epsilon(list(task_events), delta=delta, accountant=ACCOUNTANT),
                    # Informational, and growing every round: a dominating history's
                    # bound, recomputed once per step bucket (common.dp.running).
                    job=running_epsilon(history, delta=delta, accountant=ACCOUNTANT),
                    lifetime=running_epsilon(lifetime, delta=policy_delta, accountant=ACCOUNTANT),
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
    """A dataset's two sides. ``validation`` is None exactly when the dataset's configured
    ``validation_fraction`` is 0 (configuration, never the data); it may hold no rows."""

    train: LocalDataset
    validation: LocalDataset | None


@dataclass(frozen=True)
class _Shape:
    """What is public about a dataset's two sides: row counts and columns."""

    num_train: int
    num_validation: int | None  # None exactly when validation_fraction is 0
    feature_names: tuple[str, ...]
    label: str


@dataclass(frozen=True)
class _TrainPlan:
    """Everything a train task is decided on before the charge: public inputs only (the task,
    the spec, the site's policy and declared schema, the dataset's row count)."""

    spec: JobSpec
    model_spec: ModelSpec
    encoding: FeatureEncoding
    num_examples: int
    """The size q and the steps come from: the train rows plus included canaries, the rows
    counted by their disclosed (DP) number when the policy keeps sizes private."""
    sample_rate: float
    steps: int
    train_event: DpEvent
    metric_event: DpEvent | None
    cost_events: tuple[DpEvent, ...]
    projection: Projection
    exact: bool
    want_metrics: bool


class TaskExecutor:
    def __init__(self, config: SiteConfig, ledger: Ledger) -> None:
        self.config = config
        self.ledger = ledger
        self._splits: dict[str, _Split] = {}
        self._disk: dict[str, DiskDataset] = {}
        self._lock = threading.Lock()
        self._dask_client: Any | None = None
        for ds in config.datasets:
            self._shape(ds.name)  # fail fast on a broken dataset at start-up
        self._catalog = CatalogCounts(
            config.state_dir,
            ledger,
            config.policy,
            budget_limit=functools.partial(budget_limit, config),
        )
        self._infos: list[DatasetInfo] = self._compute_infos()

    # ------------------------------------------------------------ what the site discloses

    def _config(self, name: str) -> DatasetConfig:
        cfg = self.config.dataset(name)
        if cfg is None:
            raise NotFoundError(f"site {self.config.site_id} has no dataset named {name!r}")
        return cfg

    def _disk_dataset(self, name: str) -> DiskDataset:
        """A ``storage: disk`` dataset: its sides computed once (streamed), no rows loaded."""
        with self._lock:
            if name not in self._disk:
                self._disk[name] = DiskDataset(
                    self._config(name), self.config.state_dir, split_key(self.config.state_dir)
                )
            return self._disk[name]

    def _engine(self, name: str) -> StatsEngine | None:
        """The dataset's statistics engine: None for ``engine: local`` (the handler computes
        in-process); for ``engine: dask`` the site's cluster (connected on first use). Called
        by a handler only after its release is charged."""
        cfg = self._config(name)
        if cfg.engine != "dask":
            return None
        assert self.config.dask_scheduler is not None  # SiteConfig requires it
        names = self._shape(name).feature_names
        with self._lock:
            if self._dask_client is None and self.config.dask_scheduler != SYNCHRONOUS:
                self._dask_client = engine_client(self.config.dask_scheduler)
            return StatsEngine(cfg, names, self._dask_client)

    def _exact_rows(self, name: str, shape: _Shape) -> int | Callable[[], int]:
        """The catalog's exact count: the shape's, or (``engine: dask``) a function the
        catalog calls after its charge, folding the count on the site's cluster (connected
        here, before the charge: an unreachable scheduler costs no ε)."""
        engine = self._engine(name)
        if engine is None:
            return shape.num_train + (shape.num_validation or 0)
        return lambda: int(engine.fold(row_count, 0))

    def _shape(self, name: str) -> _Shape:
        cfg = self._config(name)
        if cfg.storage == "disk":
            d = self._disk_dataset(name)
            return _Shape(
                d.num_train,
                d.num_validation if cfg.validation_fraction > 0 else None,
                d.feature_names,
                cfg.label,
            )
        sp = self._split(name)
        return _Shape(
            len(sp.train.labels),
            None if sp.validation is None else len(sp.validation.labels),
            sp.train.feature_names,
            sp.train.label_name,
        )

    def _disclosed(self, name: str) -> _Shape:
        """The dataset's sizes as the site discloses them: exact by default; under
        ``policy.disclose_row_counts: false`` derived from the catalog's DP count alone
        (released once, charged through admission; :func:`_public_shape`).

        Raises:
            PolicyRefusal: sizes are private and no DP count was released.
        """
        shape = self._shape(name)
        if self.config.policy.disclose_row_counts:
            return shape
        with noise.secure_noise(self.config.policy.secure_noise):  # cached after the first
            dp_rows = self._catalog.noisy_count(name, self._exact_rows(name, shape))
        return _public_shape(shape, dp_rows, self._config(name))

    def _split(self, name: str) -> _Split:
        cfg = self._config(name)
        if cfg.storage == "disk":
            raise InvalidSpecError(
                f"The dataset {name!r} is stored on disk (storage: disk) and serves training "
                "tasks only; this task reads the table in memory."
            )
        with self._lock:
            if name not in self._splits:
                full = load_dataset(cfg)
                if cfg.validation_fraction > 0:
                    # Each record's side comes from a keyed hash of that record alone.
                    key = split_key(self.config.state_dir)
                    train, val = split_train_validation(full, cfg.validation_fraction, key)
                    self._splits[name] = _Split(train, val)
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
            sp = self._shape(cfg.name)
            n_val = sp.num_validation or 0
            # Charged (once, then cached) before the spend below is computed and disclosed.
            dp_rows = self._catalog.noisy_count(cfg.name, self._exact_rows(cfg.name, sp))
            if not self.config.policy.disclose_row_counts:
                # Only the DP count leaves (policy.disclose_row_counts: false): the sizes
                # registered are derived from it; none when it was withheld.
                try:
                    sp = _public_shape(sp, dp_rows, cfg)
                except PolicyRefusal:
                    sp = dataclasses.replace(sp, num_train=0, num_validation=0)
                n_val = sp.num_validation or 0
            # Disclosed with every heartbeat and recomputed after every task: the running
            # bound (common.dp.running, ≤ ~2% above exact), the same figure as the DP
            # report's lifetime ε, so a round's infos come from its cache (issue 19.1).
            spent = running_epsilon(
                self.ledger.events(cfg.name), delta=self.config.policy.delta, accountant=ACCOUNTANT
            ).epsilon
            out.append(
                DatasetInfo(
                    name=cfg.name,
                    num_rows=sp.num_train,
                    columns=sp.feature_names,
                    label=sp.label,
                    epsilon_spent=spent,
                    max_epsilon=budget_limit(self.config, cfg.name),
                    policy_delta=self.config.policy.delta,
                    num_validation_rows=n_val,
                    dp_num_rows=dp_rows,
                    schema=schema_of(cfg, sp.feature_names),
                    label_schema=cfg.label_schema(),
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
        # The last round: it always releases the metrics (if any), so each round's charges,
        # times the rounds, cover at least every release the job makes.
        # history=[]: the whole job's budget check is admission's, on the commitments.
        plan = self._plan_train(
            dataclasses.replace(task, kind="train", round=task.rounds), history=[]
        )
        metric = () if plan.metric_event is None else (("metrics", plan.metric_event),)
        return (("train", plan.train_event), *metric)

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
            "quantiles": run_quantiles,
        }
        handler = handlers.get(task.kind)
        if handler is None:
            raise InvalidSpecError(
                f"unknown task kind {task.kind!r}; this agent runs train, "
                f"{', '.join(handlers)}, audit, admit"
            )
        public = None if self.config.policy.disclose_row_counts else self._disclosed(task.dataset)
        split = self._split(task.dataset)
        if task.kind in ("synth", "quantiles", "gmm"):  # the engine computes after the charge
            handler = functools.partial(handler, engine=self._engine(task.dataset))
        result = handler(
            config=self.config,
            ledger=self.ledger,
            task=task,
            data=(split.train, split.validation),
        )
        self._infos = self._compute_infos()  # the spend moved
        return result if public is None else _with_public_count(task.kind, result, public)

    def execute(self, task: TaskAssignment, global_blob: bytes) -> tuple[UpdateMeta, bytes]:
        """Run one task; raises PolicyRefusal / InvalidSpecError / NotFoundError to refuse it.

        Every noise value the task draws comes from the source the site's policy names
        (``policy.secure_noise``; :mod:`common.dp.noise`), set for this thread while it runs.
        """
        with noise.secure_noise(self.config.policy.secure_noise):
            return self._execute(task, global_blob)

    def precheck(self, task: TaskAssignment) -> None:
        """Refuse a task from public inputs alone, before its model is downloaded or built
        (issue 17.4): for a train task, the spec, the encoding against this site's declared
        schema and the site's policy (model kind and size from the spec, σ, δ, projected ε).
        ``execute`` checks all of it again."""
        if task.kind == "train":
            self._plan_train(task)

    def _plan_train(
        self, task: TaskAssignment, *, history: list[DpEvent] | None = None
    ) -> _TrainPlan:
        """Every decision of a train task before the charge, from public inputs only.

        The budget check composes ``history`` (default: the dataset's commitments now, every
        charge and every other job's reservation; the charge passes them from inside its
        transaction)."""
        spec: JobSpec = job_spec_from_json(task.job_spec_json)
        if spec.dataset != task.dataset:
            raise InvalidSpecError(
                f"task names dataset {task.dataset!r} but its spec names {spec.dataset!r}"
            )
        cfg = self._config(task.dataset)
        shape = self._disclosed(task.dataset)
        job_encoding = spec.encoding.feature_encoding() if spec.encoding.derived else None
        if job_encoding is None and spec.encoding.numeric != "minmax":
            raise InvalidSpecError(
                "the job asks for a quantile encoding but carries no derived encoding; the "
                "orchestrator derives it when the job is submitted"
            )
        encoding = checked_encoding(cfg, shape.feature_names, job_encoding, what="training")
        model_spec = _model_spec_for(spec.model, encoding)
        # The row count as disclosed (registration); canaries are drawn by secret coins.
        num_examples = shape.num_train + self._included_canaries(task, spec, encoding)
        q, steps = task_schedule(
            num_examples=num_examples,
            batch_size=spec.batch_size,
            local_epochs=spec.local_epochs,
            local_steps=spec.local_steps,
        )
        exact = spec.metrics.enabled and spec.metrics.exact
        # Only in the rounds the job releases metrics (metrics.every; by default the last).
        want_metrics = (
            spec.metrics.releases_at(task.round, task.rounds) and shape.num_validation is not None
        )
        train_event = DpEvent(noise_multiplier=task.noise_multiplier, sample_rate=q, steps=steps)
        metric_event = (
            DpEvent(noise_multiplier=spec.metrics.noise_multiplier, sample_rate=1.0, steps=1)
            if want_metrics and not exact
            else None
        )
        cost_events = (train_event,) + ((metric_event,) if metric_event else ())
        projection = check_task(
            policy=self.config.policy,
            max_epsilon=budget_limit(self.config, task.dataset),
            dataset=task.dataset,
            model_kind=spec.model.kind,
            # From the spec: nothing is built before the policy admits its size.
            num_parameters=count_spec_parameters(model_spec),
            round=task.round,
            rounds=task.rounds,
            noise_multiplier=task.noise_multiplier,
            task_delta=spec.dp.delta,
            steps=steps,
            cost=TaskCost(events=cost_events, delta=spec.dp.delta),
            history=(
                self.ledger.commitments(task.dataset, excluding_job=task.job_id)
                if history is None
                else history
            ),
            exact_metrics=exact and want_metrics,
        )
        return _TrainPlan(
            spec=spec,
            model_spec=model_spec,
            encoding=encoding,
            num_examples=num_examples,
            sample_rate=q,
            steps=steps,
            train_event=train_event,
            metric_event=metric_event,
            cost_events=cost_events,
            projection=projection,
            exact=exact,
            want_metrics=want_metrics,
        )

    def _encoded_rows(
        self, name: str, encoding: FeatureEncoding
    ) -> tuple[EncodedRows, EncodedRows | None]:
        """The (train, validation) rows of a dataset under ``encoding``: encoded in memory, or
        from the row cache of a ``storage: disk`` dataset (memory-mapped)."""
        if self._config(name).storage == "disk":
            train, val = self._disk_dataset(name).encoded(encoding)
            return train, (val if self._shape(name).num_validation is not None else None)
        split = self._split(name)
        rows = EncodedRows(encoding.encode(split.train.table), split.train.labels)
        if split.validation is None:
            return rows, None
        return rows, EncodedRows(encoding.encode(split.validation.table), split.validation.labels)

    def _included_canaries(self, task: TaskAssignment, spec: JobSpec, enc: FeatureEncoding) -> int:
        if spec.audit is None:
            return 0
        _, _, included = canaries_for(self.config.state_dir, task.job_id, spec, enc)
        return int(included.sum())

    def _execute(self, task: TaskAssignment, global_blob: bytes) -> tuple[UpdateMeta, bytes]:
        if task.kind != "train":
            return self._execute_other(task, global_blob)
        plan = self._plan_train(task)
        spec, projection = plan.spec, plan.projection
        q, steps, sigma = plan.sample_rate, plan.steps, task.noise_multiplier
        train_event, metric_event, cost_events = (
            plan.train_event,
            plan.metric_event,
            plan.cost_events,
        )
        policy = self.config.policy
        if hashlib.sha256(global_blob).hexdigest() != task.model_sha256:
            raise InvalidSpecError("the global model's bytes do not match the task's sha256")
        model = build_model(plan.model_spec)
        reference = model.state_dict()
        global_state = state_from_bytes(global_blob)
        check_update(global_state, reference)
        log.info(
            "site=%s job=%s round=%d accepted: projected ε %.3f → %.3f of %.3f",
            self.config.site_id,
            task.job_id,
            task.round,
            projection.epsilon_before,
            projection.epsilon_after,
            projection.max_epsilon,
        )

        # Write-ahead: durable before anything computed on the data exists. The policy and
        # budget are checked again inside the charge's transaction (site_agent.ledger), so
        # nothing can spend between the check and the charge.
        self.ledger.charge(
            dataset=task.dataset,
            job_id=task.job_id,
            round=task.round,
            task_id=task.task_id,
            kind=["train"] + (["metrics"] if metric_event is not None else []),
            events=list(cost_events),
            delta=spec.dp.delta,
            check=lambda history: self._plan_train(task, history=history),
        )
        epsilons = _report_epsilons_in_background(
            self.ledger,
            task_events=cost_events,
            dataset=task.dataset,
            job_id=task.job_id,
            delta=spec.dp.delta,
            policy_delta=policy.delta,
        )

        train_rows, validation_rows = self._encoded_rows(task.dataset, plan.encoding)
        if spec.audit is not None:
            # The audit's canaries train like any record: the ones whose secret coin came up.
            cx, cy, included = canaries_for(self.config.state_dir, task.job_id, spec, plan.encoding)
            train_rows = train_rows.with_extra(cx[included], cy[included])
        # A memory-mapped table is read one Poisson batch at a time; rows in memory train
        # from arrays, as before.
        features, labels = (train_rows, None) if train_rows.maps else train_rows.arrays()
        result = train_local(
            model_spec=plan.model_spec,
            global_state=global_state,
            features=features,
            labels=labels,
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
                device=str(resolve_device(self.config.device)),
                # The disclosed size (plus included canaries), when sizes are private: q and
                # the normalisation are then exactly those charged, never from the true count.
                public_num_examples=(
                    None if self.config.policy.disclose_row_counts else plan.num_examples
                ),
            ),
        )
        if result.steps != steps or abs(result.sample_rate - q) > 1e-12 * q:
            # Never release an update whose DP event differs from the one in the ledger.
            raise InvalidSpecError(
                f"internal: trained {result.steps} steps at q={result.sample_rate:g}, "
                f"charged {steps} at q={q:g}; update withheld"
            )
        metrics: Metrics | None = None
        if plan.want_metrics and validation_rows is not None and len(validation_rows) > 0:
            local = {k: global_state[k] + result.delta[k] for k in global_state}
            ev = evaluate(
                model_spec=plan.model_spec,
                state=local,
                features=validation_rows.x,
                labels=validation_rows.y,
                loss_bound=spec.metrics.loss_bound,
                auc_bins=spec.metrics.auc_bins,
                noise_multiplier=None if plan.exact else spec.metrics.noise_multiplier,
            )
            metrics = ev.released()
            validation_rows.release_pages()  # a memory-mapped side: its pages, not the RSS

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


def _public_shape(shape: _Shape, dp_rows: float, cfg: DatasetConfig) -> _Shape:
    """``shape`` with sizes from the DP count ``dp_rows`` of all rows alone (post-processing):
    ``round(dp_rows · validation_fraction)`` validation rows, the rest (at least 1) train rows.

    Raises:
        PolicyRefusal: the count was withheld (budget or σ floor), so no size is public.
    """
    if dp_rows == WITHHELD:
        raise PolicyRefusal(
            f"The site keeps the size of dataset {cfg.name!r} private "
            "(policy.disclose_row_counts: false) and its DP row count was withheld (the "
            "budget or the σ floor did not allow it), so it serves no task: a sample rate "
            "or an example count would disclose the exact size."
        )
    n_val = None if shape.num_validation is None else round(dp_rows * cfg.validation_fraction)
    n_train = max(1, round(dp_rows) - (n_val or 0))
    return dataclasses.replace(shape, num_train=n_train, num_validation=n_val)


def _with_public_count(
    kind: str, answer: tuple[UpdateMeta, bytes], shape: _Shape
) -> tuple[UpdateMeta, bytes]:
    """A non-training answer with every example count it carries replaced by the disclosed
    size (``policy.disclose_row_counts: false``): the meta's ``num_examples`` (kept at 0 when
    the handler sends none, as noised metrics do) and a local mixture fit's ``rows`` weight.
    The DP results themselves are unchanged."""
    meta, blob = answer
    total = shape.num_train + (shape.num_validation or 0)
    result_json = meta.result_json
    if kind == "gmm_local":  # its fit is weighted by its rows (orchestrator.gmm_runner)
        result_json = json.dumps({**json.loads(result_json), "rows": total})
    return (
        dataclasses.replace(
            meta,
            num_examples=meta.num_examples and total,
            result_json=result_json,
        ),
        blob,
    )


def _model_spec_for(model: ModelSpec, encoding: FeatureEncoding) -> ModelSpec:
    """``model`` with ``input_dim``/``num_classes`` from the encoding (public: the schema).

    Raises:
        InvalidSpecError: the spec states either and it differs from the encoding's.
    """
    derived = {"input_dim": encoding.width, "num_classes": encoding.num_classes}
    for key, value in derived.items():
        given = getattr(model, key)
        if given is not None and given != value:
            raise InvalidSpecError(
                f"model.{key}={given} but the feature encoding gives {key}={value}"
            )
    return model.model_copy(update=derived)
