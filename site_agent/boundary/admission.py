"""Admission: the one check every release at this site passes before it is charged.

A task's handler states what it would release as a :class:`Release` (its DP events, the δ it
records, what it is, and for DP-SGD the model and schedule), derived from public inputs only.
:func:`check_release` refuses it (:class:`~common.errors.PolicyRefusal`, one message format
for every kind: the dataset, the offending value and the limit) when

1. it declares no DP event;
2. (DP-SGD) the model kind is not in ``policy.allowed_models``, the model has more than
   ``policy.max_parameters`` parameters, the job plans more than ``policy.max_rounds`` rounds
   or the task's round is past the job's declared rounds, the task runs more than
   ``policy.max_steps_per_task`` steps, or its noise multiplier is below
   ``policy.min_noise_multiplier``;
3. any event's noise multiplier is below ``policy.min_noise_multiplier``;
4. a δ it asks for or records is above ``policy.delta``;
5. it releases exact (un-noised) metrics and ``policy.allow_exact_metrics`` is false;
6. the dataset's commitments (every charge and every other admitted job's unused
   reservation) plus its events, composed by RDP at the *policy's* δ, would exceed the
   budget, or cannot be bounded.

:func:`admit_and_charge` runs the same check again inside the ledger transaction that records
the charge, so nothing can spend between the check and the charge. The RDP projection
(Mironov 2017; Mironov, Talwar & Zhang 2019) is an upper bound on the tight PRV/PLD ε that
reports use, so an admitted release can never push the reported ε past the limit
(``docs/site-pipeline.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.dp.events import DpEvent
from common.dp.rdp import rdp_epsilon
from common.errors import PolicyRefusal, PrivacyAccountingError
from site_agent.boundary.ledger import Ledger
from site_agent.config import Policy

__all__ = [
    "Projection",
    "Release",
    "TaskCost",
    "Training",
    "admit_and_charge",
    "check_release",
    "commitments_for",
    "project",
]


@dataclass(frozen=True)
class TaskCost:
    """What a release would add to the ledger: its DP events, recorded at δ = ``delta``."""

    events: tuple[DpEvent, ...]
    delta: float

    def __post_init__(self) -> None:
        events = tuple(self.events)
        if not events:
            raise ValueError("A task's cost must contain at least one DP event.")
        for e in events:
            if not isinstance(e, DpEvent):
                raise ValueError(f"A task's cost is made of DpEvent instances, got {e!r}.")
        if not (isinstance(self.delta, int | float) and 0 < self.delta < 1):
            raise ValueError(f"A task's δ must be in (0, 1), got {self.delta!r}.")
        object.__setattr__(self, "events", events)


@dataclass(frozen=True)
class Projection:
    """ε of a dataset before and after a release, projected by RDP at the policy's δ."""

    epsilon_before: float
    epsilon_after: float
    max_epsilon: float
    accountant: str

    @property
    def within_budget(self) -> bool:
        return self.epsilon_after <= self.max_epsilon


@dataclass(frozen=True)
class Training:
    """The DP-SGD parameters of a train task the policy rules on (all public)."""

    model_kind: str
    num_parameters: int
    """Counted from the spec (``common.training.models.count_spec_parameters``): nothing is
    built first."""
    round: int
    rounds: int
    noise_multiplier: float
    task_delta: float
    """The δ the job asks for (``dp.delta``)."""
    steps: int


@dataclass(frozen=True)
class Release:
    """What a task would release, stated by its handler from public inputs only."""

    what: str
    """What is refused, for the message: "the task", "the job", "the evaluation of model m"."""
    events: tuple[DpEvent, ...]
    delta: float
    """The δ the charge records."""
    kinds: tuple[str, ...]
    """The ledger kind of each event (``"train"``, ``"metrics"``, ``"synth"``, ...)."""
    scope: str = "this release"
    """What adds the cost, for the budget message: "this task (round 2 of 5)", "its 5 rounds"."""
    training: Training | None = None
    exact_metrics: bool = False
    round: int = 0
    """The round the ledger records the charge under (a train task's round; else 0)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", tuple(self.events))
        kinds = tuple(self.kinds)
        if len(kinds) == 1:  # one kind names every event
            kinds = kinds * len(self.events)
        if len(kinds) != len(self.events):
            raise ValueError(f"{len(kinds)} kinds given for {len(self.events)} events.")
        object.__setattr__(self, "kinds", kinds)


def project(
    *,
    history: Sequence[DpEvent],
    cost: TaskCost,
    policy_delta: float,
    max_epsilon: float,
) -> Projection:
    """RDP ε of ``history`` and of ``history`` + ``cost.events``, at ``policy_delta``.

    Raises :class:`PrivacyAccountingError` when either cannot be bounded.
    """
    _check_max_epsilon(max_epsilon)
    before = rdp_epsilon(history, delta=policy_delta)
    after = rdp_epsilon([*history, *cost.events], delta=policy_delta)
    return Projection(
        epsilon_before=before, epsilon_after=after, max_epsilon=max_epsilon, accountant="rdp"
    )


def _check_max_epsilon(max_epsilon: float) -> None:
    if not (
        isinstance(max_epsilon, int | float) and math.isfinite(max_epsilon) and max_epsilon > 0
    ):
        raise ValueError(f"The ε limit must be positive and finite, got {max_epsilon!r}.")


def check_release(
    *,
    policy: Policy,
    max_epsilon: float,
    dataset: str,
    release: Release,
    history: Sequence[DpEvent],
) -> Projection:
    """Refuse (``PolicyRefusal``) a release that would break ``policy`` (the module
    docstring's rules, in that order: cheapest first); else return its projection.

    ``max_epsilon`` is the dataset's budget (``site_agent.boundary.budget.budget_limit``);
    ``history`` its commitments (``Ledger.commitments``).
    """
    _check_max_epsilon(max_epsilon)

    def refuse(reason: str) -> PolicyRefusal:
        return PolicyRefusal(f"This site refuses {release.what} on dataset {dataset!r}: {reason}")

    if not release.events:
        raise refuse("it declares no DP event.")
    train = release.training
    if train is not None:
        _check_training(policy, train, refuse)
    weakest = min(release.events, key=lambda e: e.noise_multiplier)
    if weakest.noise_multiplier < policy.min_noise_multiplier:
        hint = (
            "raise the noise of that release (e.g. metrics.noise_multiplier)"
            if train is not None
            else "raise its noise multiplier"
        )
        raise refuse(
            f"it would release a result with noise multiplier σ={weakest.noise_multiplier:g} "
            f"(sample rate {weakest.sample_rate:g}), below the policy's minimum of "
            f"{policy.min_noise_multiplier:g}; {hint}."
        )
    deltas = (("the job's", train.task_delta),) if train is not None else ()
    for label, value in (*deltas, ("the recorded", release.delta)):
        if value > policy.delta:
            field = "dp.delta" if train is not None else "δ"
            raise refuse(
                f"{label} δ={value:g} is larger than the policy's δ={policy.delta:g}; "
                f"request {field} ≤ {policy.delta:g}."
            )
    if release.exact_metrics and not policy.allow_exact_metrics:
        raise refuse(
            "the job asks for exact (un-noised) validation metrics, which this site's policy "
            "does not allow; set metrics.exact to false."
        )
    try:
        projection = project(
            history=history,
            cost=TaskCost(events=release.events, delta=release.delta),
            policy_delta=policy.delta,
            max_epsilon=max_epsilon,
        )
    except PrivacyAccountingError as err:
        raise refuse(
            f"the privacy cost of {release.scope} cannot be bounded ({err}); raise the noise "
            "multiplier or lower the number of steps."
        ) from err
    if not projection.within_budget:
        raise refuse(
            f"the dataset has spent or promised to admitted jobs ε≤"
            f"{projection.epsilon_before:.4g} and {release.scope} would bring it to "
            f"ε≤{projection.epsilon_after:.4g} (RDP bound at the policy's δ={policy.delta:g}), "
            f"over the site's budget of ε={max_epsilon:g}; raise the noise multiplier, or "
            "lower the rounds, steps or sample rate."
        )
    return projection


def _check_training(policy: Policy, t: Training, refuse: Callable[[str], PolicyRefusal]) -> None:
    """The rules on a DP-SGD task's model and schedule (2 in the module docstring)."""
    if t.model_kind not in policy.allowed_models:
        allowed = ", ".join(policy.allowed_models) or "none"
        raise refuse(
            f"model kind {t.model_kind!r} is not allowed by the site's policy (allowed: {allowed})."
        )
    if t.num_parameters > policy.max_parameters:
        raise refuse(
            f"the model has {t.num_parameters:,} parameters, more than the policy's limit of "
            f"{policy.max_parameters:,}; use a smaller model."
        )
    if t.rounds > policy.max_rounds:
        raise refuse(
            f"the job plans {t.rounds} rounds, more than the policy's limit of "
            f"{policy.max_rounds}; submit a job with at most {policy.max_rounds} rounds."
        )
    if t.round > t.rounds:
        raise refuse(
            f"round {t.round} is past the {t.rounds} rounds the job declared; "
            "a job cannot run more rounds than it planned."
        )
    if t.steps > policy.max_steps_per_task:
        raise refuse(
            f"the task asks for {t.steps:,} DP-SGD steps, more than the policy's limit of "
            f"{policy.max_steps_per_task:,} per task; lower local_steps or local_epochs."
        )
    if t.noise_multiplier < policy.min_noise_multiplier:
        raise refuse(
            f"the noise multiplier σ={t.noise_multiplier:g} is below the policy's minimum of "
            f"{policy.min_noise_multiplier:g}; raise dp.noise_multiplier or lower the target ε."
        )


def commitments_for(ledger: Ledger, dataset: str, job_id: str, release: Release) -> list[DpEvent]:
    """What the budget check of ``release`` composes now: the dataset's commitments, less
    its own job's reservation when it is a training charge (which draws on that reservation;
    ``Ledger.charge`` reads the same inside its transaction)."""
    own = job_id if "train" in release.kinds else None
    return ledger.commitments(dataset, excluding_job=own)


def admit_and_charge(
    *,
    ledger: Ledger,
    policy: Policy,
    max_epsilon: float,
    dataset: str,
    job_id: str,
    task_id: str,
    release: Release,
) -> Projection:
    """Check ``release`` (:func:`check_release`) and charge its events in one ledger
    transaction; raises ``PolicyRefusal`` having recorded nothing. Only after it returns may
    anything be computed from the data."""
    projections: list[Projection] = []

    def check(history: list[DpEvent]) -> None:
        projections.append(
            check_release(
                policy=policy,
                max_epsilon=max_epsilon,
                dataset=dataset,
                release=release,
                history=history,
            )
        )

    if not release.events:  # refused by the check's first rule, before the ledger sees it
        check([])
    ledger.charge(
        dataset=dataset,
        job_id=job_id,
        round=release.round,
        task_id=task_id,
        kind=list(release.kinds),
        events=list(release.events),
        delta=release.delta,
        check=check,
    )
    return projections[-1]
