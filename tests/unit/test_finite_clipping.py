"""One extreme record cannot poison DP-SGD (issue 15, item 4): every clipping mode gives a
finite update, a non-finite example contributes exactly zero and a huge finite one at most C.

Checked against the update without that record (σ = 0), and the huge example's clipped
gradient against torch.func in float64 (independent of the code under test).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from common.errors import InvalidSpecError
from common.specs import OptimizerSpec
from common.training.models import build_model
from site_agent.clipping import BookKeeper
from site_agent.trainer import TrainParams, train_local
from tests.unit.test_trainer import SPECS

EXTREMES = (1e37, -3e38, math.inf, -math.inf, math.nan)
CLIP = 0.05


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _clipped_sum(kind: str, mode: str, x: Any, y: Any) -> dict[str, Tensor]:
    """``Σ_i clip_C(∇ℓ_i)`` recovered from one noiseless SGD step with q = 1 and lr = 1:
    the delta is ``-S / (q·N)``."""
    spec = SPECS[kind]
    n = len(y)
    result = train_local(
        model_spec=spec,
        global_state=build_model(spec, seed=3).state_dict(),
        features=x,
        labels=y,
        params=TrainParams(
            noise_multiplier=0.0,
            max_grad_norm=CLIP,
            batch_size=64,  # > N: q = 1, every row in the one step
            local_epochs=None,
            local_steps=1,
            optimizer=OptimizerSpec(lr=1.0),
            seed=0,
        ),
        grad_sample_mode=mode,
    )
    assert result.sample_rate == 1.0 and result.grad_sample_mode == mode
    return {k: -v.to(torch.float64) * n for k, v in result.delta.items()}


def _norm(d: dict[str, Tensor]) -> float:
    return math.sqrt(sum(float(v.square().sum()) for v in d.values()))


def _data(n: int = 12) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(0)
    return (rng.normal(size=(n, 64)) * 3).astype(np.float32), rng.integers(0, 10, n)


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_an_extreme_row_adds_zero_or_at_most_c(kind: str, mode: str) -> None:
    x, y = _data()
    base = _clipped_sum(kind, mode, x, y)
    assert _norm(base) > 0
    for value in EXTREMES:
        for whole_row in (True, False):
            row = x[:1].copy()
            if whole_row:
                row[:] = value
            else:
                row[0, 5] = value
            xs = np.concatenate([x, row])
            ys = np.concatenate([y, y[:1]])
            got = _clipped_sum(kind, mode, xs, ys)
            assert all(bool(torch.isfinite(v).all()) for v in got.values()), (value, whole_row)
            diff = _norm({k: got[k] - base[k] for k in base})
            if math.isfinite(value):
                # Clipped like any example (or zero if its forward pass overflowed).
                assert diff <= CLIP * (1 + 1e-3) + 1e-5, (value, whole_row, diff)
            else:
                # A non-finite example contributes exactly nothing.
                assert diff <= 1e-5 * max(1.0, _norm(base)), (value, whole_row, diff)


def _reference64(net: nn.Module, x: Tensor, y: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """Per-example norms and clipped sum from torch.func in float64 (for the linear model:
    one weight, one bias)."""
    net64 = net.to(torch.float64)
    params = {k: v.detach() for k, v in net64.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(net64, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0), reduction="sum")

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.to(torch.float64), y)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per.values()))
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return norms, torch.cat(
        [torch.einsum("b,b...->...", factors, g).flatten() for g in per.values()]
    )


def test_bookkeeping_norms_do_not_overflow_and_match_float64() -> None:
    # A dense model on a row at 1e37: float32 squares overflow at 1.8e19, so the old norm
    # was inf and the clip factor times the gradient NaN. The norm is now finite and exact.
    spec = SPECS["linear"]
    x, y = _data(6)
    x[2, :] = 1e37
    x[4, 7] = -2e38
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    net = build_model(spec, seed=1)
    ref_norms, ref_sum = _reference64(build_model(spec, seed=1), xt, yt, 0.5)
    assert bool(torch.isfinite(ref_norms).all()) and float(ref_norms[2]) > 1e30
    keeper = BookKeeper(net)
    with keeper.attach():
        norms = keeper.clipped_backward(
            nn.functional.cross_entropy(net(xt), yt, reduction="sum"), 0.5
        )
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-6)
    got = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    torch.testing.assert_close(got.to(torch.float64), ref_sum, rtol=1e-4, atol=1e-6)


def test_bookkeeping_gives_non_finite_examples_zero_and_an_infinite_norm() -> None:
    spec = SPECS["mlp"]
    x, y = _data(5)
    x[1, 3] = math.nan
    x[3, :] = math.inf
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    keep = torch.tensor([True, False, True, False, True])
    sums = []
    for rows in (slice(None), keep):
        net = build_model(spec, seed=1)
        keeper = BookKeeper(net)
        with keeper.attach():
            norms = keeper.clipped_backward(
                nn.functional.cross_entropy(net(xt[rows]), yt[rows], reduction="sum"), 0.5
            )
        grads = [p.grad for p in net.parameters()]
        sums.append(torch.cat([g.flatten() for g in grads if g is not None]))
        if rows == slice(None):
            assert norms.isinf().tolist() == [False, True, False, True, False]
    torch.testing.assert_close(sums[0], sums[1], rtol=1e-5, atol=1e-7)


def test_a_diverging_update_is_withheld_with_a_fixed_message() -> None:
    spec = SPECS["linear"]
    x, y = _data(20)

    with pytest.raises(InvalidSpecError, match="diverged") as info:
        train_local(
            model_spec=spec,
            global_state=build_model(spec).state_dict(),
            features=x,
            labels=y,
            params=TrainParams(
                noise_multiplier=1e300,  # noise beyond float32 steps the weights to ±inf
                max_grad_norm=1.0,
                batch_size=20,
                local_epochs=None,
                local_steps=2,
                optimizer=OptimizerSpec(lr=10.0),
                seed=0,
            ),
        )
    assert not any(ch.isdigit() for ch in str(info.value))


@pytest.mark.parametrize("materialise", [False, True])
@pytest.mark.parametrize("value", [1e30, math.inf, math.nan])
def test_sequence_and_conv_paths_with_an_extreme_row(materialise: bool, value: float) -> None:
    # The normalised paths (Gram or materialised per-example gradients, dense layers on
    # sequences, GroupNorm): a non-finite row adds nothing, a huge finite one at most C.
    from collections import OrderedDict

    width = 2 if materialise else 16
    torch.manual_seed(0)
    net = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(2, width, kernel_size=3, stride=2, padding=1),
            act=nn.Tanh(),
            conv2=nn.Conv2d(width, 4, kernel_size=3, padding=2, dilation=2),
            norm=nn.GroupNorm(2, 4),
            flat=nn.Flatten(2),
            fc=nn.Linear(16, width),
            pool=nn.Flatten(1),
            logits=nn.Linear(4 * width, 3),
        )
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 8, 8, generator=g) * 2
    y = torch.randint(0, 3, (5,), generator=g)
    x_bad = x.clone()
    x_bad[2, 1, 3:, :] = value

    def clipped_sum(xs: Tensor, ys: Tensor) -> Tensor:
        for p in net.parameters():
            p.grad = None
        keeper = BookKeeper(net)
        with keeper.attach():
            keeper.clipped_backward(nn.functional.cross_entropy(net(xs), ys, reduction="sum"), 0.3)
        grads = [p.grad for p in net.parameters()]
        return torch.cat([gr.flatten() for gr in grads if gr is not None]).to(torch.float64)

    keep = torch.tensor([True, True, False, True, True])
    without = clipped_sum(x[keep], y[keep])
    got = clipped_sum(x_bad, y)
    assert bool(torch.isfinite(got).all())
    diff = float((got - without).norm())
    if math.isfinite(value):
        assert diff <= 0.3 * (1 + 1e-3)
    else:
        assert diff <= 1e-5
