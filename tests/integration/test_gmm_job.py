"""Mixture jobs (kind: gmm) through gRPC: federated DP EM, K by distributed BIC, pull,
bootstrap standard errors, and resuming after an orchestrator restart."""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from common.clustering.federated_em import (
    FederatedBIC,
    FederatedEM,
    machine_from_state,
    request_events,
)
from common.clustering.released import load_mixture
from common.dp.accounting import compute_epsilon
from common.dp.events import DpEvent
from common.errors import InvalidSpecError
from orchestrator.client import ControlClient
from orchestrator.core.store import Store
from orchestrator.server import RunningServer, start_server
from site_agent.boundary.ledger import Ledger
from site_agent.gmm_stats import answer_request, request_cost
from tests.integration.sites import start_agents, stop_agents, wait_online, write_site

MEANS = np.array([[-3.0, -3.0], [0.0, 3.0], [3.0, -2.0]])
SD = 0.6


BIC_SPEC = {
    "kind": "gmm",
    "dataset": "pts",
    "k_range": [2, 4],
    "covariance_type": "full",
    "max_rounds": 10,
    "dp": {"target_epsilon": 3.0, "delta": 1e-5},
    "min_sites": 3,
    "seed": 1,
}
ONE_SHOT_SPEC = {
    "kind": "gmm",
    "dataset": "pts",
    "k": 3,
    "method": "one_shot",
    "covariance_type": "full",
    "max_rounds": 10,
    "dp": {"target_epsilon": 3.0, "delta": 1e-5},
    "min_sites": 3,
    "seed": 1,
}


def _data(n: int = 30000) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Rows, component labels, and an uneven split over three sites that see the clusters
    in different proportions."""
    rng = np.random.default_rng(0)
    comp = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    x = MEANS[comp] + rng.normal(0, SD, size=(n, 2))
    order = np.argsort(comp + rng.random(n) * 1.5)
    return x, comp, np.split(order, [n // 2, n * 8 // 10])


@contextmanager
def _federation(
    tmp_path: Path, policy: dict[str, Any], servers: list[RunningServer] | None = None
) -> Iterator[ControlClient]:
    """An orchestrator and three agents on loopback, each holding a CSV share of ``_data``.

    ``servers`` receives the orchestrator; a test that replaces it (same port and state dir)
    appends the new one, and the last one is stopped at the end."""
    x, _, parts = _data()
    live = servers if servers is not None else []
    live.append(
        start_server(listen="127.0.0.1:0", state_dir=tmp_path / "orch", offline_after_s=5.0)
    )
    server = live[0]
    pts = {
        "name": "pts",
        "path": "pts.csv",
        "label": "y",
        "chunk_rows": 1000,
        "columns": {"x1": {"min": -6, "max": 6}, "x2": {"min": -6, "max": 6}},
    }
    configs = {}
    for sid, idx in zip(("a", "b", "c"), parts, strict=True):
        (tmp_path / sid).mkdir()
        rows = np.column_stack([x[idx], np.zeros(len(idx))])
        np.savetxt(
            tmp_path / sid / "pts.csv",
            rows,
            delimiter=",",
            header="x1,x2,y",
            comments="",
            fmt="%.5f",
        )
        configs[sid] = write_site(
            tmp_path, sid, orchestrator=f"127.0.0.1:{server.port}", datasets=[pts], policy=policy
        )
    agents, threads = start_agents(configs)
    try:
        with ControlClient(server.address) as c:
            wait_online(c, 3)
            yield c
    finally:
        stop_agents(agents, threads)
        live[-1].stop(0.5)


def _run_job(c: ControlClient, spec: dict[str, Any]) -> tuple[str, dict[str, Any], bytes]:
    job_id = c.submit(json.dumps(spec))
    last = None
    for st in c.watch(job_id):
        last = st
    assert last is not None and last.state == "completed", last and last.error
    card_json, weights = c.download(job_id)
    return job_id, json.loads(card_json), weights


def _pull(tmp_path: Path, name: str, weights: bytes) -> Any:
    out = tmp_path / name
    out.mkdir()
    (out / "mixture.json").write_bytes(weights)
    return load_mixture(out)


@pytest.mark.parametrize("spec", [BIC_SPEC, ONE_SHOT_SPEC], ids=["federated-em-bic", "one-shot"])
def test_federated_dp_em_recovers_the_components_and_bic_picks_k(
    tmp_path: Path, spec: dict[str, object]
) -> None:
    with _federation(tmp_path, {"max_epsilon": 20.0, "delta": 1e-5}) as c:
        job_id, card, weights = _run_job(c, spec)
    assert card["kind"] == "gmm"
    if "k_range" in spec:
        sel = card["model_selection"]
        assert set(sel["bic"]) == set(sel["bic_sd"]) == {"2", "3", "4"}
        # What select_k_by_bic promises: the smallest K whose BIC is within z sds of the
        # minimum. With three true components it keeps K=4 only when the DP noise makes K=4
        # look better by more than that, which happens at a fixed rate: 1.0% at this ε (4 of
        # 400 runs of this machine against in-process sites, noise from seeded generators;
        # the loss each fit owes to the noise sat within noise_loglik_loss's prediction, z
        # mean 0.07, sd 0.87), 2-3% at ε = 10-16 and 1 in 1350 at ε = 30: the heavy tail of
        # the smallest component's loss, not the 62-nat BIC penalty, decides. So the test
        # checks the rule on the card's own numbers and that K=2 is never chosen (BIC ~2.7e4
        # above; its margin was ≥ 5.5 sds in every run, 2 would do), and below, that the
        # chosen model holds the three components (in all 2140 simulated runs, K=4 too).
        bic = {int(k): v for k, v in sel["bic"].items()}
        sd = {int(k): v for k, v in sel["bic_sd"].items()}
        z = inspect.signature(FederatedBIC).parameters["z"].default
        best = min(bic, key=lambda k: (bic[k], k))
        within = [k for k in sorted(bic) if bic[k] <= bic[best] + z * math.hypot(sd[k], sd[best])]
        assert sel["chosen_k"] == within[0] == card["model"]["K"] and sel["chosen_k"] >= 3, sel
    else:
        assert card["model"]["K"] == 3
        assert card["method"].startswith("one-shot")
    assert card["epsilon"] <= 3.0 * 1.01
    assert "uncertainty" not in card
    assert {s["noise_source"] for s in card["sites"]} == {"standard"}
    assert "Noise at a, b, c came from the standard" in card["limits"]
    mix = _pull(tmp_path, "pulled", weights)
    assert mix.standard_errors is None
    cost = np.linalg.norm(MEANS[:, None, :] - np.asarray(mix.means)[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(cost)
    assert cost[rows, cols].max() < 0.5, np.asarray(mix.means)
    pred = mix.predict(MEANS + 0.01)
    assert len(set(pred.tolist())) == 3
    # every site charged the releases to its ledger; the card's ε is what one site composed
    with Ledger(tmp_path / "a" / "state" / "ledger.sqlite") as led:
        kinds = [e.kind for e in led.entries(dataset="pts", job_id=job_id)]
    assert kinds and set(kinds) == {"gmm"}


def test_bootstrap_standard_errors_match_the_sampling_error_and_are_charged(
    tmp_path: Path,
) -> None:
    """At high ε (tiny bootstrap noise) the standard error of each component mean is the
    analytic σ_k/√n_k within a factor 2; the bootstrap release is on every site's ledger and
    in the card's ε (larger than without it); one-shot jobs get standard errors too."""
    em_spec = {
        "kind": "gmm",
        "dataset": "pts",
        "k": 3,
        "max_rounds": 8,
        "dp": {"noise_multiplier": 0.5, "delta": 1e-5},
        "bootstrap": {"replicates": 30, "weight_cap": 4, "noise_multiplier": 0.05},
        "min_sites": 3,
        "seed": 2,
    }
    one_shot = {**ONE_SHOT_SPEC, "dp": {"noise_multiplier": 2.0}, "bootstrap": {"replicates": 10}}
    policy = {"max_epsilon": 1000.0, "delta": 1e-5, "min_noise_multiplier": 0.01}
    with _federation(tmp_path, policy) as c:
        # A target ε the bootstrap release alone exceeds is refused at submission, with no
        # job created and nothing charged.
        unreachable = {
            **em_spec,
            "dp": {"target_epsilon": 1.0, "delta": 1e-5},
            "bootstrap": {"replicates": 10, "noise_multiplier": 0.05},
        }
        with pytest.raises(InvalidSpecError, match="target_epsilon=1 cannot be met"):
            c.submit(json.dumps(unreachable))
        assert c.jobs() == []
        job_id, card, weights = _run_job(c, em_spec)
        os_id, os_card, os_weights = _run_job(c, one_shot)

    # --- standard errors against the sampling error of a component mean
    mix = _pull(tmp_path, "em", weights)
    se = mix.standard_errors
    assert se is not None and se.replicates == 30 and se.weight_cap == 4
    assert se.to_dict()["includes_dp_noise"] is True and "noise" in se.note
    _, comp, _ = _data()
    order = [int(np.argmin(np.linalg.norm(np.asarray(mix.means) - m, axis=1))) for m in MEANS]
    assert sorted(order) == [0, 1, 2]
    analytic = SD / np.sqrt(np.bincount(comp, minlength=3))
    ratio = np.asarray(se.means)[order] / analytic[:, None]
    assert np.all((ratio > 0.5) & (ratio < 2.0)), ratio
    assert np.asarray(se.weights).shape == (3,) and np.asarray(se.variances).shape == (3, 2)

    # --- the card: ε includes the bootstrap release, and says what the numbers mean
    boot = DpEvent(0.05, 1.0, 1)
    events = [DpEvent(**e) for e in card["sites"][0]["events"]]
    assert events[-1] == boot
    assert card["epsilon"] == pytest.approx(compute_epsilon(events, delta=1e-5).epsilon)
    unc = card["uncertainty"]
    assert unc["replicates"] == 30 and unc["noise_multiplier"] == 0.05
    assert card["epsilon"] > 2 * unc["epsilon_without_bootstrap"]
    assert unc["epsilon_without_bootstrap"] == pytest.approx(
        compute_epsilon(events[:-1], delta=1e-5).epsilon
    )
    assert "bootstrap" in card["guarantee"]
    for sid in ("a", "b", "c"):  # charged at every site, write-ahead, like every release
        with Ledger(tmp_path / sid / "state" / "ledger.sqlite") as led:
            charged = [e.event for e in led.entries(dataset="pts", job_id=job_id)]
        assert boot in charged
        assert compute_epsilon(charged, delta=1e-5).epsilon == pytest.approx(
            card["epsilon"], rel=1e-6
        )

    # --- one-shot: the merged model is bootstrapped the same way, at the job's σ
    os_mix = _pull(tmp_path, "one_shot", os_weights)
    assert os_mix.standard_errors is not None and os_mix.standard_errors.replicates == 10
    assert os_card["uncertainty"]["noise_multiplier"] == 2.0
    assert os_card["epsilon"] > os_card["uncertainty"]["epsilon_without_bootstrap"]
    os_events = [DpEvent(**e) for e in os_card["sites"][0]["events"]]
    assert os_events[-1] == DpEvent(2.0, 1.0, 1)
    with Ledger(tmp_path / "a" / "state" / "ledger.sqlite") as led:
        os_charged = [e.event for e in led.entries(dataset="pts", job_id=os_id)]
    assert DpEvent(2.0, 1.0, 1) in os_charged


def test_em_checkpoint_round_trips_and_continues_identically() -> None:
    """A machine rebuilt from its JSON checkpoint after every round sends the same requests
    and ends with the same model and BIC as one that never stopped; requests are priced as
    the sites price them."""
    x, _, parts = _data(6000)
    sites = [x[idx] for idx in parts]
    bounds = [[-6.0, 6.0], [-6.0, 6.0]]
    for make in (
        lambda: FederatedEM(
            K=3, covariance_type="full", bounds=bounds, max_rounds=6, tol=1e-3,
            noise_multiplier=1.0, seed=5,
        ),
        lambda: FederatedBIC(
            k_values=[2, 3], covariance_type="diag", bounds=bounds, max_rounds=6, tol=1e-3,
            noise_multiplier=1.0, seed=5,
        ),
    ):  # fmt: skip
        straight, resumed = make(), make()
        req: dict[str, Any] | None = straight.initial_request()
        resumed.initial_request()
        rng = np.random.default_rng(1)
        while req is not None:
            resumed = machine_from_state(json.loads(json.dumps(resumed.state_dict())))
            assert json.dumps(resumed.pending_request) == json.dumps(req)
            assert request_events(req) == [request_cost(req)]
            results = [json.loads(json.dumps(answer_request(req, [s], rng=rng)[0])) for s in sites]
            req = straight.absorb(results)
            resumed.absorb(results)
        assert resumed.finished and resumed.privacy_events == straight.privacy_events
        assert np.array_equal(resumed.result().means, straight.result().means)
        if isinstance(straight, FederatedBIC):
            assert isinstance(resumed, FederatedBIC)
            assert resumed.bic_curve == straight.bic_curve


def test_gmm_job_resumes_after_an_orchestrator_restart(tmp_path: Path) -> None:
    """Stop the orchestrator mid-job and start a new one on the same state dir: the job
    resumes from its checkpoint (same seed, even one drawn from the clock), is not started
    over (each site's ledger holds at most the committed rounds plus the interrupted one),
    completes, and its card's ε covers every charge in every site's ledger."""
    spec: dict[str, Any] = {**BIC_SPEC, "k_range": [2, 3], "max_rounds": 8}
    del spec["seed"]  # drawn from the clock: the checkpoint must keep it
    servers: list[RunningServer] = []
    state_dir = tmp_path / "orch"
    with _federation(tmp_path, {"max_epsilon": 20.0, "delta": 1e-5}, servers) as c:
        job_id = c.submit(json.dumps(spec))
        for st in c.watch(job_id):
            assert not st.terminal, st.error
            if st.round >= 2:  # init and one EM round committed: stop mid-job
                break
        port = servers[0].port
        servers[0].stop(0.5)
        store = Store(state_dir)
        saved = store.gmm_state(job_id)
        store.close()
        assert saved is not None
        before = json.loads(saved.checkpoint)
        assert before["round"] >= 2 and before["phase"] == "fit"
        servers.append(
            start_server(listen=f"127.0.0.1:{port}", state_dir=state_dir, offline_after_s=5.0)
        )
        last = None
        for st in c.watch(job_id):
            last = st
        assert last is not None and last.state == "completed", last and last.error
        card = json.loads(c.download(job_id)[0])
    messages = [e.message for e in last.events]
    assert any(m.startswith(f"resuming after round {before['round']}") for m in messages)
    store = Store(state_dir)
    saved = store.gmm_state(job_id)
    store.close()
    assert saved is not None
    after = json.loads(saved.checkpoint)
    assert after["machine"]["config"]["seed"] == before["machine"]["config"]["seed"]
    assert after["phase"] == "release" and after["round"] == card["rounds"]
    assert card["model_selection"]["chosen_k"] in (2, 3) and card["model"]["K"] in (2, 3)

    rounds = card["rounds"]  # committed rounds: init, EM rounds, eval
    by_site = {s["site_id"]: s for s in card["sites"]}
    assert set(by_site) == {"a", "b", "c"}
    assert card["epsilon"] == pytest.approx(max(s["epsilon"] for s in card["sites"]))
    for sid in ("a", "b", "c"):
        with Ledger(tmp_path / sid / "state" / "ledger.sqlite") as led:
            entries = led.entries(dataset="pts", job_id=job_id)
        charged = [e.event for e in entries]
        assert {e.kind for e in entries} == {"gmm"}
        # Not started over: only the interrupted round can have been charged twice.
        assert rounds <= len(charged) <= rounds + 1 < 2 * rounds
        # The card counts every release the site was sent, so never less than its ledger.
        assert len(by_site[sid]["events"]) >= len(charged)
        ledger_eps = compute_epsilon(charged, delta=1e-5).epsilon
        assert by_site[sid]["epsilon"] >= ledger_eps * (1 - 1e-9)
        assert card["epsilon"] >= ledger_eps * (1 - 1e-9)
