"""common.clustering.em_state: the settings every EM kind takes, and each K's run record."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from common.clustering.em_state import EmRun, settings_from_config
from common.clustering.federated_em import FederatedBIC, FederatedEM, machine_from_state
from common.clustering.model import GaussianMixtureParams
from common.clustering.statistics import SufficientStats
from common.errors import InvalidSpecError

SETTINGS: dict[str, Any] = {
    "covariance_type": "diag",
    "bounds": [[-1.0, 1.0], [0.0, 4.0]],
    "max_rounds": 5,
    "tol": 1e-3,
    "noise_multiplier": 2.0,
    "seed": 3,
}


def test_both_kinds_take_the_same_settings_and_checkpoint_them() -> None:
    for machine in (
        FederatedEM(K=2, **SETTINGS, min_rounds=2),
        FederatedBIC(k_values=[1, 3], z=1.0, **SETTINGS, average_last=2),
    ):
        machine.initial_request()
        state = json.loads(json.dumps(machine.state_dict()))
        again = machine_from_state(state)
        assert type(again) is type(machine)
        assert again.state_dict() == state
        assert settings_from_config(state["config"])["noise_multiplier"] == 2.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_rouds": 5}, "unknown max_rouds"),
        ({"seed": None}, "missing seed"),
    ],
)
def test_a_missing_or_misspelt_setting_is_a_type_error(
    change: dict[str, Any], message: str
) -> None:
    settings = {k: v for k, v in {**SETTINGS, **change}.items() if v is not None}
    with pytest.raises(TypeError, match=message):
        FederatedEM(K=2, **settings)


def test_a_bad_setting_value_is_an_invalid_spec() -> None:
    with pytest.raises(InvalidSpecError, match="covariance_type"):
        FederatedEM(K=2, **{**SETTINGS, "covariance_type": "tied"})
    with pytest.raises(InvalidSpecError, match="Not a mixture checkpoint"):
        machine_from_state({"version": 1, "class": "FederatedEM", "config": {}})


def test_a_run_record_round_trips_through_json() -> None:
    rng = np.random.default_rng(0)
    params = GaussianMixtureParams(
        weights=np.array([0.25, 0.75]),
        means=rng.uniform(-0.5, 0.5, (2, 2)),
        covariances=np.array([[0.1, 0.2], [0.3, 0.1]]),
        covariance_type="diag",
    )
    stats = SufficientStats(
        nk=np.array([3.0, 5.0]),
        s1=rng.normal(size=(2, 2)),
        s2=np.abs(rng.normal(size=(2, 2))),
        loglik=-7.5,
        loglik_range=(-20.0, 5.0),
    )
    run = EmRun(
        2,
        params=params,
        history=[-10.0, -9.5],
        history_sd=[0.5, 0.5],
        n_hat=[8.0],
        stats=[stats],
        count_sd=[1.0],
        model_sd=[0.1],
        stop_reason="converged",
        sent={"weights": [0.25, 0.75]},
        final_loglik=(-9.0, 0.4),
    )
    again = EmRun.from_dict(json.loads(json.dumps(run.to_dict())))
    assert again.to_dict() == run.to_dict()
    assert again.final_loglik == (-9.0, 0.4) and again.rounds == 1 and again.key == "K=2"
    assert (again.history, again.history_sd, again.n_hat) == (run.history, run.history_sd, [8.0])
    assert (again.count_sd, again.model_sd, again.sent) == ([1.0], [0.1], run.sent)
    assert again.params is not None and np.array_equal(again.params.means, params.means)
    assert np.array_equal(again.stats[0].s2, stats.s2) and again.stats[0].loglik == -7.5
