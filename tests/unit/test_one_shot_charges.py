"""One-shot releases (evaluation, synthetic data) are charged what the orchestrator assigned,
written before the request goes out; a site's report never changes what it is charged."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from common.domain import (
    ChargedEvent,
    ColumnInfo,
    DatasetInfo,
    DpReport,
    SiteStatus,
    TaskFailure,
    UpdateMeta,
)
from common.dp.accounting import compute_epsilon
from common.dp.events import DpEvent
from common.synthesis.discretisation import ColumnSchema, Schema
from common.synthesis.marginals import marginal_plan, measure_site, planned_events
from orchestrator.core.broker import UpdateResult
from orchestrator.core.fanout import FanOutResult
from orchestrator.core.store import Store
from orchestrator.jobs import base
from orchestrator.synthesis import synthesize

DELTA = 1e-5


def _meta(site: str, task: str, events: list[DpEvent], result: str = "") -> UpdateMeta:
    report = DpReport(
        events=tuple(ChargedEvent("metrics", e) for e in events),
        max_grad_norm=0.0,
        delta=DELTA,
        task_epsilon=0.0,
        job_epsilon=0.0,
        dataset_epsilon=0.0,
        policy_delta=DELTA,
        accountant="prv",
    )
    return UpdateMeta(site, task, 0, report, None, 0, "", result)


def _fake_fan_out(
    monkeypatch: pytest.MonkeyPatch,
    store: Store | None,
    answer: Callable[[str, str], UpdateMeta | TaskFailure],
    seen: dict[str, Any],
) -> None:
    """Replace the fan-out: record what the job ledger held when the requests went out,
    then answer each site with ``answer(site, task_id)``."""

    def fan_out(_broker: object, **kw: Any) -> FanOutResult:
        seen["job_id"] = kw["job_id"]
        if store is not None:
            seen["charged_before_send"] = {
                r.site_id: r.task_id for r in store.charges(kw["job_id"])
            }
            seen["state_while_sent"] = store.job(kw["job_id"]).state
        seen["task_ids"] = dict(kw["task_ids"])
        res = FanOutResult()
        for sid in kw["site_ids"]:
            got = answer(sid, kw["task_ids"][sid])
            if isinstance(got, TaskFailure):
                res.failures[sid] = got
            else:
                res.updates[sid] = UpdateResult(got, None)  # type: ignore[arg-type]
        return res

    monkeypatch.setattr(base, "fan_out", fan_out)


def test_an_evaluation_is_charged_ahead_and_never_what_a_site_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sites a (understates: σ = 500), b (reports nothing) and c (refuses) are all charged
    the assigned event, written before the request went out."""
    store = Store(tmp_path)
    assigned = DpEvent(2.0, 1.0, 1)
    seen: dict[str, Any] = {}

    def answer(site: str, task: str) -> UpdateMeta | TaskFailure:
        if site == "a":
            return _meta(site, task, [DpEvent(500.0, 1.0, 1)])
        if site == "b":
            return _meta(site, task, [])
        return TaskFailure(site, task, "PERMISSION_DENIED", "budget")

    _fake_fan_out(monkeypatch, store, answer, seen)
    res = base.send_one_shot(
        None,  # type: ignore[arg-type]
        store,
        kind="evaluate",
        job_id="eval-1",
        site_ids=["a", "b", "c"],
        dataset="d",
        delta=DELTA,
        request_json=json.dumps({"noise_multiplier": 2.0}),
        timeout_s=1.0,
        assigned={s: [("metrics", assigned)] for s in "abc"},
    )
    assert sorted(res.updates) == ["a", "b"]
    # Written ahead: every site's charge, under the task id it was then sent.
    assert seen["charged_before_send"] == seen["task_ids"]
    assert seen["state_while_sent"] == "running"
    rows = sorted(store.charges("eval-1"), key=lambda r: r.site_id)
    assert [r.site_id for r in rows] == ["a", "b", "c"]
    for r in rows:
        assert r.delta == DELTA and [e["noise_multiplier"] for e in r.events] == [2.0]
    job = store.job("eval-1")
    expected = compute_epsilon([assigned], delta=DELTA).epsilon
    assert job.state == "completed" and job.epsilon == pytest.approx(expected)
    assert sorted(job.participants) == ["a", "b"]
    store.close()


def test_a_one_shot_needs_every_sites_assignment_and_fails_visibly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path)
    event = [("metrics", DpEvent(2.0, 1.0, 1))]
    kw: dict[str, Any] = {
        "kind": "evaluate",
        "dataset": "d",
        "delta": DELTA,
        "request_json": "{}",
        "timeout_s": 1.0,
    }
    with pytest.raises(ValueError, match="no assigned events"):
        base.send_one_shot(
            None,  # type: ignore[arg-type]
            store,
            job_id="eval-x",
            site_ids=["a", "b"],
            assigned={"a": event},
            **kw,
        )

    def broken(_broker: object, **_kw: Any) -> FanOutResult:
        raise RuntimeError("broker closed")

    monkeypatch.setattr(base, "fan_out", broken)
    with pytest.raises(RuntimeError, match="broker closed"):
        base.send_one_shot(
            None,  # type: ignore[arg-type]
            store,
            job_id="eval-2",
            site_ids=["a"],
            assigned={"a": event},
            **kw,
        )
    job = store.job("eval-2")
    assert job.state == "failed" and "broker closed" in job.error
    assert [r.site_id for r in store.charges("eval-2")] == ["a"]  # the charge stands
    store.close()


def _schema() -> Schema:
    return Schema(
        (
            ColumnSchema.numeric("age", lo=18.0, hi=90.0, bins=4),
            ColumnSchema.categorical("region", ["north", "south"]),
            ColumnSchema.categorical("label", ["0", "1"]),
        )
    )


def _site(site: str) -> SiteStatus:
    info = DatasetInfo(
        name="t",
        num_rows=100,
        columns=("age", "region"),
        label="label",
        schema=(
            ColumnInfo("age", "numeric", min=18.0, max=90.0),
            ColumnInfo("region", "categorical", categories=("north", "south")),
        ),
    )
    return SiteStatus(site, (info,), 0.0, "test", "online", None)


@pytest.mark.parametrize("lie", ["report", "variance", "marginals"])
def test_a_synth_site_off_its_plan_is_left_out_and_charged_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lie: str
) -> None:
    """Three columns → 6 marginals at one σ, computed at the orchestrator from the catalog.
    A site claiming less noise (in its report, or in the variances its counts would be
    weighted by), or measuring other marginals, is left out; every site pays the plan."""
    store = Store(tmp_path)
    schema = _schema()
    epsilon = 2.0
    (planned,) = planned_events(3, target_epsilon=epsilon, delta=DELTA)
    plan = marginal_plan(schema, target_epsilon=epsilon, delta=DELTA)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "age": rng.uniform(18, 90, 300),
            "region": rng.choice(["north", "south"], 300),
            "label": rng.choice(["0", "1"], 300),
        }
    )

    def answer(site: str, task: str) -> UpdateMeta:
        measurement = measure_site(frame, schema, plan, rng)
        events = list(plan.events)
        if site == "rogue":
            if lie == "report":
                events = [DpEvent(planned.noise_multiplier * 10, 1.0, planned.steps)]
            elif lie == "variance":
                for m in measurement["marginals"]:
                    m["variance"] = float(m["variance"]) / 100
            else:
                measurement["marginals"] = measurement["marginals"][:-1]
        body = json.dumps({"schema": schema.to_dict(), "measurement": measurement})
        return _meta(site, task, events, body)

    seen: dict[str, Any] = {}
    _fake_fan_out(monkeypatch, store, answer, seen)
    _, info = synthesize(
        broker=None,  # type: ignore[arg-type]
        sites=[_site("honest"), _site("rogue")],
        dataset="t",
        epsilon=epsilon,
        rows=50,
        store=store,
    )
    assert info["sites"] == ["honest"]
    assert "left out (charged as planned)" in info["sites_missing"]["rogue"]
    rows = {r.site_id: r for r in store.charges(seen["job_id"])}
    assert sorted(rows) == ["honest", "rogue"]
    for r in rows.values():
        (e,) = r.events
        assert (e["noise_multiplier"], e["sample_rate"], e["steps"]) == (
            planned.noise_multiplier,
            1.0,
            6,
        )
    assert compute_epsilon([planned], delta=DELTA).epsilon <= epsilon
    store.close()
