"""Issue 16.2/16.1: check and charge are one ledger transaction, reservations hold an admitted
job's budget, and one agent owns a state directory."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from common.dp.events import DpEvent
from common.errors import InvalidSpecError, PolicyRefusal
from site_agent.boundary.ledger import Ledger
from site_agent.boundary.state_lock import StateDirLock

DELTA = 1e-5
SGD = DpEvent(1.0, 0.01, 100)
REPO_ROOT = Path(__file__).resolve().parents[2]


def _charge(ledger: Ledger, task: str, job: str = "job-1", **kw: object) -> None:
    ledger.charge(
        dataset="digits",
        job_id=job,
        round=1,
        task_id=task,
        kind="train",
        events=[SGD],
        delta=DELTA,
        **kw,  # type: ignore[arg-type]
    )


def test_a_second_ledger_checks_after_the_first_charge_commits(tmp_path: Path) -> None:
    """Two connections (as two processes would have): the second's check runs only once the
    first charge is on disk, so it sees it. Without the transaction both would pass."""
    path = tmp_path / "ledger.sqlite"
    inside = threading.Event()
    seen: list[int] = []

    def slow_check(history: list[DpEvent]) -> None:
        inside.set()
        time.sleep(0.3)  # holds the write lock: the other charge must wait for the commit

    def budget_for_one(history: list[DpEvent]) -> None:
        seen.append(len(history))
        if history:
            raise PolicyRefusal("the budget holds one charge")

    with Ledger(path) as first, Ledger(path) as second:
        t = threading.Thread(target=_charge, args=(first, "t-1"), kwargs={"check": slow_check})
        t.start()
        assert inside.wait(5)
        with pytest.raises(PolicyRefusal):
            _charge(second, "t-2", job="job-2", check=budget_for_one)
        t.join()
        assert seen == [1]
        assert len(first.events("digits")) == 1


def test_a_refusing_check_records_nothing(tmp_path: Path) -> None:
    def refuse(history: list[DpEvent]) -> None:
        raise PolicyRefusal("no")

    with Ledger(tmp_path / "l.sqlite") as ledger:
        with pytest.raises(PolicyRefusal):
            _charge(ledger, "t-1", check=refuse)
        assert ledger.entries() == []


def test_two_processes_never_overspend(tmp_path: Path) -> None:
    """Four processes race to charge a budget that holds two charges: exactly two win."""
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    script = textwrap.dedent(
        f"""
        import sys
        from common.dp.events import DpEvent
        from common.errors import PolicyRefusal
        from site_agent.boundary.ledger import Ledger
        def check(history):
            if len(history) >= 2:
                raise PolicyRefusal("full")
        with Ledger({str(path)!r}) as led:
            try:
                led.charge(dataset="digits", job_id="j" + sys.argv[1], round=1,
                           task_id="t" + sys.argv[1], kind="train",
                           events=[DpEvent(1.0, 0.01, 100)], delta=1e-5, check=check)
            except PolicyRefusal:
                sys.exit(3)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(i)], cwd=REPO_ROOT) for i in range(4)
    ]
    codes = sorted(p.wait(timeout=120) for p in procs)
    assert codes == [0, 0, 3, 3]
    with Ledger(path) as ledger:
        assert len(ledger.entries()) == 2


def test_a_reservation_counts_for_other_jobs_until_used_or_released(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite") as ledger:
        metric = DpEvent(20.0, 1.0, 1)
        seen: list[list[DpEvent]] = []
        ledger.reserve(
            dataset="digits",
            job_id="job-a",
            per_round=[("train", SGD), ("metrics", metric)],
            rounds=3,
            delta=DELTA,
            check=seen.append,
        )
        assert seen == [[]]  # its own reservation is not in its own check
        assert ledger.commitments("digits", excluding_job="job-b") == [
            DpEvent(1.0, 0.01, 300),
            DpEvent(20.0, 1.0, 3),
        ]
        assert ledger.commitments("digits", excluding_job="job-a") == []
        # One round of job-a charged (train + metrics, one task): two rounds stay promised.
        ledger.charge(
            dataset="digits",
            job_id="job-a",
            round=1,
            task_id="a-1",
            kind=["train", "metrics"],
            events=[SGD, metric],
            delta=DELTA,
        )
        assert ledger.commitments("digits", excluding_job="job-b") == [
            SGD,
            metric,
            DpEvent(1.0, 0.01, 200),
            DpEvent(20.0, 1.0, 2),
        ]
        (res,) = ledger.reservations("digits")
        assert (res.job_id, res.rounds, res.used) == ("job-a", 3, 1)
        assert ledger.release(dataset="digits", job_id="job-a", reason="cancelled")
        assert not ledger.release(dataset="digits", job_id="job-a", reason="again")
        assert ledger.commitments("digits", excluding_job="job-b") == [SGD, metric]
        assert ledger.reservations("digits") == []


def test_reserving_again_replaces_the_earlier_reservation(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite") as ledger:
        for rounds in (5, 2):
            ledger.reserve(
                dataset="digits",
                job_id="job-a",
                per_round=[("train", SGD)],
                rounds=rounds,
                delta=DELTA,
                check=lambda h: None,
            )
        (res,) = ledger.reservations("digits")
        assert res.rounds == 2


def test_a_version_1_ledger_is_upgraded_and_keeps_its_charges(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "l.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE schema_version (version INTEGER NOT NULL);
        INSERT INTO schema_version VALUES (1);
        CREATE TABLE charges (
            id INTEGER PRIMARY KEY AUTOINCREMENT, dataset TEXT NOT NULL, job_id TEXT NOT NULL,
            round INTEGER NOT NULL, task_id TEXT NOT NULL, kind TEXT NOT NULL,
            noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL,
            delta REAL NOT NULL, created_at REAL NOT NULL);
        INSERT INTO charges (dataset, job_id, round, task_id, kind, noise_multiplier,
            sample_rate, steps, delta, created_at)
            VALUES ('digits', 'job-old', 1, 't', 'train', 1.0, 0.01, 100, 1e-5, 0.0);
        """
    )
    conn.close()
    with Ledger(path, budgets={"digits": "file:/data/d.csv", "alias": "file:/data/d.csv"}) as led:
        assert led.events("alias") == [SGD]  # matched by the name the old charge carries
        _charge(led, "t-new")
        assert len(led.events("alias")) == 2


def test_one_agent_per_state_directory(tmp_path: Path) -> None:
    with StateDirLock(tmp_path / "state"):
        with pytest.raises(InvalidSpecError, match="already runs on the state directory"):
            StateDirLock(tmp_path / "state")
    StateDirLock(tmp_path / "state").release()  # free again once released


def test_a_second_agent_on_the_same_state_dir_refuses_to_start(tmp_path: Path) -> None:
    from site_agent.agent import SiteAgent
    from site_agent.config import load_site_config

    (tmp_path / "credit.csv").write_text(
        "a,default\n" + "".join(f"{i},{i % 2}\n" for i in range(20))
    )
    (tmp_path / "site.yaml").write_text(
        yaml.safe_dump(
            {
                "site_id": "bank-a",
                "orchestrator": "127.0.0.1:50051",
                "state_dir": "state",
                "insecure": True,
                "datasets": [
                    {
                        "name": "credit",
                        "path": "credit.csv",
                        "label": "default",
                    }
                ],
                "policy": {"max_epsilon": 10.0, "delta": 1e-5, "min_noise_multiplier": 0.5},
            }
        )
    )
    cfg = load_site_config(tmp_path / "site.yaml")
    first = SiteAgent(cfg)
    try:
        with pytest.raises(InvalidSpecError, match="already runs on the state directory"):
            SiteAgent(cfg)
    finally:
        first.close()
    SiteAgent(cfg).close()


def test_a_jobs_other_releases_do_not_eat_into_its_own_reservation(tmp_path: Path) -> None:
    """A job's non-training release (e.g. quantile edges) is checked against its own
    reservation too, and does not use up one of its rounds."""
    with Ledger(tmp_path / "l.sqlite") as ledger:
        ledger.reserve(
            dataset="digits",
            job_id="job-a",
            per_round=[("train", SGD)],
            rounds=2,
            delta=DELTA,
            check=lambda h: None,
        )
        seen: list[list[DpEvent]] = []
        ledger.charge(
            dataset="digits",
            job_id="job-a",
            round=0,
            task_id="q-1",
            kind="quantiles",
            events=[DpEvent(5.0, 1.0, 1)],
            delta=DELTA,
            check=seen.append,
        )
        assert seen == [[DpEvent(1.0, 0.01, 200)]]  # its own two rounds, still held
        (res,) = ledger.reservations("digits")
        assert res.used == 0
        seen.clear()
        _charge(ledger, "a-1", job="job-a", check=seen.append)
        assert seen == [[DpEvent(5.0, 1.0, 1)]]  # a round of job-a draws on its reservation
        assert ledger.reservations("digits")[0].used == 1


def test_an_event_released_in_some_rounds_only_is_held_that_often(tmp_path: Path) -> None:
    metric = DpEvent(20.0, 1.0, 1)
    with Ledger(tmp_path / "l.sqlite") as ledger:
        res = ledger.reserve(
            dataset="digits",
            job_id="job-a",
            per_round=[("train", SGD), ("metrics", metric)],
            rounds=5,
            delta=DELTA,
            check=lambda h: None,
            counts={"metrics": 2},
        )
        assert res.remaining == [DpEvent(1.0, 0.01, 500), DpEvent(20.0, 1.0, 2)]
        for i in range(4):
            _charge(ledger, f"a-{i}", job="job-a")
        # One round left: at most one more metrics release.
        assert ledger.commitments("digits") == [SGD] * 4 + [SGD, metric]
