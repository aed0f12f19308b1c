"""Issue 16.4: a budget belongs to the data, not to its name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.dp.events import DpEvent
from common.dp.rdp import rdp_epsilon
from common.errors import PolicyRefusal
from site_agent.boundary.admission import Release, admit_and_charge
from site_agent.boundary.budget import budget_limit, data_key, open_ledger
from site_agent.config import SiteConfig

RELEASE = DpEvent(2.0, 1.0, 1)


def _config(tmp_path: Path, datasets: list[dict[str, object]], max_epsilon: float) -> SiteConfig:
    return SiteConfig.model_validate(
        {
            "site_id": "s",
            "orchestrator": "127.0.0.1:1",
            "state_dir": str(tmp_path / "state"),
            "insecure": True,
            "datasets": datasets,
            "policy": {"max_epsilon": max_epsilon, "delta": 1e-5},
        }
    )


def _release(cfg: SiteConfig, ledger: object, dataset: str, n: int) -> None:
    admit_and_charge(
        ledger=ledger,  # type: ignore[arg-type]
        policy=cfg.policy,
        max_epsilon=budget_limit(cfg, dataset),
        dataset=dataset,
        job_id=f"eval-{n}",
        task_id=f"t-{n}",
        release=Release(what="an evaluation", events=(RELEASE,), delta=1e-5, kinds=("metrics",)),
    )


def test_two_names_on_one_file_share_one_budget(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,y\n1,0\n")
    os.symlink(tmp_path / "d.csv", tmp_path / "link.csv")
    one = rdp_epsilon([RELEASE], delta=1e-5)
    two = rdp_epsilon([DpEvent(2.0, 1.0, 2)], delta=1e-5)
    cfg = _config(
        tmp_path,
        [
            {"name": "loans", "path": str(tmp_path / "d.csv"), "label": "y"},
            {"name": "credit", "path": str(tmp_path / "link.csv"), "label": "y"},
        ],
        max_epsilon=(one + two) / 2,  # room for one release, not two
    )
    assert data_key(cfg.datasets[0]) == data_key(cfg.datasets[1])
    with open_ledger(cfg) as ledger:
        _release(cfg, ledger, "loans", 1)
        with pytest.raises(PolicyRefusal, match="credit"):
            _release(cfg, ledger, "credit", 2)
        assert ledger.spent("credit", delta=1e-5) == ledger.spent("loans", delta=1e-5)


def test_the_same_query_on_the_same_database_is_one_dataset(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    cfg = _config(
        tmp_path,
        [
            {"name": "a", "url": url, "query": "SELECT * FROM t", "label": "y"},
            {"name": "b", "url": url, "query": "SELECT *\n  FROM t", "label": "y"},
            {"name": "c", "url": url, "query": "SELECT * FROM u", "label": "y", "max_epsilon": 1},
        ],
        max_epsilon=5,
    )
    keys = [data_key(d) for d in cfg.datasets]
    assert keys[0] == keys[1] != keys[2]


def test_shared_data_is_limited_by_the_smallest_budget(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,y\n1,0\n")
    path = str(tmp_path / "d.csv")
    cfg = _config(
        tmp_path,
        [
            {"name": "a", "path": path, "label": "y"},
            {"name": "b", "path": path, "label": "y", "max_epsilon": 2},
            {"name": "other", "path": str(tmp_path / "o.csv"), "label": "y"},
        ],
        max_epsilon=5,
    )
    assert budget_limit(cfg, "a") == budget_limit(cfg, "b") == 2
    assert budget_limit(cfg, "other") == 5
