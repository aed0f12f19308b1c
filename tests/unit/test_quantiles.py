"""DP quantile bin edges: the sites' histogram release and the orchestrator's edges."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from common.domain import ColumnInfo, TaskAssignment
from common.dp.events import DpEvent
from common.errors import InvalidSpecError, PolicyRefusal
from common.schema.encoding import derive_encoding, uniform_edges
from common.schema.table import TypedTable
from common.specs import parse_job_spec
from orchestrator.training.quantiles import UNIFORM_WEIGHT, edges_from_histogram
from site_agent.boundary.ledger import Ledger
from site_agent.boundary.pipeline import SitePipeline
from site_agent.config import SiteConfig, load_site_config
from site_agent.data.loading import LocalDataset, load_dataset
from site_agent.handlers.admit import run_admit
from site_agent.handlers.quantiles import QuantileColumn, histogram_counts, sensitivity

COLUMNS = (
    QuantileColumn(name="income", min=0.0, max=1000.0),
    QuantileColumn(name="assets", min=-50.0, max=300_000.0),
    QuantileColumn(name="age", min=18.0, max=18.0),  # a constant column: one cell
)
EXTREME = [0.0, 999.9, 1000.0, -1e38, 1e38, math.inf, -math.inf, math.nan, 3e38, 5e-324]


def _table(rows: list[tuple[float, float, float]]) -> TypedTable:
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    return TypedTable(
        columns={c.name: arr[:, i].copy() for i, c in enumerate(COLUMNS)}, num_rows=arr.shape[0]
    )


def test_counts_land_in_their_cells() -> None:
    t = _table([(0.0, -50.0, 18.0), (499.0, 0.0, 18.0), (1000.0, 300_000.0, math.nan)])
    h = histogram_counts(t, COLUMNS, 10)
    np.testing.assert_array_equal(h[0], [1, 0, 0, 0, 1, 0, 0, 0, 0, 1])
    assert h[1, 0] == 2 and h[1, -1] == 1
    np.testing.assert_array_equal(h[2], [2] + [0] * 9)  # the missing cell is not counted


@settings(max_examples=60, deadline=None)
@given(
    base=st.lists(
        st.tuples(*(st.floats(allow_nan=True, allow_infinity=True, width=64),) * 3),
        min_size=0,
        max_size=30,
    ),
    extra=st.tuples(*(st.sampled_from(EXTREME),) * 3),
    grid=st.sampled_from([8, 64, 257]),
)
def test_sensitivity_holds_on_neighbouring_datasets(
    base: list[tuple[float, float, float]], extra: tuple[float, float, float], grid: int
) -> None:
    """D and D ∪ {x}, x anywhere (±1e38, ±inf, NaN): the counts differ by at most one per
    column, so by at most √d in L2 (the sensitivity the noise is scaled to)."""
    d = histogram_counts(_table(base), COLUMNS, grid)
    dx = histogram_counts(_table([*base, extra]), COLUMNS, grid)
    diff = dx - d
    assert np.isfinite(dx).all()
    assert ((diff == 0) | (diff == 1)).all()
    assert (diff.sum(axis=1) <= 1).all()
    assert float(np.linalg.norm(diff)) <= sensitivity(len(COLUMNS)) + 1e-12
    # a present value is counted exactly once, a missing one not at all
    for i, v in enumerate(extra):
        assert diff[i].sum() == (0 if math.isnan(v) else 1)


def test_sensitivity_is_attained() -> None:
    d = histogram_counts(_table([]), COLUMNS, 8)
    dx = histogram_counts(_table([(1.0, 1.0, 18.0)]), COLUMNS, 8)
    assert (
        float(np.linalg.norm(dx - d))
        == pytest.approx(sensitivity(3))
        == pytest.approx(math.sqrt(3))
    )


def test_edges_follow_the_cdf_without_noise() -> None:
    rng = np.random.default_rng(0)
    values = rng.exponential(100.0, size=20_000)
    values = values[values < 1000.0]
    counts, _ = np.histogram(values, bins=200, range=(0.0, 1000.0))
    edges = edges_from_histogram(counts, 0.0, 1000.0, 4)
    true = np.quantile(values, [0.25, 0.5, 0.75])
    # the mixing with uniform edges moves each inner edge by at most UNIFORM_WEIGHT·range
    tolerance = 1000.0 / 200 + UNIFORM_WEIGHT * 1000.0
    np.testing.assert_allclose(edges[1:-1], true, atol=tolerance)
    assert edges[0] == 0.0 and edges[-1] == 1000.0


@settings(max_examples=80, deadline=None)
@given(
    counts=st.lists(st.floats(-50.0, 50.0), min_size=8, max_size=64),
    bins=st.integers(2, 32),
    low=st.floats(-1e6, 1e6),
    span=st.floats(1e-3, 1e6),
)
def test_edges_from_any_noisy_histogram_are_strictly_increasing(
    counts: list[float], bins: int, low: float, span: float
) -> None:
    high = low + span
    edges = edges_from_histogram(counts, low, high, bins)
    assert len(edges) == bins + 1
    assert edges[0] == low and edges[-1] == high
    assert all(b > a for a, b in itertools.pairwise(edges))


def test_no_positive_count_gives_uniform_edges() -> None:
    assert edges_from_histogram([-3.0, -1.0, 0.0, -2.0], 0.0, 4.0, 4) == (0.0, 1.0, 2.0, 3.0, 4.0)


def _site(tmp_path: Path, income: dict[str, Any]) -> tuple[SiteConfig, LocalDataset]:
    (tmp_path / "d.csv").write_text("income,home,y\n10,rent,a\n,owner,b\n990,rent,a\n1e39,,b\n")
    cfg = {
        "site_id": "s",
        "orchestrator": "127.0.0.1:1",
        "state_dir": str(tmp_path / "state"),
        "insecure": True,
        "datasets": [
            {
                "name": "d",
                "path": str(tmp_path / "d.csv"),
                "label": "y",
                "columns": {
                    "income": income,
                    "home": {"type": "categorical", "categories": ["rent", "owner"]},
                    "y": {"type": "categorical", "categories": ["a", "b"]},
                },
            }
        ],
        "policy": {"max_epsilon": 5.0, "delta": 1e-5, "min_noise_multiplier": 0.5},
    }
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(cfg))
    config = load_site_config(tmp_path / "site.yaml")
    return config, load_dataset(config.datasets[0])


def _task(request: dict[str, Any]) -> TaskAssignment:
    return TaskAssignment(
        task_id="t1",
        job_id="job-1",
        round=0,
        rounds=1,
        job_spec_json="",
        dataset="d",
        noise_multiplier=0.0,
        model_size=0,
        model_sha256="",
        deadline_unix=0.0,
        kind="quantiles",
        request_json=json.dumps(request),
    )


REQUEST = {
    "columns": [{"name": "income", "min": 0.0, "max": 1000.0}],
    "grid": 8,
    "noise_multiplier": 1.0,
    "delta": 1e-5,
}


def test_the_site_charges_before_it_releases(tmp_path: Path) -> None:
    config, _ = _site(tmp_path, {"type": "numeric", "min": 0, "max": 1000})
    with Ledger(tmp_path / "state" / "ledger.sqlite") as ledger:
        meta, blob = SitePipeline(config, ledger).execute(_task(REQUEST), b"")
        entries = ledger.entries(job_id="job-1")
    assert [(e.kind, e.event) for e in entries] == [("quantiles", DpEvent(1.0, 1.0, 1))]
    hist = json.loads(meta.result_json)["histograms"]["income"]
    assert len(hist) == 8 and np.isfinite(hist).all() and blob == b""
    assert meta.dp_report.task_epsilon > 0


@pytest.mark.parametrize(
    "declared",
    [
        {"type": "numeric", "min": 0, "max": 500},  # other bounds than asked
        {"type": "categorical", "categories": ["low", "high"]},
    ],
)
def test_a_column_not_declared_as_asked_is_refused_before_any_charge(
    tmp_path: Path, declared: dict[str, Any]
) -> None:
    config, _ = _site(tmp_path, declared)
    with Ledger(tmp_path / "state" / "ledger.sqlite") as ledger:
        with pytest.raises(InvalidSpecError, match="'income' is not declared"):
            SitePipeline(config, ledger).execute(_task(REQUEST), b"")
        assert ledger.entries(job_id="job-1") == []


def test_admission_counts_the_histogram_release_in_the_whole_job(tmp_path: Path) -> None:
    """A budget the rounds alone fit, but not with the quantile release on top: refused."""
    config, _ = _site(tmp_path, {"type": "numeric", "min": 0, "max": 1000})
    features = (
        ColumnInfo("income", min=0.0, max=1000.0),
        ColumnInfo("home", "categorical", categories=("rent", "owner")),
    )
    label = ColumnInfo("y", "categorical", categories=("a", "b"))

    def spec_json(sigma_q: float | None) -> str:
        numeric = "minmax" if sigma_q is None else "quantile"
        edges = None if sigma_q is None else {"income": uniform_edges(0.0, 1000.0, 4)}
        enc = derive_encoding(features, label, numeric=numeric, edges=edges).to_dict()
        if sigma_q is not None:
            enc |= {"bins": 4, "quantile_noise_multiplier": sigma_q}
        return parse_job_spec(
            {
                "dataset": "d",
                "model": {"kind": "linear"},
                "rounds": 2,
                "batch_size": 2,
                "dp": {"noise_multiplier": 2.0},
                "metrics": {"enabled": False},
                "encoding": enc,
            }
        ).model_dump_json()

    one_round = (("train", DpEvent(2.0, 0.5, 4)),)

    def admit(sigma_q: float | None) -> None:
        task = replace(_task({"action": "check"}), kind="admit", job_spec_json=spec_json(sigma_q))
        run_admit(config=config, ledger=ledger, task=task, round_charges=lambda _: one_round)

    with Ledger(tmp_path / "state" / "ledger.sqlite") as ledger:
        admit(None)
        admit(20.0)  # a weak release on top still fits
        with pytest.raises(PolicyRefusal, match="refuses the job"):
            admit(0.6)
