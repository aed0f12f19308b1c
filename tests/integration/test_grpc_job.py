"""In-process gRPC: an orchestrator on 127.0.0.1:0 and site agents in threads, real wire."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.dp.accounting import compute_epsilon
from common.dp.events import DpEvent
from common.errors import InvalidSpecError, NotFoundError
from common.specs import parse_job_spec
from common.training.models import load_model
from orchestrator.client import ControlClient
from orchestrator.server import RunningServer, start_server
from site_agent.agent import SiteAgent
from site_agent.boundary.ledger import Ledger
from tests.integration.sites import (
    POLICY,
    features_dataset,
    start_agents,
    stop_agents,
    wait_online,
    write_features_csv,
    write_site,
)


@dataclass
class Net:
    server: RunningServer
    agents: dict[str, SiteAgent]
    threads: dict[str, threading.Thread]
    root: Path

    @property
    def address(self) -> str:
        return self.server.address

    def stop_agent(self, site_id: str) -> None:
        stop_agents([self.agents[site_id]], [self.threads[site_id]])

    def stop(self) -> None:
        """Every agent, then the orchestrator."""
        stop_agents(self.agents, self.threads)
        self.server.stop(0.5)


def _write_site(
    root: Path,
    site_id: str,
    x: np.ndarray,
    y: np.ndarray,
    port: int,
    *,
    num_classes: int = 10,
    **policy: Any,
) -> Path:
    write_features_csv(root / site_id / "data.csv", x, y)
    return write_site(
        root,
        site_id,
        orchestrator=f"127.0.0.1:{port}",
        datasets=[features_dataset("digits", num_classes=num_classes)],
        policy={**POLICY, **policy},
    )


def _start(
    tmp_path: Path,
    digits: tuple[np.ndarray, np.ndarray],
    policies: dict[str, dict[str, Any]],
    *,
    num_classes: int = 10,
) -> Net:
    """An orchestrator and one agent per ``site_id → policy overrides``, the first 900 digits
    rows split evenly among them; ``num_classes`` declared by every site."""
    server = start_server(listen="127.0.0.1:0", state_dir=tmp_path / "orch", offline_after_s=3.0)
    x, y = digits
    parts = np.array_split(np.random.default_rng(0).permutation(len(y))[:900], len(policies))
    configs = {
        site_id: _write_site(
            tmp_path, site_id, x[idx], y[idx], server.port, num_classes=num_classes, **pol
        )
        for (site_id, pol), idx in zip(policies.items(), parts, strict=True)
    }
    net = Net(server, *start_agents(configs), tmp_path)
    with ControlClient(net.address) as c:
        wait_online(c, len(policies))
    return net


@pytest.fixture
def net_factory(tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> Iterator[Any]:
    nets: list[Net] = []

    def make(policies: dict[str, dict[str, Any]]) -> Net:
        nets.append(_start(tmp_path, digits, policies))
        return nets[-1]

    yield make
    for n in nets:
        n.stop()


def _job(**over: Any) -> str:
    spec = {
        "dataset": "digits",
        "model": {"kind": "mlp", "input_dim": 64, "num_classes": 10, "hidden": [32]},
        "rounds": 2,
        "local_steps": 6,
        "batch_size": 32,
        "optimizer": {"name": "sgd", "lr": 0.5},
        "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
        "min_sites": 3,
        "round_timeout_s": 60,
        "start_timeout_s": 20,
        "seed": 1,
        **over,
    }
    return parse_job_spec(spec).model_dump_json()


def _wait(c: ControlClient, job_id: str, timeout_s: float = 120) -> Any:
    last = None
    for st in c.watch(job_id):
        last = st
    assert last is not None
    return last


def test_job_runs_end_to_end_and_card_matches_site_ledgers(
    net_factory: Any, tmp_path: Path
) -> None:
    net = net_factory({"a": {}, "b": {}, "c": {}})
    with ControlClient(net.address) as c:
        job_id = c.submit(_job())
        st = _wait(c, job_id)
        assert st.state == "completed", st.error
        assert st.model_released and st.round == 2
        card_json, weights = c.download(job_id)
    card = json.loads(card_json)
    for key in ("job_id", "model", "epsilon", "delta", "accountant", "rounds", "sites", "metrics"):
        assert key in card
    assert card["rounds"] == 2 and len(card["metrics"]) == 2
    # Metrics in the final round only (metrics.every unset), pooled with standard errors.
    assert card["metrics"][0]["validation"] is None
    pooled = card["metrics"][1]["validation"]
    assert pooled["sites"] == 3 and pooled["accuracy"]["se"] > 0
    assert card["metrics_release"]["rounds"] == [2]
    assert card["final_metrics"]["round"] == 2 and " ± " in card["final_metrics"]["summary"]
    assert st.history[0].metrics is None and st.history[1].metrics is not None
    assert {s["site_id"] for s in card["sites"]} == {"a", "b", "c"}
    # The card's ε is the max over sites, and each site's ε is what its own ledger composes.
    assert card["epsilon"] == pytest.approx(max(s["epsilon"] for s in card["sites"]))
    for s in card["sites"]:
        with Ledger(tmp_path / s["site_id"] / "state" / "ledger.sqlite") as led:
            evs = led.events("digits", job_id=job_id)
        assert len(evs) == 3  # 2 rounds of training + metrics in the last round only
        assert compute_epsilon(evs, delta=1e-5).epsilon == pytest.approx(s["epsilon"], rel=1e-6)
        assert s["steps"] == 12 and s["noise_multiplier"] == 1.0
    out = tmp_path / "pulled"
    out.mkdir()
    (out / "model.safetensors").write_bytes(weights)
    (out / "model_card.json").write_text(card_json)
    model = load_model(out)
    assert model(torch.zeros(5, 64)).shape == (5, 10)


def test_refusing_site_is_reported_with_its_id_and_reason(net_factory: Any) -> None:
    net = net_factory({"a": {}, "b": {}, "stingy": {"max_epsilon": 0.5}})
    with ControlClient(net.address) as c:
        st = _wait(c, c.submit(_job(min_sites=3)))
        assert st.state == "failed"
        assert "stingy" in st.error and "refused" in st.error
        # With min_sites=2 the job goes on without the refusing site.
        st = _wait(c, c.submit(_job(min_sites=2)))
        assert st.state == "completed", st.error
        assert {s.site_id for s in st.sites} == {"a", "b"}
        assert any("stingy" in e.message and "refused" in e.message for e in st.events)


def test_plan_projects_refusals_and_target_epsilon_calibrates_per_site(net_factory: Any) -> None:
    net = net_factory({"a": {}, "b": {}, "stingy": {"max_epsilon": 0.5}})
    with ControlClient(net.address) as c:
        plan = c.plan(_job())
        verdict = {s.site_id: s.would_refuse for s in plan.sites}
        assert verdict == {"a": False, "b": False, "stingy": True}
        assert not plan.feasible
        spec = _job(dp={"target_epsilon": 3.0, "max_grad_norm": 1.0, "delta": 1e-5}, min_sites=2)
        st = _wait(c, c.submit(spec))
        assert st.state == "completed", st.error
        assert st.epsilon <= 3.0 * 1.01


def test_bad_requests_name_the_problem(net_factory: Any) -> None:
    net = net_factory({"a": {}})
    with ControlClient(net.address) as c:
        with pytest.raises(InvalidSpecError, match="input_dim"):
            c.submit(_job(model={"kind": "linear", "input_dim": 30, "num_classes": 10}))
        with pytest.raises(NotFoundError, match="no registered site exposes dataset"):
            c.submit(_job(dataset="nope"))
        with pytest.raises(InvalidSpecError, match="rounds"):
            c.submit(json.dumps({**json.loads(_job()), "rounds": 0}))
        with pytest.raises(NotFoundError):
            c.job("job-doesnotexist")
        with pytest.raises(NotFoundError):
            c.download("job-doesnotexist")


def test_site_that_disappears_is_named_and_job_continues(net_factory: Any) -> None:
    net = net_factory({"a": {}, "b": {}, "c": {}})
    with ControlClient(net.address) as c:
        job_id = c.submit(_job(rounds=3, min_sites=2))
        for st in c.watch(job_id):
            if st.round >= 1:
                break
        net.stop_agent("c")
        st = _wait(c, job_id)
        assert st.state == "completed", st.error
        assert sorted(st.history[-1].site_ids) == ["a", "b"]
        assert any(e.site_id == "c" for e in st.events if e.level == "warning")


def test_large_model_travels_in_chunks(net_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.core import spool

    received: list[spool.Payload] = []
    original = spool.receive

    def receive(*args: Any, **kwargs: Any) -> spool.Payload:
        received.append(original(*args, **kwargs))
        return received[-1]

    monkeypatch.setattr(spool, "receive", receive)
    net = net_factory({"a": {}})
    # 64*2048 + 2048*640 + ... ≈ 1.5M parameters ≈ 6 MB: above gRPC's 4 MiB message limit.
    spec = _job(
        model={"kind": "mlp", "input_dim": 64, "num_classes": 10, "hidden": [2048, 640]},
        rounds=1,
        local_steps=1,
        min_sites=1,
    )
    with ControlClient(net.address) as c:
        st = _wait(c, c.submit(spec))
        assert st.state == "completed", st.error
        _, weights = c.download(st.job_id)
    assert len(weights) > 5_000_000
    # The model the site fetched and the update it sent both lay in spool files, which the
    # round closed once it was over (the site's empty admission answer came before them).
    received = [p for p in received if p.size > 0]
    assert [p.spooled for p in received] == [True, True]
    assert received[0].size > 5_000_000 and received[1].size == received[0].size
    for payload in received:
        with pytest.raises(NotFoundError, match="released"):
            payload.read_at(0, 1)
    assert list((net.root / "orch" / "spool").iterdir()) == []


def test_update_charges_match_dp_events(net_factory: Any, tmp_path: Path) -> None:
    net = net_factory({"a": {}})
    with ControlClient(net.address) as c:
        st = _wait(c, c.submit(_job(rounds=1, min_sites=1, metrics={"enabled": False})))
        assert st.state == "completed", st.error
    with Ledger(tmp_path / "a" / "state" / "ledger.sqlite") as led:
        evs = led.events("digits", job_id=st.job_id)
    assert evs == [DpEvent(noise_multiplier=1.0, sample_rate=evs[0].sample_rate, steps=6)]


def test_site_level_dp_is_applied_and_stated_on_the_card(net_factory: Any) -> None:
    net = net_factory({"a": {}, "b": {}, "c": {}})
    spec = _job(
        rounds=2,
        site_dp={
            "noise_multiplier": 0.8,
            "clip_norm": 0.5,
            "adaptive": True,
            "count_noise_multiplier": 1.0,
        },
    )
    with ControlClient(net.address) as c:
        st = _wait(c, c.submit(spec))
        assert st.state == "completed", st.error
        card = json.loads(c.download(st.job_id)[0])
    sl = card["site_level_dp"]
    expected = compute_epsilon([DpEvent(0.8, 1.0, 2)], delta=1e-5).epsilon
    assert sl["epsilon"] == pytest.approx(expected)
    assert sl["final_clip_norm"] != pytest.approx(0.5)  # adaptive clipping moved it
    assert "whole site" in sl["protects"]
    assert card["epsilon"] > 0  # the sample-level guarantee is still there


def test_adaptive_clipping_with_too_little_count_noise_fails_clearly(net_factory: Any) -> None:
    net = net_factory({"a": {}})
    spec = _job(
        min_sites=1, rounds=1, site_dp={"noise_multiplier": 1.0, "clip_norm": 1.0, "adaptive": True}
    )
    with ControlClient(net.address) as c:
        st = _wait(c, c.submit(spec))
    assert st.state == "failed" and "count_noise_multiplier" in st.error


def test_a_site_requiring_secure_noise_draws_all_its_noise_from_the_csprng(
    net_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.dp import noise

    draws: list[tuple[str, bool]] = []
    original = noise.gaussian_torch

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        draws.append((threading.current_thread().name, noise.secure_enabled()))
        return original(*args, **kwargs)

    monkeypatch.setattr(noise, "gaussian_torch", recording)
    net = net_factory({"a": {"secure_noise": True}, "b": {}, "c": {}})
    with ControlClient(net.address) as c:
        job_id = c.submit(_job(rounds=1))
        st = _wait(c, job_id)
        assert st.state == "completed", st.error
        card = json.loads(c.download(job_id)[0])
    # The card says which sites' noise came from the CSPRNG, and names the others in its limits.
    assert {s["site_id"]: s["noise_source"] for s in card["sites"]} == {
        "a": "csprng",
        "b": "standard",
        "c": "standard",
    }
    assert "Noise at b, c came from the standard" in card["limits"]
    # Site a drew every DP-SGD and metrics noise value securely, the others did not.
    assert {secure for _, secure in draws} == {True, False}
    secure_threads = {name for name, secure in draws if secure}
    assert secure_threads.isdisjoint({name for name, secure in draws if not secure})


def test_plan_epsilon_is_the_charged_epsilon_with_metrics_every_k_rounds(
    net_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # metrics.every = 2 over 3 rounds: metrics in rounds 2 and 3. The plan counts exactly
    # those releases, so its ε is the ε of what each site's ledger charged.
    net = net_factory({"a": {}, "b": {}})
    spec = _job(rounds=3, min_sites=2, local_steps=2, metrics={"every": 2})
    with ControlClient(net.address) as c:
        plan = c.plan(spec)
        st = _wait(c, c.submit(spec))
        assert st.state == "completed", st.error
    assert [h.metrics is not None for h in st.history] == [False, True, True]
    planned = {s.site_id: s.projected_epsilon for s in plan.sites}
    for sid in ("a", "b"):
        with Ledger(tmp_path / sid / "state" / "ledger.sqlite") as led:
            evs = led.events("digits", job_id=st.job_id)
        assert sorted(e.noise_multiplier for e in evs) == [1.0, 1.0, 1.0, 10.0, 10.0]
        charged = compute_epsilon(evs, delta=1e-5).epsilon
        assert planned[sid] == pytest.approx(charged, rel=1e-6)
    assert plan.epsilon == pytest.approx(st.epsilon, rel=1e-6)
    # What the CLI shows: the plan's metrics cost, every metric with its standard error.
    from orchestrator import cli as orch_cli

    job_file = tmp_path / "job.yaml"
    job_file.write_text(spec)
    server = ["--server", net.address, "--insecure"]
    capsys.readouterr()
    assert orch_cli.main(["plan", str(job_file), *server]) == 0
    assert (
        "metrics: released in 2 rounds (every 2 rounds and the last), σ=10"
        in capsys.readouterr().out
    )
    assert orch_cli.main(["status", st.job_id, *server]) == 0
    assert "±" in capsys.readouterr().out
    assert orch_cli.main(["evaluate", st.job_id, "-d", "digits", *server]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "pooled over ≈" in printed and "acc " in printed and " ± " in printed
