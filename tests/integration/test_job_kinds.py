"""The contract every registered job kind passes (``orchestrator.jobs.kinds``), as
dp-accounting's accountants share one test base: a job of the kind ends recorded as a job of
that kind; what it released is charged to the job ledger (every site on its card has charges,
and the card's ε is the ledger's); every ε is finite; and an ended job is never run again
(starting it again changes nothing). A kind with no recipe below fails
``test_every_kind_has_a_recipe``."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits

from orchestrator.client import ControlClient
from orchestrator.coordinator import Coordinator
from orchestrator.jobs.accounting import JobAccount
from orchestrator.jobs.kinds import KINDS, kind_named, kind_of_spec
from orchestrator.server import RunningServer
from tests.integration.test_gmm_job import ONE_SHOT_SPEC, _federation
from tests.integration.test_grpc_job import Net, _job, _start, _wait

# A recipe runs one job of its kind on a small federation; returns the job's id.
Recipe = Callable[[ControlClient], str]


def _train(c: ControlClient) -> str:
    return str(_wait(c, c.submit(_job(rounds=1, min_sites=2, local_steps=3))).job_id)


def _evaluate(c: ControlClient) -> str:
    model = _train(c)
    c.evaluate(model, dataset="digits", noise_multiplier=5.0, timeout_s=60)
    (ev,) = [j for j in c.jobs() if j.job_id.startswith(f"eval-{model}")]
    return ev.job_id


def _gmm(c: ControlClient) -> str:
    return str(_wait(c, c.submit(json.dumps(ONE_SHOT_SPEC))).job_id)


def _synth(c: ControlClient) -> str:
    before = {j.job_id for j in c.jobs()}
    c.synthesize("pts", epsilon=2.0, rows=50, columns=("x1", "x2"), timeout_s=60)
    (job,) = [j for j in c.jobs() if j.job_id not in before]
    return job.job_id


RECIPES: dict[str, tuple[str, Recipe]] = {
    "train": ("digits", _train),
    "evaluate": ("digits", _evaluate),
    "gmm": ("pts", _gmm),
    "synth": ("pts", _synth),
}


def test_every_kind_has_a_recipe() -> None:
    assert set(RECIPES) == set(KINDS)
    for name, kind in KINDS.items():
        assert kind.name == name and kind_named(name) is kind
        assert kind_of_spec(json.dumps({"kind": name})) is kind
        if kind.runner is not None:  # a submitted kind: prepared, and it releases a file
            assert kind.prepare is not None and kind.released_file
            assert "{path" in kind.load_hint


@pytest.fixture(scope="module")
def federations(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, tuple[ControlClient, Coordinator]]]:
    """A digits federation (two sites) and a mixture one (three sites holding ``pts``)."""
    x, y = load_digits(return_X_y=True)
    digits = (x / 16.0).astype(np.float32), y.astype(np.int64)
    net: Net = _start(tmp_path_factory.mktemp("digits"), digits, {"a": {}, "b": {}})
    servers: list[RunningServer] = []
    with (
        ControlClient(net.address) as c,
        _federation(
            tmp_path_factory.mktemp("pts"), {"max_epsilon": 50.0, "delta": 1e-5}, servers
        ) as g,
    ):
        yield {
            "digits": (c, net.server.coordinator),
            "pts": (g, servers[-1].coordinator),
        }
    for sid, a in net.agents.items():
        a.stop()
        net.threads[sid].join(timeout=30)
    net.server.stop(0.5)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_job_of_every_kind_is_charged_finite_and_never_run_again(
    name: str, federations: dict[str, tuple[ControlClient, Coordinator]]
) -> None:
    kind = KINDS[name]
    where, recipe = RECIPES[name]
    c, coord = federations[where]
    job_id = recipe(c)
    st = c.job(job_id)
    assert st.state == "completed", st.error
    assert kind_of_spec(st.job_spec_json) is kind

    # Charged: the job ledger holds every site of the job, each with a finite ε > 0, and the
    # job's ε is theirs (the maximum over sites).
    charges = coord.store.charges(job_id)
    ledger_sites = {r.site_id for r in charges}
    assert ledger_sites and {s.site_id for s in st.sites} == ledger_sites
    exact = JobAccount.of_rows(charges, job_id=job_id, delta=st.delta).exact()
    for s in st.sites:
        assert math.isfinite(s.epsilon) and s.epsilon > 0
        assert s.epsilon == pytest.approx(exact.per_site[s.site_id].epsilon, rel=1e-9)
    assert math.isfinite(st.epsilon) and st.epsilon == pytest.approx(exact.epsilon, rel=1e-9)

    if kind.released_file is not None:
        card_json, artefact = c.download(job_id)
        card: dict[str, Any] = json.loads(card_json)
        assert artefact and card["kind"] == name and card["job_id"] == job_id
        # What was released was charged before it was released: every site on the card is
        # in the job ledger, and the card states the ledger's ε.
        assert {s["site_id"] for s in card["sites"]} <= ledger_sites
        assert card["epsilon"] == pytest.approx(exact.epsilon, rel=1e-9)
        assert all(math.isfinite(s["epsilon"]) and s["events"] for s in card["sites"])
        for field in ("delta", "accountant", "guarantee", "limits", "privacy_unit"):
            assert card[field]
    else:
        with pytest.raises(Exception, match="no model"):
            coord.model_files(job_id)

    # Never run again: an ended job's runner returns at once and records nothing; a
    # one-shot release has no runner at all.
    if kind.runner is not None:
        runner = kind.runner()(
            job_id=job_id,
            store=coord.store,
            broker=coord.broker,
            on_change=lambda _: None,
            stopping=threading.Event(),
        )
        runner.run()
    else:
        coord._start_runner(job_id)
        assert job_id not in coord._runners
    assert len(coord.store.charges(job_id)) == len(charges)
    assert coord.store.job(job_id).state == "completed"
