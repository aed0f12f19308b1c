"""Unit tests for site_agent.boundary.admission: every refusal reason, and the budget
projection, on training releases and on every other kind."""

from __future__ import annotations

from typing import Any

import pytest

from common.dp.events import DpEvent
from common.dp.rdp import rdp_epsilon
from common.errors import PolicyRefusal
from site_agent.boundary.admission import (
    Projection,
    Release,
    TaskCost,
    Training,
    check_release,
    project,
)
from site_agent.config import Policy

POLICY = Policy(
    max_epsilon=10.0,
    delta=1e-5,
    min_noise_multiplier=0.8,
    max_rounds=50,
    max_steps_per_task=500,
    allowed_models=("linear", "mlp"),
    max_parameters=10_000,
    allow_exact_metrics=False,
)
SGD = DpEvent(1.0, 0.01, 200)
METRIC = DpEvent(20.0, 1.0, 1)


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
    history: list[DpEvent],
    exact_metrics: bool,
) -> Projection:
    """The one admission check on a train task's release (as the train handler states it)."""
    release = Release(
        what="the task",
        events=cost.events,
        delta=cost.delta,
        kinds=("train",) + ("metrics",) * (len(cost.events) - 1),
        scope=f"this task (round {round} of {rounds})",
        training=Training(
            model_kind=model_kind,
            num_parameters=num_parameters,
            round=round,
            rounds=rounds,
            noise_multiplier=noise_multiplier,
            task_delta=task_delta,
            steps=steps,
        ),
        exact_metrics=exact_metrics,
    )
    return check_release(
        policy=policy, max_epsilon=max_epsilon, dataset=dataset, release=release, history=history
    )


def task(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of an acceptable task; overrides make it break one rule."""
    kwargs: dict[str, Any] = {
        "policy": POLICY,
        "max_epsilon": 8.0,
        "dataset": "digits",
        "model_kind": "mlp",
        "num_parameters": 5_000,
        "round": 1,
        "rounds": 20,
        "noise_multiplier": SGD.noise_multiplier,
        "task_delta": 1e-5,
        "steps": SGD.steps,
        "cost": TaskCost(events=(SGD, METRIC), delta=1e-5),
        "history": [],
        "exact_metrics": False,
    }
    kwargs.update(overrides)
    return kwargs


def refusal(**overrides: Any) -> str:
    with pytest.raises(PolicyRefusal) as info:
        check_task(**task(**overrides))
    message = str(info.value)
    assert "'digits'" in message  # names the dataset
    assert message.endswith(".")  # a full sentence
    return message


def test_acceptable_task_returns_projection() -> None:
    projection = check_task(**task())
    expected_after = rdp_epsilon([SGD, METRIC], delta=POLICY.delta)
    assert projection == Projection(
        epsilon_before=0.0, epsilon_after=expected_after, max_epsilon=8.0, accountant="rdp"
    )
    assert projection.within_budget


def test_refuses_model_kind_not_allowed() -> None:
    message = refusal(model_kind="cnn2d")
    assert "'cnn2d'" in message and "linear, mlp" in message


def test_refuses_too_many_parameters() -> None:
    message = refusal(num_parameters=10_001)
    assert "10,001" in message and "10,000" in message
    check_task(**task(num_parameters=10_000))  # the limit itself is allowed


def test_refuses_too_many_rounds() -> None:
    message = refusal(rounds=51)
    assert "51 rounds" in message and "50" in message
    check_task(**task(rounds=50))


def test_refuses_round_past_declared_rounds() -> None:
    message = refusal(round=21, rounds=20)
    assert "round 21" in message and "20 rounds" in message


def test_refuses_too_many_steps() -> None:
    cost = TaskCost(events=(DpEvent(1.0, 0.01, 501),), delta=1e-5)
    message = refusal(steps=501, cost=cost)
    assert "501" in message and "500" in message


def test_refuses_noise_multiplier_below_minimum() -> None:
    cost = TaskCost(events=(DpEvent(0.79, 0.01, 200),), delta=1e-5)
    message = refusal(noise_multiplier=0.79, cost=cost)
    assert "σ=0.79" in message and "0.8" in message


def test_refuses_weak_noise_in_any_release_of_the_cost() -> None:
    cost = TaskCost(events=(SGD, DpEvent(0.5, 1.0, 1)), delta=1e-5)
    message = refusal(cost=cost)
    assert "σ=0.5" in message and "metrics.noise_multiplier" in message


def test_refuses_delta_above_policy() -> None:
    message = refusal(task_delta=1e-4)
    assert "δ=0.0001" in message and "δ=1e-05" in message
    message = refusal(cost=TaskCost(events=(SGD,), delta=2e-5))
    assert "δ=2e-05" in message


def test_refuses_exact_metrics_unless_allowed() -> None:
    message = refusal(exact_metrics=True)
    assert "exact" in message
    permissive = POLICY.model_copy(update={"allow_exact_metrics": True})
    check_task(**task(exact_metrics=True, policy=permissive))


def test_refuses_task_over_budget() -> None:
    history = [DpEvent(1.0, 0.01, 2000)]  # ε_RDP ≈ 2.3 at δ=1e-5
    before = rdp_epsilon(history, delta=POLICY.delta)
    after = rdp_epsilon([*history, SGD, METRIC], delta=POLICY.delta)
    assert before < after
    message = refusal(history=history, max_epsilon=(before + after) / 2)
    assert f"{before:.4g}" in message and f"{after:.4g}" in message
    assert f"{(before + after) / 2:g}" in message
    assert "δ=1e-05" in message
    # Exactly at the limit is allowed.
    check_task(**task(history=history, max_epsilon=after))


def test_budget_is_enforced_at_the_policys_delta() -> None:
    # A job asking for a smaller δ does not get a looser budget: the site projects at its own
    # δ, where ε is smaller than at the job's δ would suggest... but the same for every job.
    history = [DpEvent(1.0, 0.01, 1000)]
    strict = check_task(**task(history=history, task_delta=1e-9))
    assert strict.epsilon_after == rdp_epsilon([*history, SGD, METRIC], delta=POLICY.delta)


def test_refuses_already_exhausted_dataset() -> None:
    history = [DpEvent(0.8, 0.05, 2000)]
    message = refusal(history=history, max_epsilon=5.0)
    assert "would bring it to" in message


def test_refuses_unboundable_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    # (σ small enough to overflow the accountant cannot be expressed as a DpEvent any more,
    # so make the accountant fail instead.)
    import site_agent.boundary.admission as policy_mod
    from common.errors import PrivacyAccountingError

    def broken(*_a: object, **_k: object) -> float:
        raise PrivacyAccountingError("not a usable bound")

    monkeypatch.setattr(policy_mod, "rdp_epsilon", broken)
    permissive = POLICY.model_copy(update={"min_noise_multiplier": 0.01})
    cost = TaskCost(events=(DpEvent(0.01, 1.0, 1),), delta=1e-5)
    message = refusal(policy=permissive, noise_multiplier=0.01, cost=cost)
    assert "cannot be bounded" in message


def test_checks_are_ordered_cheapest_first() -> None:
    # A task breaking several rules is refused for the first one (the model), before any
    # accounting happens.
    message = refusal(model_kind="cnn1d", noise_multiplier=0.1, rounds=1000)
    assert "cnn1d" in message


def test_project_reports_before_and_after() -> None:
    history = [DpEvent(1.0, 0.01, 500)]
    cost = TaskCost(events=(SGD,), delta=1e-5)
    p = project(history=history, cost=cost, policy_delta=1e-5, max_epsilon=1.0)
    assert p.epsilon_before == rdp_epsilon(history, delta=1e-5)
    assert p.epsilon_after == rdp_epsilon([*history, SGD], delta=1e-5)
    assert p.accountant == "rdp"
    assert p.within_budget is (p.epsilon_after <= 1.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_max_epsilon_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="ε limit"):
        check_task(**task(max_epsilon=bad))


def test_task_cost_validation() -> None:
    with pytest.raises(ValueError, match="at least one"):
        TaskCost(events=(), delta=1e-5)
    with pytest.raises(ValueError, match="δ"):
        TaskCost(events=(SGD,), delta=0.0)
    with pytest.raises(ValueError, match="DpEvent"):
        TaskCost(events=((1.0, 0.01, 1),), delta=1e-5)  # type: ignore[arg-type]
    assert TaskCost(events=[SGD], delta=1e-5).events == (SGD,)  # type: ignore[arg-type]


def _other(events: tuple[DpEvent, ...], delta: float = 1e-5) -> Release:
    return Release(what="the release", events=events, delta=delta, kinds=("evaluate",))


def _other_refusal(release: Release, history: list[DpEvent] | None = None) -> str:
    with pytest.raises(PolicyRefusal) as info:
        check_release(
            policy=POLICY, max_epsilon=8.0, dataset="digits", release=release, history=history or []
        )
    message = str(info.value)
    assert message.startswith("This site refuses the release on dataset 'digits': ")
    assert message.endswith(".")
    return message


def test_every_kind_gets_the_same_checks_and_messages() -> None:
    """A release other than training: no DP event, the σ floor, δ and the budget."""
    assert "no DP event" in _other_refusal(_other(()))
    message = _other_refusal(_other((METRIC, DpEvent(0.5, 1.0, 1))))
    assert "σ=0.5" in message and "0.8" in message
    message = _other_refusal(_other((METRIC,), delta=1e-4))
    assert "δ=0.0001" in message and "δ=1e-05" in message
    history = [DpEvent(1.0, 0.01, 2000)]
    before = rdp_epsilon(history, delta=POLICY.delta)
    message = _other_refusal(_other((DpEvent(1.0, 1.0, 50),)), history)
    assert f"{before:.4g}" in message and "budget of ε=8" in message
    projection = check_release(
        policy=POLICY, max_epsilon=8.0, dataset="digits", release=_other((METRIC,)), history=[]
    )
    assert projection.epsilon_after == rdp_epsilon([METRIC], delta=POLICY.delta)


def test_a_release_names_a_kind_for_each_event() -> None:
    assert _other((SGD, METRIC)).kinds == ("evaluate", "evaluate")
    with pytest.raises(ValueError, match="kinds"):
        Release(what="x", events=(SGD, METRIC, SGD), delta=1e-5, kinds=("a", "b"))
