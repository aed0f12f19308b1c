"""orchestrator.training.update_bounds: honest updates always fit the bound; reports must match the task.

The bound is checked against real honest training (``site_agent.trainer.train_local``) at
extreme settings, and its two ingredients against independent computations: the SGD
recursion against a plain loop, Adam's per-coordinate step against ``torch.optim.Adam`` fed
the gradients that push it hardest.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from common.domain import ChargedEvent, DpReport, Metrics, UpdateMeta
from common.dp.events import DpEvent
from common.errors import InvalidUpdateError
from common.specs import JobSpec, LinearSpec, MLPSpec, ModelSpec, OptimizerSpec, parse_job_spec
from common.training.tensors import l2_norm
from orchestrator.training import update_bounds as ub
from site_agent.trainer import TrainParams, train_local


def _honest_norm_and_bound(
    *,
    model: ModelSpec,
    n: int,
    batch_size: int,
    steps: int,
    sigma: float,
    clip: float,
    opt: OptimizerSpec,
    scale: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    assert model.input_dim is not None and model.num_classes is not None
    x = (rng.normal(size=(n, model.input_dim)) * scale).astype(np.float32)
    y = rng.integers(0, model.num_classes, size=n).astype(np.int64)
    from common.training.models import build_model

    net = build_model(model, seed=seed)
    with torch.no_grad():  # start away from the origin: weight decay then pulls hard
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 2.0)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    res = train_local(
        model_spec=model,
        global_state=state,
        features=x,
        labels=y,
        params=TrainParams(
            noise_multiplier=sigma,
            max_grad_norm=clip,
            batch_size=batch_size,
            local_epochs=None,
            local_steps=steps,
            optimizer=opt,
        ),
    )
    bound = ub.norm_bound(
        optimizer=opt,
        max_grad_norm=clip,
        noise_multiplier=sigma,
        sample_rate=res.sample_rate,
        steps=res.steps,
        num_examples=n,
        num_params=sum(v.numel() for v in state.values()),
        start_norm=l2_norm(state),
    )
    return l2_norm(res.delta), bound


LIN = LinearSpec(kind="linear", input_dim=6, num_classes=3)
MLP = MLPSpec(kind="mlp", input_dim=6, num_classes=3, hidden=(16,))

EXTREMES: list[Any] = [
    # name, model, n, batch, steps, σ, C, optimizer, feature scale
    ("q=1 no noise to speak of", LIN, 40, 64, 30, 0.01, 1.0, OptimizerSpec(lr=2.0), 100.0),
    ("tiny q, batch of 1", LIN, 400, 1, 300, 0.5, 1.0, OptimizerSpec(lr=1.0), 1.0),
    ("largest lr and σ", MLP, 64, 8, 20, 1000.0, 1.0, OptimizerSpec(lr=10.0), 1.0),
    (
        "heavy momentum and weight decay",
        MLP,
        200,
        20,
        150,
        0.3,
        5.0,
        OptimizerSpec(lr=0.5, momentum=0.99, weight_decay=0.5),
        10.0,
    ),
    ("adam, largest lr", MLP, 100, 10, 100, 2.0, 1.0, OptimizerSpec(name="adam", lr=10.0), 1.0),
    ("adam, no noise", LIN, 50, 50, 100, 0.01, 1.0, OptimizerSpec(name="adam", lr=0.05), 30.0),
    ("tiny clip", LIN, 100, 10, 100, 1.0, 1e-4, OptimizerSpec(lr=0.3, momentum=0.9), 1.0),
]


@pytest.mark.parametrize(
    ("model", "n", "batch", "steps", "sigma", "clip", "opt", "scale"),
    [pytest.param(*e[1:], id=e[0]) for e in EXTREMES],
)
def test_honest_training_at_extreme_settings_stays_within_the_bound(
    model: ModelSpec,
    n: int,
    batch: int,
    steps: int,
    sigma: float,
    clip: float,
    opt: OptimizerSpec,
    scale: float,
) -> None:
    for seed in range(2):
        norm, bound = _honest_norm_and_bound(
            model=model,
            n=n,
            batch_size=batch,
            steps=steps,
            sigma=sigma,
            clip=clip,
            opt=opt,
            scale=scale,
            seed=seed,
        )
        assert math.isfinite(bound)
        assert norm <= bound, (norm, bound)


def test_the_bound_is_not_vacuous() -> None:
    # Plain SGD: aligned clipped gradients can move lr·T·C, the noise about lr·σC√(Td)/E; the
    # bound adds only tails (a few standard deviations) to that worst case.
    lr, steps, sigma, n, batch = 0.1, 100, 4.0, 200, 20
    norm, bound = _honest_norm_and_bound(
        model=MLP,
        n=n,
        batch_size=batch,
        steps=steps,
        sigma=sigma,
        clip=1.0,
        opt=OptimizerSpec(lr=lr),
    )
    d = 6 * 16 + 16 + 16 * 3 + 3
    worst = lr * steps * 1.0 + lr * sigma * math.sqrt(steps * d) / batch
    assert norm <= bound < 1.5 * worst


def test_sgd_response_matches_a_plain_loop() -> None:
    lr, mu, wd, steps = 0.3, 0.8, 0.1, 57
    alpha, k1, k2, kmax, gain = ub._sgd_response(lr, mu, wd, steps)
    a = np.array([[1 - lr * wd, -lr * mu], [wd, mu]])
    b = np.array([-lr, 1.0])
    ks, p = [], np.eye(2)
    for _ in range(steps):
        ks.append((p @ b)[0])
        p = a @ p
    ks_ = np.array(ks)
    assert alpha == pytest.approx(p[0, 0])
    assert k1 == pytest.approx(np.abs(ks_).sum())
    assert k2 == pytest.approx((ks_**2).sum())
    assert kmax == pytest.approx(np.abs(ks_).max())
    # θ_T of torch's SGD equals α θ_0 + Σ k_j g_{T-j}, on random gradients.
    theta = torch.nn.Parameter(torch.tensor([1.5]))
    opt = torch.optim.SGD([theta], lr=lr, momentum=mu, weight_decay=wd)
    grads = torch.randn(steps, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for g in grads:
        theta.grad = torch.tensor([float(g)])
        opt.step()
    expected = alpha * 1.5 + sum(ks[steps - 1 - t] * float(grads[t]) for t in range(steps))
    assert float(theta) == pytest.approx(expected, rel=1e-4)
    assert gain >= 1.0


def test_adam_never_steps_further_than_the_bound_per_coordinate() -> None:
    steps = 300
    per_coord = ub._adam_step_sum(steps)
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    patterns = [
        torch.ones(steps),  # steady push
        torch.cat([torch.full((steps // 2,), 1e-6), torch.full((steps - steps // 2,), 1.0)]),
        (torch.rand(steps, generator=gen) < 0.05).float() * 1e3 + 1e-8,  # rare spikes
        torch.where(torch.arange(steps) % 7 == 0, 1.0, 1e-4),
    ]
    for g in patterns:
        theta = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([theta], lr=1.0, eps=0.0)
        for v in g:
            theta.grad = torch.tensor([-float(v)])
            opt.step()
        worst = max(worst, abs(float(theta)))
    assert worst <= per_coord
    assert per_coord < 8.0 * steps  # lim a_t ≈ 7.27: the bound is not vacuous either


def test_a_diverging_recursion_has_no_finite_bound() -> None:
    bound = ub.norm_bound(
        optimizer=OptimizerSpec(lr=10.0, weight_decay=1.0),
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        sample_rate=0.1,
        steps=2000,
        num_examples=100,
        num_params=10,
        start_norm=1.0,
    )
    assert bound == math.inf


def test_the_bound_is_computed_fast_for_the_most_steps_a_task_may_run() -> None:
    import time

    t0 = time.perf_counter()
    b = ub.norm_bound(
        optimizer=OptimizerSpec(lr=0.05, momentum=0.9, weight_decay=1e-4),
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        sample_rate=0.01,
        steps=ub.MAX_STEPS_PER_TASK,
        num_examples=10_000,
        num_params=1000,
        start_norm=10.0,
    )
    assert math.isfinite(b) and time.perf_counter() - t0 < 2.0
    with pytest.raises(ValueError, match="exceed"):
        ub.norm_bound(
            optimizer=OptimizerSpec(),
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            sample_rate=0.01,
            steps=ub.MAX_STEPS_PER_TASK + 1,
            num_examples=100,
            num_params=10,
            start_norm=1.0,
        )


# --------------------------------------------------------------------- report vs task


def _job(**over: Any) -> JobSpec:
    return parse_job_spec(
        {
            "dataset": "d",
            "model": {"kind": "linear", "input_dim": 4, "num_classes": 2},
            "rounds": 2,
            "local_epochs": 2,
            "batch_size": 10,
            "dp": {"noise_multiplier": 1.2, "max_grad_norm": 1.0, "delta": 1e-5},
            **over,
        }
    )


def _meta(events: list[tuple[str, DpEvent]], *, n: int, **over: Any) -> UpdateMeta:
    report = DpReport(
        events=tuple(ChargedEvent(k, e) for k, e in events),
        max_grad_norm=over.pop("max_grad_norm", 1.0),
        delta=over.pop("delta", 1e-5),
        task_epsilon=1.0,
        job_epsilon=1.0,
        dataset_epsilon=1.0,
        policy_delta=1e-5,
        accountant="prv",
    )
    return UpdateMeta(
        site_id="s",
        task_id="t",
        num_examples=n,
        dp_report=report,
        metrics=over.pop("metrics", None),
        total_size=0,
        sha256="",
    )


def test_the_honest_report_matches_and_is_charged_as_assigned() -> None:
    spec = _job(metrics={"noise_multiplier": 20.0})
    a = ub.Assignment("s", 1.2, 100, 0, spec)
    m = ub.match_report(
        a,
        _meta(
            [("train", DpEvent(1.2, 0.1, 20)), ("metrics", DpEvent(20.0, 1.0, 1))],
            n=100,
            metrics=Metrics(0.5, 0.5, 50.0, 50.0, 100, 20.0, count_sum=100.0),
        ),
    )
    assert m.train == DpEvent(1.2, 0.1, 20) and m.metrics == DpEvent(20.0, 1.0, 1)
    # With an audit, any number of canaries between 0 and the job's may have been included.
    audited = ub.Assignment("s", 1.2, 100, 10, _job(audit={"canaries": 10}))
    m = ub.match_report(audited, _meta([("train", DpEvent(1.2, 10 / 107, 22))], n=107))
    assert m.num_examples == 107 and m.train.steps == 22


@pytest.mark.parametrize(
    ("events", "n", "over", "reason"),
    [
        ([("train", DpEvent(1000.0, 0.1, 20))], 100, {}, "σ=1000"),
        ([("train", DpEvent(0.6, 0.1, 20))], 100, {}, "σ=0.6"),
        ([("train", DpEvent(1.2, 1e-6, 20))], 100, {}, "sample rate"),
        ([("train", DpEvent(1.2, 0.1, 10**6))], 100, {}, "10^6 steps"),
        ([("train", DpEvent(1.2, 0.1, 20))], 10**9, {}, "claims"),
        ([("train", DpEvent(1.2, 0.1, 20))], 100, {"max_grad_norm": 2.0}, "max_grad_norm"),
        ([("train", DpEvent(1.2, 0.1, 20))], 100, {"delta": 1e-6}, "δ"),
        ([], 100, {}, "0 training events"),
        ([("train", DpEvent(1.2, 0.1, 20))] * 2, 100, {}, "2 training events"),
        ([("train", DpEvent(1.2, 0.1, 20)), ("gmm", DpEvent(1.0, 1.0, 1))], 100, {}, "'gmm'"),
        (
            [("train", DpEvent(1.2, 0.1, 20)), ("metrics", DpEvent(0.5, 1.0, 1))],
            100,
            {},
            "metrics",
        ),
    ],
)
def test_reports_that_disagree_with_the_task_are_refused(
    events: list[tuple[str, DpEvent]], n: int, over: dict[str, Any], reason: str
) -> None:
    a = ub.Assignment("s", 1.2, 100, 0, _job())
    with pytest.raises(InvalidUpdateError) as err:
        ub.match_report(a, _meta(events, n=n, **over))
    assert reason.replace("10^6 steps", "1000000 steps") in str(err.value)


def test_a_report_with_canaries_beyond_the_audit_is_refused() -> None:
    audited = ub.Assignment("s", 1.2, 100, 10, _job(audit={"canaries": 10}))
    with pytest.raises(InvalidUpdateError, match="sample rate"):
        ub.match_report(audited, _meta([("train", DpEvent(1.2, 10 / 111, 23))], n=111))
