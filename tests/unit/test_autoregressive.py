"""The autoregressive synthesizer's densities, sampling and decoding (issue 20)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from common.domain import ColumnInfo
from common.schema.encoding import derive_encoding, uniform_edges
from common.schema.table import apply_schema
from common.specs import parse_job_spec
from common.synthesis.autoregressive import AutoregressiveNet, decode, sample_table
from common.synthesis.autoregressive_spec import (
    AutoregressiveSpec,
    columns_of,
    layout_disagreement,
)
from common.training.models import build_model, count_spec_parameters

FEATURES = (
    ColumnInfo("age", "numeric", min=18.0, max=90.0, nullable=False),
    ColumnInfo("income", "numeric", min=0.0, max=1000.0, nullable=True),
    ColumnInfo("home", "categorical", categories=("rent", "own", "parents"), nullable=True),
    ColumnInfo("records", "categorical", categories=("no", "yes"), nullable=False),
)
LABEL = ColumnInfo("status", "categorical", categories=("bad", "good"), nullable=False)


def _encoding(numeric: str = "minmax"):  # type: ignore[no-untyped-def]
    edges = None
    if numeric == "quantile":
        edges = {"age": (18.0, 30.0, 45.0, 60.0, 90.0), "income": uniform_edges(0.0, 1000.0, 4)}
    return derive_encoding(FEATURES, LABEL, numeric=numeric, edges=edges)


def _net(numeric: str = "minmax", bins: int = 16, seed: int = 0) -> AutoregressiveNet:
    enc = _encoding(numeric)
    spec = AutoregressiveSpec(
        kind="autoregressive",
        input_dim=enc.width,
        num_classes=enc.num_classes,
        columns=columns_of(enc),
        hidden=8,
        bins=bins,
    )
    net = build_model(spec, seed=seed)
    assert isinstance(net, AutoregressiveNet)
    with torch.no_grad():  # sharper random conditionals than the default init
        for p in net.parameters():
            p.mul_(3.0)
        for j in (2, 3):  # income and home (nullable): "missing" (their last outcome) likely
            net.heads[j][2].bias[-1] = net.heads[j][2].bias.max() + 1.0
    return net


def _grid_rows(enc, column: str, u: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Encoded rows that differ only in ``column``'s position ``u`` (other columns fixed)."""
    frame = pd.DataFrame(
        {"age": 40.0, "income": 100.0, "home": "own", "records": "no"}, index=range(len(u))
    )
    col = next(f for f in enc.features if f.name == column)
    assert col.column.min is not None and col.column.max is not None
    if col.edges:
        e = np.asarray(col.edges)
        pos = u * (len(e) - 1)
        t = np.minimum(np.floor(pos), len(e) - 2).astype(int)
        frame[column] = e[t] + (pos - t) * (e[t + 1] - e[t])
    else:
        frame[column] = col.column.min + u * (col.column.max - col.column.min)
    return enc.encode(apply_schema(frame, enc.feature_schema()))


@pytest.mark.parametrize("numeric", ["minmax", "quantile"])
@pytest.mark.parametrize("column", ["age", "income"])
def test_numeric_density_integrates_to_one_within_the_bounds(numeric: str, column: str) -> None:
    enc = _encoding(numeric)
    net = _net(numeric)
    idx = 1 + [f.name for f in enc.features].index(column)
    u = (np.arange(20_000) + 0.5) / 20_000  # midpoint rule on [0, 1]
    x = torch.from_numpy(_grid_rows(enc, column, u))
    y = torch.ones(len(u), dtype=torch.int64)
    with torch.no_grad():
        dens = net.column_log_probs(x, y)[:, idx].exp().numpy()
    # the value density in the column's encoded position u
    mass = float(dens.mean())
    missing = 0.0
    if column == "income":  # nullable: the rest of the mass is on "missing"
        xm = x[:1].clone()
        start = sum(f.width for f in enc.features[: idx - 1])
        width = enc.features[idx - 1].width
        xm[0, start : start + width - 1] = 0.0
        xm[0, start + width - 1] = 1.0
        with torch.no_grad():
            missing = float(net.column_log_probs(xm, y[:1])[0, idx].exp())
        assert 0.0 < missing < 1.0
    assert mass + missing == pytest.approx(1.0, abs=1e-4)


def test_log_prob_is_the_sum_of_the_conditionals_and_label_is_normalised() -> None:
    enc = _encoding()
    net = _net()
    x = torch.from_numpy(_grid_rows(enc, "age", np.array([0.1, 0.7])))
    total = 0.0
    for c in range(2):
        y = torch.full((2,), c, dtype=torch.int64)
        with torch.no_grad():
            cols = net.column_log_probs(x, y)
            assert torch.allclose(net.log_prob(x, y), cols.sum(1))
            total += float(cols[0, 0].exp())
    assert total == pytest.approx(1.0)


@pytest.mark.parametrize("numeric", ["minmax", "quantile"])
def test_samples_respect_bounds_categories_and_missing(numeric: str) -> None:
    enc = _encoding(numeric)
    table = sample_table(_net(numeric), enc, 3000, seed=1)
    assert list(table.columns) == ["age", "income", "home", "records", "status"]
    assert table["age"].dtype == np.float64 and table["income"].dtype == np.float64
    assert table["age"].notna().all()  # not nullable
    assert table["age"].between(18.0, 90.0).all()
    inc = table["income"].dropna()
    assert 0 < len(inc) < len(table)  # nullable: some missing, some not
    assert inc.between(0.0, 1000.0).all()
    assert set(table["home"].dropna()) <= {"rent", "own", "parents"}
    assert table["home"].isna().any()
    assert table["records"].notna().all() and set(table["records"]) <= {"no", "yes"}
    assert set(table["status"]) == {"bad", "good"}
    # the synthetic table goes back through the declared schema unchanged
    again = decode(enc, enc.encode(apply_schema(table, enc.feature_schema())), np.zeros(3000, int))
    np.testing.assert_allclose(again["income"], table["income"], rtol=1e-5, atol=1e-3)
    assert (again["home"].fillna("-") == table["home"].fillna("-")).all()


def test_sampling_is_reproducible_with_a_seed() -> None:
    enc = _encoding()
    net = _net()
    a = sample_table(net, enc, 200, seed=7)
    b = sample_table(net, enc, 200, seed=7)
    c = sample_table(net, enc, 200, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_spec_counts_checks_width_and_layout() -> None:
    enc = _encoding("quantile")
    spec = AutoregressiveSpec(
        kind="autoregressive",
        input_dim=enc.width,
        num_classes=2,
        columns=columns_of(enc),
        hidden=8,
        bins=16,
    )
    assert count_spec_parameters(spec) == sum(p.numel() for p in build_model(spec).parameters())
    assert layout_disagreement(spec, enc) is None
    assert layout_disagreement(spec, _encoding("minmax")) is not None
    with pytest.raises(ValueError, match="encoded slots"):
        AutoregressiveSpec(
            kind="autoregressive", input_dim=enc.width + 1, num_classes=2, columns=columns_of(enc)
        )
    job = parse_job_spec(
        {
            "dataset": "d",
            "model": spec.model_dump(),
            "rounds": 1,
            "batch_size": 8,
            "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
        }
    )
    assert isinstance(job.model, AutoregressiveSpec)


def test_site_trains_the_synthesizer_with_dp_sgd() -> None:
    from site_agent.trainer import TrainParams, train_local

    enc = _encoding()
    net = _net()
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "age": rng.uniform(18, 90, 300),
            "income": np.where(rng.random(300) < 0.2, np.nan, rng.uniform(0, 1000, 300)),
            "home": rng.choice(["rent", "own", "zzz", ""], 300),
            "records": rng.choice(["no", "yes"], 300),
        }
    )
    x = enc.encode(apply_schema(frame, enc.feature_schema()))
    y = rng.integers(0, 2, 300)
    spec = AutoregressiveSpec(
        kind="autoregressive",
        input_dim=enc.width,
        num_classes=2,
        columns=columns_of(enc),
        hidden=8,
        bins=16,
    )
    from common.specs import OptimizerSpec

    params = TrainParams(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        batch_size=64,
        local_epochs=None,
        local_steps=5,
        optimizer=OptimizerSpec(name="adam", lr=0.01),
    )
    res = train_local(
        model_spec=spec, global_state=net.state_dict(), features=x, labels=y, params=params
    )
    assert res.grad_sample_mode == "bk" and res.steps == 5
    assert all(torch.isfinite(v).all() for v in res.delta.values())
    assert any(float(v.abs().max()) > 0 for v in res.delta.values())
