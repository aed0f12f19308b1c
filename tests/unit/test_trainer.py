"""Local DP-SGD learns, clips, noises with secret randomness; evaluate's noise is calibrated."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from sklearn.datasets import load_digits

from common.dp import noise
from common.errors import InvalidSpecError
from common.specs import (
    Conv1dSpec,
    Conv2dSpec,
    ConvLayerSpec,
    LinearSpec,
    MLPSpec,
    ModelSpec,
    OptimizerSpec,
)
from common.training.models import build_model
from common.training.schedule import task_schedule
from common.training.tensors import l2_norm
from site_agent.trainer import (
    TrainParams,
    choose_grad_sample_mode,
    evaluate,
    train_local,
)

SPECS: dict[str, ModelSpec] = {
    "linear": LinearSpec(kind="linear", input_dim=64, num_classes=10),
    "mlp": MLPSpec(kind="mlp", input_dim=64, num_classes=10, hidden=(32, 16), activation="tanh"),
    "cnn1d": Conv1dSpec(
        kind="cnn1d",
        input_dim=64,
        num_classes=10,
        input_shape=(4, 16),
        conv=(
            ConvLayerSpec(channels=8, kernel_size=5, pool=2),
            ConvLayerSpec(channels=8, stride=2),
        ),
        hidden=(16,),
        groupnorm_groups=4,
    ),
    "cnn2d": Conv2dSpec(
        kind="cnn2d",
        input_dim=64,
        num_classes=10,
        input_shape=(1, 8, 8),
        conv=(ConvLayerSpec(channels=6, pool=2),),
        groupnorm_groups=3,
    ),
}


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # These models are tiny: a second intra-op thread only adds synchronisation, which on a
    # loaded CI machine can stall every small op. Restored afterwards for other tests.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def _params(**kw: Any) -> TrainParams:
    base: dict[str, Any] = {
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "batch_size": 64,
        "local_epochs": None,
        "local_steps": 5,
        "optimizer": OptimizerSpec(lr=0.1),
        "seed": 0,
    }
    base.update(kw)
    return TrainParams(**base)


def _random_data(n: int, seed: int = 0, scale: float = 1.0) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 64)) * scale).astype(np.float32), rng.integers(0, 10, n)


# -- planning -------------------------------------------------------------------------------


def test_task_schedule() -> None:
    """The one (q, steps) function: the orchestrator's plan, the site's charge, the trainer."""
    assert task_schedule(num_examples=1000, batch_size=100, local_epochs=2.0, local_steps=None) == (
        0.1,
        20,
    )
    assert task_schedule(num_examples=1000, batch_size=100, local_epochs=None, local_steps=7) == (
        0.1,
        7,
    )
    assert task_schedule(num_examples=50, batch_size=64, local_epochs=3.0, local_steps=None) == (
        1.0,
        3,
    )
    q, steps = task_schedule(num_examples=1617, batch_size=64, local_epochs=1.0, local_steps=None)
    assert q == 64 / 1617 and steps == math.ceil(1617 / 64)
    assert task_schedule(num_examples=10, batch_size=1, local_epochs=0.3, local_steps=None) == (
        0.1,
        3,
    )
    with pytest.raises(InvalidSpecError, match="exactly one"):
        task_schedule(num_examples=10, batch_size=1, local_epochs=1.0, local_steps=3)
    with pytest.raises(InvalidSpecError, match="exactly one"):
        task_schedule(num_examples=10, batch_size=1, local_epochs=None, local_steps=None)
    with pytest.raises(InvalidSpecError, match="at least one example"):
        task_schedule(num_examples=0, batch_size=1, local_epochs=1.0, local_steps=None)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_every_kind_trains_with_bookkeeping_clipping(kind: str) -> None:
    assert choose_grad_sample_mode(SPECS[kind]) == "bk"


# -- training -------------------------------------------------------------------------------


def test_dp_sgd_on_digits_learns(
    digits: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
) -> None:
    x, y = digits
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = order[:1400], order[1400:]
    spec = MLPSpec(kind="mlp", input_dim=64, num_classes=10, hidden=(64,))
    start = build_model(spec, seed=0).state_dict()
    result = train_local(
        model_spec=spec,
        global_state=start,
        features=x[train],
        labels=y[train],
        params=_params(local_steps=None, local_epochs=5.0, optimizer=OptimizerSpec(lr=0.5)),
    )
    assert result.grad_sample_mode == "bk"
    assert result.sample_rate == 64 / 1400 and result.steps == math.ceil(5 * 1400 / 64)
    assert (result.noise_multiplier, result.max_grad_norm, result.num_examples) == (1.0, 1.0, 1400)

    reference = build_model(spec).state_dict()
    assert list(result.delta) == list(reference)
    for k, v in result.delta.items():
        assert v.shape == reference[k].shape
        assert v.dtype == torch.float32 and v.device.type == "cpu"
        assert torch.isfinite(v).all()

    new = {k: start[k] + result.delta[k] for k in start}
    metrics = evaluate(
        model_spec=spec,
        state=new,
        features=x[test],
        labels=y[test],
        loss_bound=5.0,
        noise_multiplier=None,
    )
    assert metrics.accuracy > 0.6  # chance is 0.1; ~0.9 is typical at σ=1 here
    before = evaluate(
        model_spec=spec,
        state=start,
        features=x[test],
        labels=y[test],
        loss_bound=5.0,
        noise_multiplier=None,
    )
    assert metrics.loss < before.loss


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_one_example_moves_exactly_lr_times_the_clip_norm(kind: str) -> None:
    # One example at q = 1 is in every batch; with σ = 0 a step moves the weights by
    # lr · (clipped gradient) / (q·N), whose norm is exactly lr · C when clipping is active.
    spec = SPECS[kind]
    x, y = _random_data(1, scale=100.0)
    lr, clip = 0.1, 1e-3
    result = train_local(
        model_spec=spec,
        global_state=build_model(spec, seed=1).state_dict(),
        features=x,
        labels=y,
        params=_params(
            noise_multiplier=0.0,
            max_grad_norm=clip,
            batch_size=1,
            local_steps=1,
            optimizer=OptimizerSpec(lr=lr),
        ),
    )
    assert l2_norm(result.delta) == pytest.approx(lr * clip, rel=1e-3)


@pytest.mark.parametrize("kind", ["mlp", "cnn2d"])
def test_clipping_bounds_the_delta(kind: str) -> None:
    spec = SPECS[kind]
    x, y = _random_data(40, scale=100.0)
    start = build_model(spec, seed=2).state_dict()
    lr, steps = 0.1, 4

    def delta_norm(clip: float) -> float:
        # batch_size = N, so q = 1: every step sees all rows and averages over exactly N.
        params = _params(
            noise_multiplier=1e-6,
            max_grad_norm=clip,
            batch_size=40,
            local_steps=steps,
            optimizer=OptimizerSpec(lr=lr),
        )
        result = train_local(
            model_spec=spec, global_state=start, features=x, labels=y, params=params
        )
        return l2_norm(result.delta)

    clip = 1e-3
    assert delta_norm(clip) <= steps * lr * clip * 1.001
    # Without effective clipping the same data moves the weights far more: the bound bites.
    assert delta_norm(1e6) > 10 * steps * lr * clip


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_every_mode_releases_the_same_update(kind: str) -> None:
    spec = SPECS[kind]
    x, y = _random_data(30, scale=5.0)
    start = build_model(spec, seed=3).state_dict()
    params = _params(noise_multiplier=0.0, max_grad_norm=0.05, batch_size=30, local_steps=3)
    bk, ghost, hooks = (
        train_local(
            model_spec=spec,
            global_state=start,
            features=x,
            labels=y,
            params=params,
            grad_sample_mode=mode,
        )
        for mode in ("bk", "ghost", "hooks")
    )
    assert (bk.grad_sample_mode, ghost.grad_sample_mode, hooks.grad_sample_mode) == (
        "bk",
        "ghost",
        "hooks",
    )
    # Clipping bites (C = 0.05 on inputs scaled by 5), so a wrong norm would show here.
    for other in (ghost, bk):
        diff = {k: other.delta[k] - hooks.delta[k] for k in start}
        assert l2_norm(diff) <= 1e-4 * l2_norm(hooks.delta)


@pytest.mark.parametrize(
    ("kind", "mode"),
    [("mlp", "bk"), ("mlp", "ghost"), ("mlp", "hooks"), ("cnn2d", "bk"), ("cnn2d", "ghost")],
)
def test_empty_poisson_batches_still_take_a_noised_step(
    kind: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # q = 1/30 on 30 rows: about a third of the batches are empty.
    calls: list[int] = []
    original: Callable[..., Any] = torch.optim.SGD.step

    def counting_step(self: torch.optim.SGD, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counting_step)
    spec = SPECS[kind]
    x, y = _random_data(30)
    result = train_local(
        model_spec=spec,
        global_state=build_model(spec, seed=0).state_dict(),
        features=x,
        labels=y,
        params=_params(batch_size=1, local_steps=40),
        grad_sample_mode=mode,
    )
    assert len(calls) == result.steps == 40
    assert all(torch.isfinite(v).all() for v in result.delta.values())


def test_noise_is_not_reproducible_from_the_job_seed_or_the_global_rng() -> None:
    spec = SPECS["mlp"]
    x, y = _random_data(50)
    start = build_model(spec, seed=0).state_dict()
    deltas = []
    for _ in range(2):
        torch.manual_seed(1234)  # an attacker who knows every public seed...
        result = train_local(
            model_spec=spec, global_state=start, features=x, labels=y, params=_params(seed=7)
        )
        deltas.append(result.delta)
    # ...still cannot reproduce the noise (and so cannot subtract it).
    assert l2_norm({k: deltas[0][k] - deltas[1][k] for k in start}) > 0.01


def test_global_state_is_not_modified() -> None:
    spec = SPECS["linear"]
    start = build_model(spec, seed=0).state_dict()
    snapshot = {k: v.clone() for k, v in start.items()}
    x, y = _random_data(20)
    train_local(model_spec=spec, global_state=start, features=x, labels=y, params=_params())
    assert all(torch.equal(start[k], snapshot[k]) for k in start)


def test_bad_inputs_are_refused_without_quoting_data() -> None:
    spec = SPECS["linear"]
    start = build_model(spec).state_dict()
    x, y = _random_data(10)
    y_bad = y.copy()
    y_bad[3] = 987_654
    with pytest.raises(InvalidSpecError, match=r"outside 0\.\.9") as info:
        train_local(model_spec=spec, global_state=start, features=x, labels=y_bad, params=_params())
    assert "987654" not in str(info.value)
    with pytest.raises(InvalidSpecError, match=r"shape \(10, 63\)"):
        train_local(
            model_spec=spec, global_state=start, features=x[:, :63], labels=y, params=_params()
        )
    with pytest.raises(InvalidSpecError, match="global weights"):
        train_local(
            model_spec=spec,
            global_state=build_model(SPECS["mlp"]).state_dict(),
            features=x,
            labels=y,
            params=_params(),
        )
    with pytest.raises(InvalidSpecError, match="momentum applies to sgd only"):
        train_local(
            model_spec=spec,
            global_state=start,
            features=x,
            labels=y,
            params=_params(optimizer=OptimizerSpec(name="adam", lr=0.01, momentum=0.9)),
        )
    with pytest.raises(InvalidSpecError, match="grad_sample_mode"):
        train_local(
            model_spec=spec,
            global_state=start,
            features=x,
            labels=y,
            params=_params(),
            grad_sample_mode="ew",
        )
    with pytest.raises(InvalidSpecError, match="max_grad_norm"):
        train_local(
            model_spec=spec,
            global_state=start,
            features=x,
            labels=y,
            params=_params(max_grad_norm=0.0),
        )


def test_adam_trains() -> None:
    spec = SPECS["mlp"]
    x, y = _random_data(40)
    result = train_local(
        model_spec=spec,
        global_state=build_model(spec).state_dict(),
        features=x,
        labels=y,
        params=_params(optimizer=OptimizerSpec(name="adam", lr=0.01), local_steps=3),
    )
    assert l2_norm(result.delta) > 0


# -- evaluation -----------------------------------------------------------------------------


def _exact(
    spec: ModelSpec, state: dict[str, torch.Tensor], x: Any, y: Any, bound: float
) -> tuple[float, float]:
    model = build_model(spec)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        losses = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y), reduction="none")
        correct = (logits.argmax(1) == torch.from_numpy(y)).sum().item()
    return float(correct), float(losses.clamp(0, bound).sum())


def test_exact_metrics_match_a_direct_computation() -> None:
    spec = SPECS["mlp"]
    state = build_model(spec, seed=4).state_dict()
    x, y = _random_data(300, scale=3.0)
    correct, loss_sum = _exact(spec, state, x, y, bound=2.0)
    m = evaluate(
        model_spec=spec, state=state, features=x, labels=y, loss_bound=2.0, noise_multiplier=None
    )
    assert m.num_examples == 300 and m.noise_multiplier is None
    assert m.correct_sum == pytest.approx(correct)
    assert m.loss_sum == pytest.approx(loss_sum)
    assert m.accuracy == pytest.approx(correct / 300)
    assert m.loss == pytest.approx(loss_sum / 300)
    assert m.loss <= 2.0  # every per-example loss was clipped to the bound


def test_evaluate_noise_has_the_calibrated_std() -> None:
    # The vector (count, correct, clipped loss / B) has L2 sensitivity √3, so each coordinate
    # gets N(0, (σ·√3)²). Tolerances are ~5 standard errors of the estimates (n = 3000).
    spec = SPECS["linear"]
    state = build_model(spec, seed=5).state_dict()
    x, y = _random_data(40)
    bound, sigma, n = 4.0, 3.0, 3000
    correct, loss_sum = _exact(spec, state, x, y, bound)
    torch.manual_seed(0)  # must not make the noise repeat
    samples = np.array(
        [
            (m.count_sum - 40, m.correct_sum - correct, (m.loss_sum - loss_sum) / bound)
            for m in (
                evaluate(
                    model_spec=spec,
                    state=state,
                    features=x,
                    labels=y,
                    loss_bound=bound,
                    noise_multiplier=sigma,
                )
                for _ in range(n)
            )
        ]
    )
    expected_std = sigma * math.sqrt(3.0)
    for j in range(3):
        assert samples[:, j].std(ddof=1) == pytest.approx(expected_std, rel=0.07)
        assert abs(samples[:, j].mean()) < 5 * expected_std / math.sqrt(n)
    corr = np.corrcoef(samples.T)
    assert np.abs(corr[np.triu_indices(3, 1)]).max() < 0.1
    assert len(np.unique(samples[:, 0])) == n  # no two draws alike


def test_noised_metrics_are_not_clamped_and_hide_the_row_count() -> None:
    spec = SPECS["linear"]
    state = build_model(spec, seed=6).state_dict()
    x, y = _random_data(3)
    outside = 0
    for _ in range(50):
        m = evaluate(
            model_spec=spec,
            state=state,
            features=x,
            labels=y,
            loss_bound=1.0,
            noise_multiplier=50.0,
        )
        released = m.released()
        assert released.num_examples == 0 and released.count_sum == m.count_sum
        assert m.noise_multiplier == 50.0 and m.num_examples == 3
        if m.count_sum >= 1:
            assert m.accuracy == pytest.approx(m.correct_sum / m.count_sum)
            outside += not (0.0 <= m.accuracy <= 1.0)
        else:
            assert m.accuracy == 0.0 and m.loss == 0.0
    assert outside > 0  # at σ = 50 on 3 rows the ratio leaves [0, 1]: shown, not clamped


def test_evaluate_refuses_bad_arguments_and_takes_no_rows() -> None:
    spec = SPECS["linear"]
    state = build_model(spec).state_dict()
    x, y = _random_data(5)
    for kwargs, pattern in [
        ({"loss_bound": 0.0, "noise_multiplier": 1.0}, "loss_bound"),
        ({"loss_bound": 1.0, "noise_multiplier": 0.0}, "noise_multiplier"),
        ({"loss_bound": 1.0, "noise_multiplier": 1.0, "auc_bins": 0}, "auc_bins"),
    ]:
        with pytest.raises(InvalidSpecError, match=pattern):
            evaluate(model_spec=spec, state=state, features=x, labels=y, **kwargs)
    # No validation rows is not an error (that would say so): zero sums plus noise.
    exact = evaluate(
        model_spec=spec,
        state=state,
        features=x[:0],
        labels=y[:0],
        loss_bound=1.0,
        noise_multiplier=None,
    )
    assert (exact.count_sum, exact.correct_sum, exact.loss_sum) == (0.0, 0.0, 0.0)
    noised = evaluate(
        model_spec=spec,
        state=state,
        features=x[:0],
        labels=y[:0],
        loss_bound=1.0,
        noise_multiplier=1.0,
    )
    assert noised.count_sum != 0.0


_NOISE_PROBE = _params(
    noise_multiplier=2.0,
    max_grad_norm=1e-4,
    batch_size=40,
    local_steps=1,
    optimizer=OptimizerSpec(lr=1.0),
)


@pytest.mark.parametrize(
    ("mode", "secure"), [("bk", False), ("ghost", False), ("hooks", False), ("bk", True)]
)
def test_noise_is_calibrated_to_sigma_times_the_clip_norm(mode: str, secure: bool) -> None:
    # One step with q = 1, lr = 1 and a clip norm so small that the clipped sum is negligible:
    # the delta is then -N(0, (σC)²)/N per coordinate, from either noise source.
    spec = SPECS["linear"]
    x, y = _random_data(40)
    with noise.secure_noise(secure):
        result = train_local(
            model_spec=spec,
            global_state=build_model(spec, seed=0).state_dict(),
            features=x,
            labels=y,
            params=_NOISE_PROBE,
            grad_sample_mode=mode,
        )
    values = torch.cat([v.flatten() for v in result.delta.values()])  # 650 coordinates
    expected = _NOISE_PROBE.noise_multiplier * _NOISE_PROBE.max_grad_norm / 40
    assert float(values.std()) == pytest.approx(expected, rel=0.12)


def test_secure_noise_refuses_opacus_modes() -> None:
    spec = SPECS["linear"]
    x, y = _random_data(40)
    with noise.secure_noise(), pytest.raises(InvalidSpecError, match="secure noise"):
        train_local(
            model_spec=spec,
            global_state=build_model(spec, seed=0).state_dict(),
            features=x,
            labels=y,
            params=_NOISE_PROBE,
            grad_sample_mode="ghost",
        )
