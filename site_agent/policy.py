"""The site's enforcement of its own privacy policy on every task, before it trains.

Specification
=============

The :class:`~site_agent.config.Policy` comes from the site's config file, never from the wire
(see ``site_agent/config.py``). :func:`check_task` is the trust boundary: the agent calls it on
every task, with the task's parameters and with the :class:`TaskCost` the agent itself derived
from them (the DP events the task would charge to the ledger). It raises
:class:`~common.errors.PolicyRefusal`, with a message that names the dataset, the offending
value and the limit, when

1. the model kind is not in ``policy.allowed_models``;
2. the model has more than ``policy.max_parameters`` parameters;
3. the job plans more than ``policy.max_rounds`` rounds, or the task's round is past the
   job's planned rounds (an orchestrator cannot stretch a job beyond what it declared);
4. the task asks for more than ``policy.max_steps_per_task`` DP-SGD steps;
5. the DP-SGD noise multiplier, or that of any other release in the task's cost (noised
   metrics), is below ``policy.min_noise_multiplier``;
6. the job's δ (or the cost's) is above ``policy.delta``;
7. the task wants exact (un-noised) metrics and ``policy.allow_exact_metrics`` is false;
8. the composed ε of the dataset's history plus the task's cost, at ``policy.delta``, would
   exceed ``max_epsilon`` (the site's per-dataset limit), or cannot be bounded at all.

The budget check (8) is a *projection* with the Rényi DP accountant (Mironov 2017, "Rényi
Differential Privacy", CSF; Mironov, Talwar & Zhang 2019 for the sampled Gaussian mechanism of
Abadi et al. 2016's DP-SGD): fast, and an upper bound on the tight PRV/PLD ε reported in model
cards, so a task it accepts can never push the tight ε past the limit either. The price of
that margin is that a task whose tight ε would just fit can be refused (RDP is typically
5-10% above PRV for DP-SGD). The budget is enforced at the *policy's* δ, whatever δ the job
asked for: a job cannot buy budget by requesting a larger δ (6 refuses that anyway) and a
smaller one does not change the site's limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from common.dp.events import DpEvent
from common.dp.rdp import rdp_epsilon
from common.errors import PolicyRefusal, PrivacyAccountingError
from site_agent.config import Policy

__all__ = ["Projection", "TaskCost", "check_task", "project"]


@dataclass(frozen=True)
class TaskCost:
    """What a task would add to the ledger: its DP events, recorded at δ = ``delta``."""

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
    """ε of a dataset before and after a task, projected by RDP at the policy's δ."""

    epsilon_before: float
    epsilon_after: float
    max_epsilon: float
    accountant: str

    @property
    def within_budget(self) -> bool:
        return self.epsilon_after <= self.max_epsilon


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


def check_task(
    *,
    policy: Policy,
    max_epsilon: float,
    dataset: str,
    model_kind: str,
    num_parameters: int,
    round: int,
    rounds: int,
    noise_multiplier: float,
    task_delta: float,
    steps: int,
    cost: TaskCost,
    history: Sequence[DpEvent],
    exact_metrics: bool,
) -> Projection:
    """Refuse (``PolicyRefusal``) a task that would break ``policy``; else return its projection.

    ``max_epsilon`` is the site's limit for this dataset (``SiteConfig.max_epsilon_for``);
    ``history`` is every event already charged to the dataset (``Ledger.events``). See the
    module docstring for the rules, checked in that order.
    """
    _check_max_epsilon(max_epsilon)
    where = f"dataset {dataset!r}"

    def refuse(reason: str) -> PolicyRefusal:
        return PolicyRefusal(f"This site refuses the task on {where}: {reason}")

    if model_kind not in policy.allowed_models:
        allowed = ", ".join(policy.allowed_models) or "none"
        raise refuse(
            f"model kind {model_kind!r} is not allowed by the site's policy (allowed: {allowed})."
        )
    if num_parameters > policy.max_parameters:
        raise refuse(
            f"the model has {num_parameters:,} parameters, more than the policy's limit of "
            f"{policy.max_parameters:,}; use a smaller model."
        )
    if rounds > policy.max_rounds:
        raise refuse(
            f"the job plans {rounds} rounds, more than the policy's limit of "
            f"{policy.max_rounds}; submit a job with at most {policy.max_rounds} rounds."
        )
    if round > rounds:
        raise refuse(
            f"round {round} is past the {rounds} rounds the job declared; "
            "a job cannot run more rounds than it planned."
        )
    if steps > policy.max_steps_per_task:
        raise refuse(
            f"the task asks for {steps:,} DP-SGD steps, more than the policy's limit of "
            f"{policy.max_steps_per_task:,} per task; lower local_steps or local_epochs."
        )
    if noise_multiplier < policy.min_noise_multiplier:
        raise refuse(
            f"the noise multiplier σ={noise_multiplier:g} is below the policy's minimum of "
            f"{policy.min_noise_multiplier:g}; raise dp.noise_multiplier or lower the target ε."
        )
    weakest = min(cost.events, key=lambda e: e.noise_multiplier)
    if weakest.noise_multiplier < policy.min_noise_multiplier:
        raise refuse(
            f"the task would release a result with noise multiplier "
            f"σ={weakest.noise_multiplier:g} (sample rate {weakest.sample_rate:g}), below the "
            f"policy's minimum of {policy.min_noise_multiplier:g}; raise the noise of that "
            "release (e.g. metrics.noise_multiplier)."
        )
    for label, value in (("the job's", task_delta), ("the task's recorded", cost.delta)):
        if value > policy.delta:
            raise refuse(
                f"{label} δ={value:g} is larger than the policy's δ={policy.delta:g}; "
                f"request dp.delta ≤ {policy.delta:g}."
            )
    if exact_metrics and not policy.allow_exact_metrics:
        raise refuse(
            "the job asks for exact (un-noised) validation metrics, which this site's policy "
            "does not allow; set metrics.exact to false."
        )
    try:
        projection = project(
            history=history, cost=cost, policy_delta=policy.delta, max_epsilon=max_epsilon
        )
    except PrivacyAccountingError as err:
        raise refuse(
            f"the privacy cost of the task cannot be bounded ({err}); raise the noise "
            "multiplier or lower the number of steps."
        ) from err
    if not projection.within_budget:
        raise refuse(
            f"the dataset has spent ε≤{projection.epsilon_before:.4g} and this task "
            f"(round {round} of {rounds}) would bring it to ε≤{projection.epsilon_after:.4g} "
            f"(RDP bound at the policy's δ={policy.delta:g}), over the site's limit of "
            f"ε={max_epsilon:g}; raise the noise multiplier, or lower the rounds, steps "
            "or sample rate."
        )
    return projection
