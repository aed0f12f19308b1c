"""Site statistics on Dask (issue 19.4): on a local cluster of worker processes (loopback
only), the exact statistics a site releases equal the in-process path's bit for bit."""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from common.clustering.model import GaussianMixtureParams
from site_agent import dask_engine
from site_agent.config import SiteConfig, load_site_config
from site_agent.data.loading import iter_typed_chunks, load_dataset
from site_agent.handlers.quantiles import QuantileColumn, histogram_counts
from tests.unit.dask_sites import COLUMNS, write_loans

ROW_GROUP = 150


def _site(root: Path, rows: int = 1000, **site: Any) -> SiteConfig:
    write_loans(root / "loans.parquet", rows=rows, seed=3, row_group=ROW_GROUP)
    cfg = {
        "site_id": "bank-a",
        "orchestrator": "127.0.0.1:1",
        "state_dir": "state",
        "insecure": True,
        "dask_scheduler": "tcp://127.0.0.1:1",
        "datasets": [
            {
                "name": "loans",
                "path": "loans.parquet",
                "label": "status",
                "columns": COLUMNS,
                "engine": "dask",
                "chunk_rows": ROW_GROUP,
            }
        ],
        "policy": {"max_epsilon": 10.0, "delta": 1e-5},
        **site,
    }
    (root / "site.yaml").write_text(yaml.safe_dump(cfg))
    return load_site_config(root / "site.yaml")


FEATURES = ("amount", "age", "home")
QCOLS = (
    QuantileColumn(name="amount", min=0, max=1000),
    QuantileColumn(name="age", min=18, max=100),
)


def _maps(cfg: SiteConfig) -> dict[str, Any]:
    from site_agent.handlers.synth import site_schema

    ds = cfg.datasets[0]
    schema = site_schema(ds, (*FEATURES, "status"), 8)
    params = GaussianMixtureParams(
        np.array([0.5, 0.5]),
        np.array([[200.0, 30.0], [700.0, 70.0]]),
        np.array([[1e4, 50.0], [2e4, 80.0]]),
        "diag",
    )
    return {
        "count": dask_engine.row_count,
        "quantiles": dask_engine.QuantileCounts(QCOLS, 32),
        "marginals": dask_engine.MarginalCounts(schema, (("home",), ("home", "status"))),
        "gmm": dask_engine.MixtureStats(
            ("amount", "age"), params, ((0.0, 1000.0), (18.0, 100.0)), "diag"
        ),
    }


def _in_process(cfg: SiteConfig, maps: dict[str, Any]) -> dict[str, Any]:
    """The agent's own path: the whole table, or its stream of chunks, in one process."""
    from common.synthesis.marginals import _counts
    from site_agent.gmm_stats import compute_stats
    from site_agent.handlers.clustering import _rows
    from site_agent.handlers.synth import _frame

    ds = cfg.datasets[0]
    full = load_dataset(ds)
    m = maps["marginals"]
    codes = m.schema.encode(_frame(full, m.schema))
    gmm = maps["gmm"]
    chunks = [_rows(c, gmm.columns) for c in iter_typed_chunks(ds, FEATURES)]
    return {
        "count": len(full),
        "quantiles": histogram_counts(full.table, QCOLS, 32),
        "marginals": [_counts(codes, m.schema, cols) for cols in m.marginals],
        "gmm": compute_stats(chunks, gmm.params, bounds=gmm.bounds, covariance_type="diag"),
    }


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["count"] == want["count"]
    np.testing.assert_array_equal(got["quantiles"], want["quantiles"])
    for a, b in zip(got["marginals"], want["marginals"], strict=True):
        np.testing.assert_array_equal(a, b)
    for field in ("nk", "s1", "s2", "loglik", "loglik_range"):
        np.testing.assert_array_equal(getattr(got["gmm"], field), getattr(want["gmm"], field))


def _folded(partials_of: Any, cfg: SiteConfig, maps: dict[str, Any]) -> dict[str, Any]:
    ds = cfg.datasets[0]
    add = {"marginals": dask_engine.add_marginals}
    return {
        name: dask_engine.fold(partials_of(ds, FEATURES, fn), None, add.get(name, operator.add))
        for name, fn in maps.items()
    }


def test_partitions_are_the_row_groups_in_order(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    parts = dask_engine.partitions(cfg.datasets[0])
    assert [p.row_group for p in parts] == list(range(-(-1000 // ROW_GROUP)))


def test_in_process_map_reduce_equals_the_agents_path(tmp_path: Path) -> None:
    cfg = _site(tmp_path)
    maps = _maps(cfg)
    _assert_same(_folded(dask_engine.local_partials, cfg, maps), _in_process(cfg, maps))


def test_engine_dask_needs_a_scheduler_and_parquet(tmp_path: Path) -> None:
    from common.errors import InvalidSpecError

    cfg = _site(tmp_path)
    raw = yaml.safe_load((tmp_path / "site.yaml").read_text())
    del raw["dask_scheduler"]
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(InvalidSpecError, match="dask_scheduler"):
        load_site_config(tmp_path / "site.yaml")
    raw["dask_scheduler"] = "tcp://127.0.0.1:1"
    raw["datasets"][0]["path"] = "loans.csv"
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(InvalidSpecError, match="Parquet"):
        load_site_config(tmp_path / "site.yaml")
    assert cfg.datasets[0].engine == "dask"


@pytest.mark.slow  # 3 worker processes; the same sums in-process: test_in_process_map_reduce_...
def test_local_dask_cluster_equals_the_in_process_path_exactly(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    cfg = _site(tmp_path)
    maps = _maps(cfg)
    with (
        distributed.LocalCluster(
            n_workers=3,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            worker_dashboard_address=None,
        ) as cluster,
        dask_engine.connect(cluster.scheduler_address) as client,
    ):
        assert len(client.scheduler_info()["workers"]) == 3

        def on_cluster(ds: Any, names: Any, fn: Any) -> Any:
            return dask_engine.dask_partials(client, ds, names, fn)

        got = _folded(on_cluster, cfg, maps)
    _assert_same(got, _in_process(cfg, maps))
