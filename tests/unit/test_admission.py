"""Issue 16.1: a site admits a whole job before its first round, and reserves its cost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.domain import TaskAssignment
from common.dp.events import DpEvent
from common.dp.rdp import rdp_epsilon
from common.errors import PolicyRefusal
from common.specs import parse_job_spec
from site_agent.boundary.ledger import Ledger
from site_agent.config import SiteConfig
from site_agent.handlers.admit import RoundCharges, job_events, run_admit

TRAIN = DpEvent(1.0, 0.05, 20)
METRIC = DpEvent(20.0, 1.0, 1)
PER_ROUND: RoundCharges = (("train", TRAIN), ("metrics", METRIC))


def _config(tmp_path: Path, max_epsilon: float) -> SiteConfig:
    (tmp_path / "d.csv").write_text("a,label\n1,0\n")
    return SiteConfig.model_validate(
        {
            "site_id": "site-c",
            "orchestrator": "127.0.0.1:1",
            "state_dir": str(tmp_path / "state"),
            "insecure": True,
            "datasets": [{"name": "digits", "path": str(tmp_path / "d.csv"), "label": "label"}],
            "policy": {"max_epsilon": max_epsilon, "delta": 1e-5},
        }
    )


def _task(job_id: str, action: str, rounds: int = 5, every: int | None = 1) -> TaskAssignment:
    spec = parse_job_spec(
        {
            "dataset": "digits",
            "model": {"kind": "linear", "input_dim": 1, "num_classes": 2},
            "rounds": rounds,
            "local_steps": 20,
            "batch_size": 8,
            "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
            "metrics": {"every": every} if every else {},
        }
    )
    return TaskAssignment(
        task_id=f"{job_id}-{action}",
        job_id=job_id,
        round=1,
        rounds=rounds,
        job_spec_json=spec.model_dump_json(),
        dataset="digits",
        noise_multiplier=1.0,
        model_size=0,
        model_sha256="",
        deadline_unix=0.0,
        kind="admit",
        request_json=json.dumps({"action": action}),
    )


def _admit(cfg: SiteConfig, ledger: Ledger, task: TaskAssignment) -> dict[str, object]:
    meta, blob = run_admit(config=cfg, ledger=ledger, task=task, round_charges=lambda t: PER_ROUND)
    assert blob == b"" and meta.dp_report.events == ()
    out: dict[str, object] = json.loads(meta.result_json)
    return out


def test_the_whole_job_is_checked_not_one_round(tmp_path: Path) -> None:
    one_round = rdp_epsilon([TRAIN, METRIC], delta=1e-5)
    whole = rdp_epsilon(job_events(PER_ROUND, 5), delta=1e-5)
    budget = (one_round + whole) / 2  # one round fits, five do not
    cfg = _config(tmp_path, budget)
    with Ledger(tmp_path / "l.sqlite") as ledger:
        with pytest.raises(PolicyRefusal) as err:
            _admit(cfg, ledger, _task("job-1", "reserve"))
        msg = str(err.value)
        assert "'digits'" in msg and "5 rounds" in msg and f"budget of ε={budget:g}" in msg
        assert ledger.reservations("digits") == [] and ledger.entries() == []


def test_a_reservation_is_counted_by_the_next_jobs_admission(tmp_path: Path) -> None:
    whole = rdp_epsilon(job_events(PER_ROUND, 5), delta=1e-5)
    both = rdp_epsilon(job_events(PER_ROUND, 10), delta=1e-5)
    cfg = _config(tmp_path, (whole + both) / 2)  # one job fits, two do not
    with Ledger(tmp_path / "l.sqlite") as ledger:
        first = _admit(cfg, ledger, _task("job-1", "reserve"))
        assert first["admitted"] is True and first["reserved"] is True
        assert first["epsilon_after"] == pytest.approx(whole)
        # A dry run (orchestrator plan) sees the reservation too, and records nothing.
        with pytest.raises(PolicyRefusal, match="promised to admitted jobs"):
            _admit(cfg, ledger, _task("job-2", "check"))
        with pytest.raises(PolicyRefusal, match="promised to admitted jobs"):
            _admit(cfg, ledger, _task("job-2", "reserve"))
        assert [r.job_id for r in ledger.reservations("digits")] == ["job-1"]
        # Released (the job ended): the budget is free again.
        assert _admit(cfg, ledger, _task("job-1", "release")) == {"released": True}
        assert _admit(cfg, ledger, _task("job-2", "check"))["admitted"] is True
        assert ledger.reservations("digits") == []


def test_composition_is_not_a_sum_of_epsilons(tmp_path: Path) -> None:
    """Two jobs whose ε values add up past the budget can both be admitted: the site
    composes their events (RDP), as it will when it charges them."""
    whole = rdp_epsilon(job_events(PER_ROUND, 5), delta=1e-5)
    both = rdp_epsilon(job_events(PER_ROUND, 10), delta=1e-5)
    assert both < 2 * whole
    cfg = _config(tmp_path, (both + 2 * whole) / 2)
    with Ledger(tmp_path / "l.sqlite") as ledger:
        _admit(cfg, ledger, _task("job-1", "reserve"))
        assert _admit(cfg, ledger, _task("job-2", "reserve"))["admitted"] is True


def test_metrics_are_reserved_only_for_the_rounds_that_release_them(tmp_path: Path) -> None:
    # By default only the last round releases metrics (metrics.every unset): the job costs
    # five rounds of training and one metrics release, as its train tasks will charge.
    cfg = _config(tmp_path, 100.0)
    with Ledger(tmp_path / "l.sqlite") as ledger:
        answer = _admit(cfg, ledger, _task("job-1", "check", every=None))
    once = rdp_epsilon(job_events(PER_ROUND, 5, metrics_releases=1), delta=1e-5)
    assert job_events(PER_ROUND, 5, metrics_releases=1) == [DpEvent(1.0, 0.05, 100), METRIC]
    assert answer["epsilon_after"] == pytest.approx(once)
    assert once < rdp_epsilon(job_events(PER_ROUND, 5), delta=1e-5)
