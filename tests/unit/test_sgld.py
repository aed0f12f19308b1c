"""DP-SGLD: Langevin vs DP noise, the top-up noise, sample rounds and the ensemble (issue 20)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from common.errors import InvalidSpecError
from common.specs import MLPSpec, parse_job_spec
from common.training import sgld
from common.training.models import build_model, load_model, save_model
from orchestrator.training.posterior import released_state
from orchestrator.training.update_bounds import norm_bound

LR, SIGMA, C, N, Q = 0.5, 1.2, 1.0, 1000, 0.1
E = Q * N


def test_dp_noise_is_the_langevin_noise_at_the_matching_lr() -> None:
    # lr* = 2 T E² / (N σ² C²): there v_dp = v_L, nothing is added and T_eff = T
    lr = 2 * 1.0 * E**2 / (N * SIGMA**2 * C**2)
    kw = dict(temperature=1.0, noise_multiplier=SIGMA, max_grad_norm=C, expected=E, num_examples=N)
    assert sgld.dp_variance(lr=lr, noise_multiplier=SIGMA, max_grad_norm=C, expected=E) == (
        pytest.approx(sgld.langevin_variance(lr=lr, temperature=1.0, num_examples=N))
    )
    assert sgld.extra_std(lr=lr, **kw) == pytest.approx(0.0, abs=1e-9)
    assert sgld.effective_temperature(lr=lr, **kw) == pytest.approx(1.0)
    # a smaller lr needs the difference added; a larger one samples hotter
    small = lr / 4
    want = 2 * small / N - (small * SIGMA * C / E) ** 2
    assert sgld.extra_std(lr=small, **kw) == pytest.approx(math.sqrt(want))
    assert sgld.effective_temperature(lr=small, **kw) == 1.0
    assert sgld.extra_std(lr=4 * lr, **kw) == 0.0
    assert sgld.effective_temperature(lr=4 * lr, **kw) == pytest.approx(4.0)


def test_langevin_sgd_adds_the_top_up_noise() -> None:
    p = nn.Parameter(torch.zeros(200_000, dtype=torch.float64))
    opt = sgld.LangevinSGD(
        [p], lr=0.1, weight_decay=0.0, extra_std=0.03, generator=torch.Generator().manual_seed(0)
    )
    p.grad = torch.full_like(p, 2.0)
    opt.step()
    moved = p.detach() + 0.2  # the SGD step is -lr·grad = -0.2
    assert float(moved.mean()) == pytest.approx(0.0, abs=1e-3)
    assert float(moved.std()) == pytest.approx(0.03, rel=0.01)


def test_update_bound_counts_the_top_up_noise() -> None:
    base = dict(max_grad_norm=C, noise_multiplier=SIGMA, sample_rate=Q, steps=10)
    common = dict(num_examples=N, num_params=10_000, start_norm=1.0)
    spec = parse_job_spec(
        {
            "dataset": "d",
            "model": {"kind": "linear", "input_dim": 4, "num_classes": 2},
            "rounds": 3,
            "batch_size": 100,
            "optimizer": {"name": "sgld", "lr": 0.01, "burn_in": 1, "samples": 2},
            "dp": {"noise_multiplier": SIGMA, "max_grad_norm": C, "delta": 1e-5},
        }
    )
    sgd = spec.optimizer.model_copy(update={"name": "sgd"})
    sigma_eff = sgld.bound_noise_multiplier(
        name="sgld", lr=0.01, temperature=1.0, noise_multiplier=SIGMA, max_grad_norm=C,
        sample_rate=Q, num_examples=N,
    )  # fmt: skip
    assert sigma_eff > SIGMA
    with_top_up = norm_bound(optimizer=spec.optimizer, **base, **common)  # type: ignore[arg-type]
    as_sgd = norm_bound(optimizer=sgd, **{**base, "noise_multiplier": sigma_eff}, **common)  # type: ignore[arg-type]
    assert with_top_up == pytest.approx(as_sgd)
    assert with_top_up > norm_bound(optimizer=sgd, **base, **common)  # type: ignore[arg-type]


def test_sample_rounds_and_spec_checks() -> None:
    assert sgld.sample_rounds(rounds=10, burn_in=4, samples=3) == (6, 8, 10)
    assert sgld.sample_rounds(rounds=5, burn_in=2, samples=3) == (3, 4, 5)
    with pytest.raises(ValueError):
        sgld.sample_rounds(rounds=5, burn_in=3, samples=3)
    job = {
        "dataset": "d",
        "model": {"kind": "linear", "input_dim": 4, "num_classes": 2},
        "rounds": 4,
        "batch_size": 8,
        "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
    }
    with pytest.raises(InvalidSpecError, match="at least 5 rounds"):
        parse_job_spec({**job, "optimizer": {"name": "sgld", "burn_in": 3, "samples": 2}})
    with pytest.raises(InvalidSpecError, match="no momentum"):
        parse_job_spec({**job, "optimizer": {"name": "sgld", "momentum": 0.9}})


def test_ensemble_averages_the_samples_probabilities(tmp_path: Path) -> None:
    spec = MLPSpec(kind="mlp", input_dim=5, num_classes=3, hidden=(4,))
    members = [build_model(spec, seed=s) for s in range(3)]
    job = parse_job_spec(
        {
            "dataset": "d",
            "model": spec.model_dump(),
            "rounds": 5,
            "batch_size": 8,
            "optimizer": {"name": "sgld", "burn_in": 2, "samples": 3},
            "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
        }
    )
    ckpt = {r: tmp_path / f"round-{r}.safetensors" for r in range(1, 6)}
    from common.training.tensors import state_to_bytes

    for r, m in zip((3, 4), members[:2], strict=True):
        ckpt[r].write_bytes(state_to_bytes(m.state_dict()))
    card: dict[str, object] = {"model": spec.model_dump(mode="json"), "epsilon": 1.0}
    state = released_state(job, members[2].state_dict(), ckpt.__getitem__, card)
    assert card["posterior_samples"] == [
        {"index": 0, "round": 3},
        {"index": 1, "round": 4},
        {"index": 2, "round": 5},
    ]
    save_model(tmp_path / "model", module_or_state=state, card=card)
    ens = load_model(tmp_path / "model")
    x = torch.rand(7, 5)
    with torch.no_grad():
        want = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
        got = torch.softmax(ens(x), 1)
    torch.testing.assert_close(got, want)
    # a sample missing from the file is an error, not a smaller ensemble
    card["posterior_samples"] = [*card["posterior_samples"], {"index": 3, "round": 5}]  # type: ignore[list-item]
    with pytest.raises(InvalidSpecError):
        save_model(tmp_path / "bad", module_or_state=state, card=card)
