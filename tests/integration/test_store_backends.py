"""The orchestrator's store on SQLite (embedded default) and on a real PostgreSQL server.

PostgreSQL runs when DPFED_TEST_PG_URL names one (.ci/run starts a throwaway server when it
can); otherwise those cases are skipped with the reason shown.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core.store import Base, ChargeRow, JobRow, RoundRow, Store

PG_URL = os.environ.get("DPFED_TEST_PG_URL")

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param(
        "postgresql",
        id="postgresql",
        marks=pytest.mark.skipif(
            not PG_URL,
            reason="no PostgreSQL server: set DPFED_TEST_PG_URL (.ci/run starts one when it can)",
        ),
    ),
]


def _fresh_url(backend: str, tmp_path: Path) -> str | None:
    if backend == "sqlite":
        return None
    assert PG_URL is not None
    from sqlalchemy import create_engine

    engine = create_engine(PG_URL)
    Base.metadata.drop_all(engine)  # a clean schema for each test
    engine.dispose()
    return PG_URL


@pytest.fixture(params=BACKENDS)
def store(request: Any, tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state", url=_fresh_url(request.param, tmp_path))
    yield s
    s.close()


def _job(job_id: str = "job-1") -> JobRow:
    now = time.time()
    return JobRow(
        job_id=job_id,
        name="n",
        dataset="d",
        spec_json="{}",
        state="pending",
        round=0,
        rounds=2,
        epsilon=0.0,
        delta=1e-5,
        accountant="prv",
        created_at=now,
        updated_at=now,
        participants={"a": 1.0},
    )


def test_sites_jobs_rounds_charges_round_trip(store: Store) -> None:
    store.upsert_site(
        site_id="a",
        version="0.1",
        session_id="s",
        datasets=[{"name": "d"}],
        policy={"max_epsilon": 1.0},
    )
    store.upsert_site(site_id="a", version="0.2", session_id="t", datasets=[], policy={})
    (site,) = store.sites()
    assert site.version == "0.2" and site.enabled
    store.set_site_enabled("a", False)
    assert not store.site("a").enabled  # type: ignore[union-attr]

    store.add_job(_job())
    store.add_event("job-1", "info", "hello", site_id="a")
    charge = ChargeRow(
        job_id="job-1",
        round=1,
        site_id="a",
        dataset="d",
        task_id="t1",
        num_examples=10,
        max_grad_norm=1.0,
        delta=1e-5,
        dataset_epsilon=0.5,
        policy_delta=1e-5,
        events=[{"kind": "train", "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5}],
    )
    store.commit_round(
        RoundRow(
            job_id="job-1",
            round=1,
            site_ids=["a"],
            loss=0.5,
            accuracy=0.9,
            num_examples=10,
            duration_s=1.0,
            epsilon=0.4,
        ),
        [charge],
        round=1,
        epsilon=0.4,
        state="running",
    )
    job = store.job("job-1")
    assert (job.round, job.epsilon, job.state, job.participants) == (1, 0.4, "running", {"a": 1.0})
    (rnd,) = store.rounds("job-1")
    assert rnd.site_ids == ["a"] and rnd.accuracy == 0.9
    (c,) = store.charges("job-1")
    assert c.events[0]["steps"] == 5
    assert [e.message for e in store.events("job-1")] == ["hello"]


def test_sites_are_read_a_page_at_a_time_in_id_order_and_policies_alone(store: Store) -> None:
    ids = [f"site-{i:03d}" for i in range(23)]
    for sid in reversed(ids):
        store.upsert_site(
            site_id=sid,
            version="1",
            session_id="s",
            datasets=[{"name": "d", "columns": [{"name": f"c{j}"} for j in range(50)]}],
            policy={"secure_noise": sid.endswith("7")},
        )
    assert [r.site_id for r in store.each_site(page=5)] == ids  # 4 full pages and a short one
    assert [r.site_id for r in store.each_site(page=23)] == ids  # a full last page, then none
    assert [r.site_id for r in store.each_site()] == [r.site_id for r in store.sites()]
    assert store.site_policies() == {sid: {"secure_noise": sid.endswith("7")} for sid in ids}


def test_a_task_is_charged_once(store: Store) -> None:
    from sqlalchemy.exc import IntegrityError

    store.add_job(_job())
    row = dict(
        job_id="job-1",
        round=1,
        site_id="a",
        dataset="d",
        task_id="same",
        num_examples=1,
        max_grad_norm=1.0,
        delta=1e-5,
        dataset_epsilon=0.0,
        policy_delta=1e-5,
        events=[],
    )
    store.add_charges([ChargeRow(**row)])
    with pytest.raises(IntegrityError):
        store.add_charges([ChargeRow(**row)])
    assert len(store.charges("job-1")) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_whole_job_on_each_backend(backend: str, tmp_path: Path, digits: Any) -> None:
    import tests.integration.test_grpc_job as g
    from orchestrator.client import ControlClient
    from orchestrator.server import start_server

    url = _fresh_url(backend, tmp_path)

    def start(**kw: Any) -> Any:
        return start_server(**kw, db_url=url)

    mp = pytest.MonkeyPatch()
    mp.setattr(g, "start_server", start)
    try:
        net = g._start(tmp_path, digits, {"a": {}, "b": {}})
    finally:
        mp.undo()
    try:
        with ControlClient(net.address) as c:
            st = g._wait(c, c.submit(g._job(rounds=2, min_sites=2)))
            assert st.state == "completed", st.error
            assert [h.round for h in st.history] == [1, 2]
            assert len(c.download(st.job_id)[1]) > 0
    finally:
        net.stop()
