"""The contract every task handler passes (``site_agent.handlers.base``), run for each kind
registered in ``site_agent.handlers.registry``, through the one site pipeline:

* a task whose charge would exceed the budget is refused without reading a row and without
  writing to the ledger;
* an accepted task reads rows only after its charge is durable, and its reply's DP report
  lists exactly the events charged for it;
* a kind that releases nothing computed from the data (``admit``, ``audit``) charges nothing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.domain import TaskAssignment
from common.dp.events import DpEvent
from common.errors import PolicyRefusal
from site_agent.boundary.ledger import Ledger
from site_agent.boundary.pipeline import SitePipeline
from site_agent.config import SiteConfig
from site_agent.data import loading
from site_agent.data.datasets import SiteDatasets
from site_agent.handlers.registry import HANDLERS
from tests.unit.test_neighbouring import _base_rows, _site, _task, _tasks

RELEASING = ("train", "evaluate", "synth", "gmm", "gmm_local", "quantiles")
QUANTILES = {
    "columns": [{"name": "amount", "min": 0.0, "max": 300_000.0}],
    "grid": 8,
    "noise_multiplier": 2.0,
    "delta": 1e-5,
}


def test_every_kind_has_one_handler() -> None:
    assert set(HANDLERS) == {*RELEASING, "audit", "admit"}
    assert all(h.kind == kind for kind, h in HANDLERS.items())


def _accepted_tasks(cfg: SiteConfig) -> dict[str, tuple[TaskAssignment, bytes]]:
    """One task of each releasing kind that a fresh site accepts."""
    tasks = {what: (task, blob) for what, task, blob in _tasks(cfg) if what in RELEASING}
    tasks["quantiles"] = (_task("quantiles", b"", request_json=json.dumps(QUANTILES)), b"")
    assert set(tasks) == set(RELEASING)
    return tasks


class _RowSpy:
    """Records every read of rows after the pipeline started, with the charges it found."""

    def __init__(self, ledger: Ledger, mp: pytest.MonkeyPatch) -> None:
        self.reads: list[tuple[str, set[str]]] = []
        self._ledger = ledger
        for name in ("split", "encoded"):
            mp.setattr(SiteDatasets, name, self._wrap(name, getattr(SiteDatasets, name)))
        csv_frames = loading._csv_frames

        def frames(*a: Any, **k: Any) -> Iterator[Any]:
            self._seen("csv")
            return csv_frames(*a, **k)

        mp.setattr(loading, "_csv_frames", frames)

    def _seen(self, what: str) -> None:
        self.reads.append((what, {e.task_id for e in self._ledger.entries()}))

    def _wrap(self, what: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def spy(*a: Any, **k: Any) -> Any:
            self._seen(what)
            return fn(*a, **k)

        return spy


@pytest.mark.parametrize("kind", RELEASING)
def test_a_task_over_budget_reads_no_row_and_charges_nothing(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _site(tmp_path, _base_rows())
    task, blob = _accepted_tasks(cfg)[kind]
    with Ledger(cfg.state_dir / "ledger.sqlite") as ledger:
        pipeline = SitePipeline(cfg, ledger)
        # Another job spent the budget (σ = 0.5 at q = 1, 2,000 times: far over ε = 200).
        ledger.charge(
            dataset="loans",
            job_id="earlier",
            round=0,
            task_id="earlier",
            kind="evaluate",
            events=[DpEvent(0.5, 1.0, 2000)],
            delta=1e-5,
        )
        before = ledger.entries()
        spy = _RowSpy(ledger, monkeypatch)
        with pytest.raises(PolicyRefusal, match="budget of ε=200"):
            pipeline.precheck(task)
        with pytest.raises(PolicyRefusal, match="budget of ε=200"):
            pipeline.execute(task, blob)
        assert ledger.entries() == before
        assert spy.reads == []


@pytest.mark.parametrize("kind", RELEASING)
def test_rows_are_read_after_the_charge_and_the_reply_reports_it(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _site(tmp_path, _base_rows())
    task, blob = _accepted_tasks(cfg)[kind]
    with Ledger(cfg.state_dir / "ledger.sqlite") as ledger:
        pipeline = SitePipeline(cfg, ledger)
        spy = _RowSpy(ledger, monkeypatch)
        pipeline.precheck(task)
        assert spy.reads == [] and all(e.task_id != task.task_id for e in ledger.entries())
        meta, _ = pipeline.execute(task, blob)
        charged = [e for e in ledger.entries() if e.task_id == task.task_id]
    assert spy.reads, "the handler read no row"
    assert all(task.task_id in charges for _, charges in spy.reads), spy.reads
    assert charged and [e.event for e in charged] == [e.event for e in meta.dp_report.events]
    if kind == "train":
        assert [e.kind for e in charged] == [e.kind for e in meta.dp_report.events]


@pytest.mark.parametrize("action", ["check", "reserve", "release"])
def test_admission_charges_nothing(tmp_path: Path, action: str) -> None:
    cfg = _site(tmp_path, _base_rows())
    train, _ = _accepted_tasks(cfg)["train"]
    admit = dataclasses.replace(
        train, task_id=f"admit-{action}", kind="admit", request_json=json.dumps({"action": action})
    )
    with Ledger(cfg.state_dir / "ledger.sqlite") as ledger:
        pipeline = SitePipeline(cfg, ledger)
        before = ledger.entries()
        meta, blob = pipeline.execute(admit, b"")
        assert ledger.entries() == before
    assert meta.dp_report.events == () and blob == b""
