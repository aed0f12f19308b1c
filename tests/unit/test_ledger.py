"""Unit tests for site_agent.boundary.ledger: durability, atomicity, append-only, properties."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.dp.accounting import compute_epsilon
from common.dp.events import DpEvent
from common.dp.rdp import rdp_epsilon
from common.errors import PolicyRefusal, PrivacyAccountingError
from site_agent.boundary.admission import Release, Training, check_release
from site_agent.boundary.ledger import SCHEMA_VERSION, Ledger, LedgerEntry
from site_agent.config import Policy

REPO_ROOT = Path(__file__).resolve().parents[2]
DELTA = 1e-5

SGD = DpEvent(1.0, 0.01, 100)
METRIC = DpEvent(20.0, 1.0, 1)


def charge(
    ledger: Ledger, *, task: str, events: list[DpEvent], dataset: str = "digits"
) -> list[LedgerEntry]:
    return ledger.charge(
        dataset=dataset,
        job_id=f"job-{task.split('/')[0]}",
        round=0,
        task_id=task,
        kind="train",
        events=events,
        delta=DELTA,
    )


# ---------------------------------------------------------------- basics


def test_charge_returns_entries_and_reads_back(tmp_path: Path) -> None:
    with Ledger(tmp_path / "state" / "ledger.sqlite") as ledger:
        entries = ledger.charge(
            dataset="digits",
            job_id="job-1",
            round=3,
            task_id="t-1",
            kind="train+metrics",
            events=[SGD, METRIC],
            delta=1e-6,
        )
        assert [e.event for e in entries] == [SGD, METRIC]
        assert entries[0].id < entries[1].id
        assert all(e.round == 3 and e.delta == 1e-6 and e.kind == "train+metrics" for e in entries)
        assert ledger.entries() == entries
        assert ledger.entries(dataset="digits", job_id="job-1") == entries
        assert ledger.entries(dataset="other") == []
        assert ledger.events("digits") == [SGD, METRIC]
        assert ledger.datasets() == ["digits"]


def test_creates_parent_dirs_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ledger.sqlite"
    with Ledger(path) as ledger:
        # synchronous=FULL (2) is per connection: the WAL is fsynced at every commit.
        assert ledger._conn is not None
        assert ledger._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_durable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        first = charge(ledger, task="1/a", events=[SGD, METRIC])
        second = charge(ledger, task="2/a", events=[DpEvent(1.3, 0.02, 77)], dataset="cancer")
        spent = ledger.spent("digits", delta=DELTA)
    with Ledger(path) as reopened:
        assert reopened.entries() == first + second
        assert reopened.datasets() == ["cancer", "digits"]
        assert reopened.spent("digits", delta=DELTA) == spent
        assert reopened.events("digits", job_id="job-1") == [SGD, METRIC]
        assert reopened.events("digits", job_id="job-2") == []
        # Ids keep increasing after reopening.
        third = charge(reopened, task="3/a", events=[SGD])
        assert third[0].id > second[-1].id


def test_spent_composes_all_jobs_of_a_dataset(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.spent("digits", delta=DELTA).epsilon == 0.0
        charge(ledger, task="1/a", events=[SGD])
        charge(ledger, task="2/a", events=[SGD, METRIC])
        charge(ledger, task="3/a", events=[DpEvent(0.6, 0.5, 50)], dataset="other")
        expected = compute_epsilon([SGD, SGD, METRIC], delta=DELTA)
        assert ledger.spent("digits", delta=DELTA) == expected
        assert ledger.spent("digits", delta=DELTA, accountant="rdp").epsilon == rdp_epsilon(
            [SGD, SGD, METRIC], delta=DELTA
        )


# ---------------------------------------------------------------- all-or-nothing and append-only


def test_charge_is_all_or_nothing(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        charge(ledger, task="1/a", events=[SGD])
        # An event that slipped past validation: the database's CHECK rejects the 2nd row,
        # and the 1st row of the same charge must not survive.
        corrupt = DpEvent(1.0, 0.01, 1)
        object.__setattr__(corrupt, "steps", 0)
        with pytest.raises(sqlite3.IntegrityError):
            charge(ledger, task="2/a", events=[SGD, corrupt])
        assert [e.task_id for e in ledger.entries()] == ["1/a"]
        charge(ledger, task="3/a", events=[METRIC])  # the ledger still works
        assert [e.task_id for e in ledger.entries()] == ["1/a", "3/a"]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("dataset", "", "dataset"),
        ("job_id", "", "job_id"),
        ("task_id", 7, "task_id"),
        ("kind", "", "kind"),
        ("round", -1, "round"),
        ("round", True, "round"),
        ("delta", 0.0, "δ"),
        ("delta", 1.0, "δ"),
        ("delta", float("nan"), "δ"),
        ("events", [], "at least one"),
        ("events", [(1.0, 0.01, 10)], "DpEvent"),
    ],
)
def test_bad_charges_are_refused_and_not_recorded(
    tmp_path: Path, field: str, value: object, match: str
) -> None:
    kwargs: dict[str, object] = {
        "dataset": "digits",
        "job_id": "job-1",
        "round": 0,
        "task_id": "t",
        "kind": "train",
        "events": [SGD],
        "delta": DELTA,
    }
    kwargs[field] = value
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        with pytest.raises(ValueError, match=match):
            ledger.charge(**kwargs)  # type: ignore[arg-type]
        assert ledger.entries() == []


def test_ledger_is_append_only(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        charge(ledger, task="1/a", events=[SGD])
        public = {name for name in dir(ledger) if not name.startswith("_")}
        ledger.reserve(
            dataset="digits",
            job_id="job-r",
            per_round=[("train", SGD)],
            rounds=2,
            delta=DELTA,
            check=lambda history: None,
        )
        ledger.release(dataset="digits", job_id="job-r", reason="test")
        public = {name for name in dir(ledger) if not name.startswith("_")}
        # Nothing public lowers what was charged: release ends a reservation, not a charge.
        assert public == {
            "budget_of",
            "charge",
            "close",
            "commitments",
            "datasets",
            "entries",
            "events",
            "path",
            "release",
            "reservations",
            "reserve",
            "spent",
        }
    conn = sqlite3.connect(path)
    try:
        for table in ("charges", "reservations", "reservation_ends"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                conn.execute(f"UPDATE {table} SET created_at = 1")
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                conn.execute(f"DELETE FROM {table}")
    finally:
        conn.close()
    with Ledger(path) as ledger:
        assert ledger.events("digits") == [SGD]


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(PrivacyAccountingError, match="schema version 99"):
        Ledger(path)


def test_closed_ledger_refuses_use(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.close()
    ledger.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        ledger.entries()
    with pytest.raises(ValueError, match="closed"):
        charge(ledger, task="1/a", events=[SGD])


def test_two_threads_charge_concurrently(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        errors: list[BaseException] = []

        def work(name: str) -> None:
            try:
                for i in range(40):
                    charge(ledger, task=f"{name}/{i}", events=[SGD, METRIC])
                    ledger.entries(dataset="digits")
            except BaseException as err:  # pragma: no cover - reported below
                errors.append(err)

        threads = [threading.Thread(target=work, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        entries = ledger.entries()
        assert len(entries) == 160
        assert len({e.id for e in entries}) == 160


# ---------------------------------------------------------------- crash safety


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from common.dp.events import DpEvent
    from site_agent.boundary.ledger import Ledger

    ledger = Ledger(Path(sys.argv[1]))
    mode = sys.argv[2]
    n = 0
    while True:
        ledger.charge(
            dataset="digits", job_id="job-1", round=n, task_id=f"task-{n}", kind="train",
            events=[DpEvent(1.0, 0.01, 10), DpEvent(20.0, 1.0, 1), DpEvent(3.0, 0.1, 5)],
            delta=1e-5,
        )
        if mode == "once":
            # The update would leave the site now; die before anything else happens.
            os.kill(os.getpid(), signal.SIGKILL)
        n += 1
        if n == 1:
            print("charging", flush=True)
    """
)


def _child(path: Path, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), mode],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_charge_survives_sigkill_right_after_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    proc = _child(path, "once")
    assert proc.wait(timeout=120) == -signal.SIGKILL
    with Ledger(path) as ledger:
        entries = ledger.entries()
    assert [e.task_id for e in entries] == ["task-0"] * 3
    assert [e.event for e in entries] == [
        DpEvent(1.0, 0.01, 10),
        DpEvent(20.0, 1.0, 1),
        DpEvent(3.0, 0.1, 5),
    ]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_mid_stream_leaves_only_whole_charges(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    proc = _child(path, "loop")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "charging"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    with Ledger(path) as ledger:
        entries = ledger.entries()
    assert entries, "the first charge returned before the child printed, so it must be there"
    by_task: dict[str, int] = {}
    for e in entries:
        by_task[e.task_id] = by_task.get(e.task_id, 0) + 1
    assert set(by_task.values()) == {3}  # every charge whole, none torn
    assert sorted(by_task, key=lambda t: int(t.split("-")[1])) == [
        f"task-{i}" for i in range(len(by_task))
    ]


# ---------------------------------------------------------------- properties

events_st = st.builds(
    DpEvent,
    noise_multiplier=st.sampled_from([0.7, 1.0, 1.5, 3.0, 20.0]),
    sample_rate=st.sampled_from([0.005, 0.02, 0.1, 1.0]),
    steps=st.integers(min_value=1, max_value=60),
)
tasks_st = st.lists(st.lists(events_st, min_size=1, max_size=2), min_size=1, max_size=4)
prop_settings = settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@prop_settings
@given(tasks=tasks_st)
def test_composed_epsilon_never_decreases(
    tmp_path_factory: pytest.TempPathFactory, tasks: list[list[DpEvent]]
) -> None:
    path = tmp_path_factory.mktemp("mono") / "ledger.sqlite"
    previous = {"prv": 0.0, "rdp": 0.0}
    with Ledger(path) as ledger:
        for i, events in enumerate(tasks):
            charge(ledger, task=f"{i}/t", events=events)
            for accountant in previous:
                eps = ledger.spent("digits", delta=DELTA, accountant=accountant).epsilon
                # RDP composes exactly additively: monotone to the last bit. PRV is numerical:
                # adding a charge of negligible cost moves its grid, and the bound by ~1e-7
                # relative (observed); more than 1e-6 would be a real decrease.
                slack = 0.0 if accountant == "rdp" else 1e-6 * previous[accountant]
                assert eps >= previous[accountant] - slack, (accountant, i, events)
                previous[accountant] = eps


POLICY = Policy(max_epsilon=8.0, delta=1e-5, min_noise_multiplier=0.5)


def _run_task(ledger: Ledger, max_epsilon: float, i: int, events: list[DpEvent]) -> bool:
    """The agent's path for one task: check the policy, then charge before releasing."""
    release = Release(
        what="the task",
        events=tuple(events),
        delta=POLICY.delta,
        kinds=("train",) + ("metrics",) * (len(events) - 1),
        training=Training(
            model_kind="mlp",
            num_parameters=1000,
            round=i,
            rounds=100,
            noise_multiplier=events[0].noise_multiplier,
            task_delta=POLICY.delta,
            steps=events[0].steps,
        ),
    )
    try:
        check_release(
            policy=POLICY,
            max_epsilon=max_epsilon,
            dataset="digits",
            release=release,
            history=ledger.events("digits"),
        )
    except PolicyRefusal:
        return False
    charge(ledger, task=f"{i}/t", events=events)
    return True


@prop_settings
@given(
    tasks=st.lists(st.lists(events_st, min_size=1, max_size=2), min_size=1, max_size=6),
    max_epsilon=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
)
def test_task_over_budget_is_always_refused(
    tmp_path_factory: pytest.TempPathFactory, tasks: list[list[DpEvent]], max_epsilon: float
) -> None:
    path = tmp_path_factory.mktemp("budget") / "ledger.sqlite"
    with Ledger(path) as ledger:
        for i, events in enumerate(tasks):
            before = ledger.events("digits")
            over = rdp_epsilon([*before, *events], delta=POLICY.delta) > max_epsilon
            accepted = _run_task(ledger, max_epsilon, i, events)
            assert accepted is not over, (i, events)
            if not accepted:
                assert ledger.events("digits") == before  # nothing charged on refusal
        # Whatever was accepted, the reported (tight) spend stays within the site's limit.
        assert ledger.spent("digits", delta=POLICY.delta, accountant="rdp").epsilon <= max_epsilon
        assert ledger.spent("digits", delta=POLICY.delta).epsilon <= max_epsilon
