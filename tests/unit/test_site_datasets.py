"""``site_agent.data.datasets``: what a site reads at start-up, and when it loads a table.

An ``engine: dask`` dataset's sides are counted one Parquet row group at a time at start-up
(the catalog needs them) and equal those of the loaded table; its table is loaded only when a
handler reads rows in the agent, after the charge, and a table that changed since start-up
is refused. A local in-memory dataset is loaded once, at start-up, and kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.clustering.model import GaussianMixtureParams
from common.errors import InvalidSpecError
from site_agent.boundary.ledger import Ledger
from site_agent.boundary.pipeline import SitePipeline
from site_agent.data.datasets import _shape_of
from tests.unit.test_dask_wiring import QUANTILES, _executor, _task, _write_data

LOCAL_FIT = {
    "columns": ["amount", "age"],
    "K": 2,
    "covariance_type": "diag",
    "bounds": [[0, 1000], [18, 100]],
    "max_rounds": 2,
    "tol": 1e-3,
    "noise_multiplier": 5.0,
    "seed": 0,
}


# A bootstrap request: its weights are drawn row by row in the agent, so it reads the table
# there (init, EM and evaluation requests of gmm and gmm_local go through the engine's map).
BOOT = {
    "columns": ["amount", "age"],
    "request": {
        "kind": "gmm.boot",
        "round": 1,
        "bounds": [[0, 1000], [18, 100]],
        "noise_multiplier": 5.0,
        "covariance_type": "diag",
        "replicates": 4,
        "weight_cap": 4,
        "model": {
            "key": "k2",
            "params": GaussianMixtureParams(
                np.array([0.5, 0.5]),
                np.array([[200.0, 30.0], [700.0, 70.0]]),
                np.array([[1e4, 50.0], [2e4, 80.0]]),
                "diag",
            ).to_dict(),
        },
    },
}


def _close(ex: SitePipeline) -> None:
    ex.ledger.close()


def test_a_dask_dataset_is_counted_not_loaded_at_start_up(tmp_path: Path) -> None:
    _write_data(tmp_path / "data")
    ex = _executor(tmp_path / "site", tmp_path / "data", "dask", "synchronous")
    try:
        assert ex.datasets.loads == 0
        counted = ex.datasets.shape("loans")
        assert counted.num_validation is not None and counted.num_validation > 0
        ex.execute(_task("quantiles", QUANTILES, "q"), b"")  # on the engine
        assert ex.datasets.loads == 0
        ex.execute(_task("gmm_local", LOCAL_FIT, "f"), b"")  # on the engine
        assert ex.datasets.loads == 0
        ex.execute(_task("gmm", BOOT, "g"), b"")  # rows in the agent
        assert ex.datasets.loads == 1
        assert _shape_of(ex.datasets.split("loans")) == counted
        ex.execute(_task("gmm", BOOT, "g2"), b"")
        assert ex.datasets.loads == 1  # kept
    finally:
        _close(ex)


def test_a_local_dataset_is_loaded_once_at_start_up(tmp_path: Path) -> None:
    _write_data(tmp_path / "data")
    ex = _executor(tmp_path / "site", tmp_path / "data", "local", "synchronous")
    try:
        assert ex.datasets.loads == 1
        ex.execute(_task("quantiles", QUANTILES, "q"), b"")
        ex.execute(_task("gmm_local", LOCAL_FIT, "g"), b"")
        assert ex.datasets.loads == 1
    finally:
        _close(ex)


def test_a_table_that_changed_since_start_up_is_refused(tmp_path: Path) -> None:
    _write_data(tmp_path / "data", rows=600)
    ex = _executor(tmp_path / "site", tmp_path / "data", "dask", "synchronous")
    try:
        _write_data(tmp_path / "data", rows=400)
        with pytest.raises(InvalidSpecError, match="changed since the site agent started"):
            ex.execute(_task("gmm", BOOT, "g"), b"")
        # Refused when the engine is set up, before the charge: nothing is spent.
        assert not [e for e in ex.ledger.entries() if e.kind == "gmm"]
    finally:
        _close(ex)


def test_a_local_parquet_table_that_changed_since_start_up_is_refused(tmp_path: Path) -> None:
    """``engine: local``: the mixture statistics map over the Parquet files in the agent
    (``StatsEngine`` without a cluster); they are held to the files loaded at start-up."""
    _write_data(tmp_path / "data", rows=600)
    ex = _executor(tmp_path / "site", tmp_path / "data", "local", "synchronous")
    try:
        assert ex.datasets.loads == 1
        _write_data(tmp_path / "data", rows=400)
        with pytest.raises(InvalidSpecError, match="changed since the site agent started"):
            ex.execute(_task("gmm_local", LOCAL_FIT, "g"), b"")
    finally:
        _close(ex)


def test_a_disk_dataset_refuses_an_in_memory_task_before_any_charge(tmp_path: Path) -> None:
    _write_data(tmp_path / "data")
    ex = _executor(tmp_path / "site", tmp_path / "data", "local", "synchronous")
    ex.ledger.close()
    cfg = ex.config.model_copy(
        update={
            "datasets": [ex.config.datasets[0].model_copy(update={"storage": "disk"})],
        }
    )
    with Ledger(cfg.state_dir / "ledger.sqlite") as ledger:
        disk = SitePipeline(cfg, ledger)
        before = ledger.entries()
        with pytest.raises(InvalidSpecError, match="storage: disk"):
            disk.execute(_task("gmm_local", LOCAL_FIT, "g"), b"")
        assert ledger.entries() == before and disk.datasets.loads == 0
        assert disk.dataset_infos()[0].num_rows > 0
