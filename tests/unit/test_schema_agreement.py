"""The sites' declared schemas → one agreed schema, exclusions with reasons, and the plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.domain import ColumnInfo, DatasetInfo, PolicySummary, SiteRegistration, SiteStatus
from common.errors import InvalidSpecError
from common.specs import model_dims, parse_job_spec
from orchestrator.coordinator import Coordinator
from orchestrator.planning import job_events, plan_job, quantile_event
from orchestrator.schemas import agree, disagreement, job_disagreement, with_encoding
from orchestrator.training.kind import with_derived_encoding

INCOME = ColumnInfo("income", "numeric", min=0.0, max=1000.0)
HOME = ColumnInfo("home", "categorical", categories=("owner", "rent"))
STATUS = ColumnInfo("status", "categorical", categories=("good", "bad"), nullable=False)


def _ds(
    features: tuple[ColumnInfo, ...] = (INCOME, HOME),
    label: ColumnInfo | None = STATUS,
    columns: tuple[str, ...] | None = None,
) -> DatasetInfo:
    return DatasetInfo(
        name="credit",
        num_rows=500,
        columns=columns if columns is not None else tuple(c.name for c in features),
        label="status",
        schema=features,
        label_schema=label,
        max_epsilon=10.0,
        policy_delta=1e-5,
    )


def _job(**extra: Any) -> dict[str, Any]:
    return {
        "dataset": "credit",
        "model": {"kind": "linear"},
        "rounds": 2,
        "batch_size": 32,
        "dp": {"noise_multiplier": 1.0},
        **extra,
    }


def test_sites_that_agree_give_one_schema() -> None:
    a = agree("credit", [("b", _ds()), ("a", _ds(columns=("home", "income")))])
    assert a.sites == ("a", "b") and not a.excluded  # the column order does not matter
    assert {c.name for c in a.features} == {"income", "home"} and a.label == STATUS


@pytest.mark.parametrize(
    "odd, words",
    [
        (_ds(features=(INCOME.__class__("income", min=0.0, max=500.0), HOME)), "[0, 500]"),
        (
            _ds(features=(ColumnInfo("income", "categorical", categories=("x",)), HOME)),
            "categorical",
        ),
        (
            _ds(features=(INCOME, ColumnInfo("home", "categorical", categories=("rent", "owner")))),
            "[rent, owner]",
        ),
        (
            _ds(label=ColumnInfo("status", "categorical", categories=("bad", "good"))),
            "label 'status'",
        ),
        (_ds(features=(INCOME,)), "lacks the column(s) 'home'"),
        (
            _ds(features=(INCOME, HOME, ColumnInfo("age", min=18.0, max=99.0))),
            "'age' are not declared",
        ),
    ],
)
def test_a_site_that_disagrees_with_the_majority_is_excluded_with_the_difference(
    odd: DatasetInfo, words: str
) -> None:
    a = agree("credit", [("a", _ds()), ("b", _ds()), ("squatter", odd)])
    assert a.sites == ("a", "b")
    assert set(a.excluded) == {"squatter"}
    assert words in a.excluded["squatter"]
    assert "at a, b" in a.excluded["squatter"]


def test_a_tie_is_an_error_naming_both_sides() -> None:
    other = _ds(features=(ColumnInfo("income", min=0.0, max=10.0), HOME))
    with pytest.raises(InvalidSpecError, match=r"\{a\} versus \{b\}.*'income'"):
        agree("credit", [("a", _ds()), ("b", other)])


def test_incomplete_declarations_are_excluded_and_never_chosen() -> None:
    undeclared = _ds(features=(ColumnInfo("income"), HOME))  # numeric without bounds
    no_label = _ds(label=None)
    a = agree("credit", [("a", _ds()), ("b", undeclared), ("c", no_label)])
    assert a.sites == ("a",)
    assert "no type and bounds for the column(s) 'income'" in a.excluded["b"]
    assert "no classes for the label 'status'" in a.excluded["c"]
    with pytest.raises(InvalidSpecError, match=r"No site declares a schema.*at b.*at c"):
        agree("credit", [("b", undeclared), ("c", no_label)])


def test_with_encoding_derives_the_dimensions() -> None:
    a = agree("credit", [("a", _ds())])
    spec = with_encoding(parse_job_spec(_job()), a)
    assert model_dims(spec.model) == (2 + 4, 2)
    assert spec.feature_encoding().classes == ("good", "bad")
    assert disagreement(spec.feature_encoding(), _ds()) is None
    odd = _ds(features=(ColumnInfo("income", min=0.0, max=5.0), HOME))
    assert "'income'" in (job_disagreement(spec, odd) or "")


def test_an_explicit_input_dim_that_differs_names_both() -> None:
    a = agree("credit", [("a", _ds())])
    with pytest.raises(
        InvalidSpecError, match=r"model.input_dim=2, .* input_dim=6 \(income: 2, home: 4\)"
    ):
        with_encoding(parse_job_spec(_job(model={"kind": "linear", "input_dim": 2})), a)
    with pytest.raises(InvalidSpecError, match=r"num_classes=3.*num_classes=2"):
        with_encoding(parse_job_spec(_job(model={"kind": "linear", "num_classes": 3})), a)


def test_derived_features_may_not_come_from_the_data_scientist() -> None:
    a = agree("credit", [("a", _ds())])
    derived = with_encoding(parse_job_spec(_job()), a)
    with pytest.raises(InvalidSpecError, match="derived by the orchestrator"):
        with_encoding(derived, a)


POLICY = PolicySummary(
    max_epsilon=10.0,
    delta=1e-5,
    min_noise_multiplier=0.5,
    max_rounds=100,
    allowed_models=("linear", "mlp"),
    allow_exact_metrics=False,
    max_steps_per_task=0,
    max_parameters=0,
)


def _site(sid: str, ds: DatasetInfo, state: str = "idle") -> SiteStatus:
    return SiteStatus(sid, (ds,), 0.0, "0", state, POLICY)


def test_the_plan_shows_excluded_sites_with_their_reason() -> None:
    odd = _ds(features=(ColumnInfo("income", min=0.0, max=5.0), HOME))
    sites = [_site("a", _ds()), _site("b", _ds()), _site("c", odd)]
    a = agree("credit", [(s.site_id, s.datasets[0]) for s in sites])
    spec = with_encoding(parse_job_spec(_job()), a)
    plan = plan_job(spec, sites, excluded=a.excluded)
    rows = {r.site_id: r for r in plan.sites}
    assert plan.feasible and not rows["a"].would_refuse and not rows["b"].would_refuse
    assert rows["c"].would_refuse and rows["c"].reason.startswith("excluded from the job:")


def test_the_quantile_release_is_in_the_plan_and_in_the_calibration() -> None:
    a = agree("credit", [("a", _ds())])
    minmax = with_encoding(parse_job_spec(_job()), a)
    quant = with_encoding(
        parse_job_spec(
            _job(encoding={"numeric": "quantile", "bins": 4, "quantile_noise_multiplier": 3.0})
        ),
        a,
    )
    assert quantile_event(minmax) is None
    q = quantile_event(quant)
    assert q is not None and (q.noise_multiplier, q.sample_rate, q.steps) == (3.0, 1.0, 1)
    assert q in job_events(quant, noise_multiplier=1.0, sample_rate=0.1, steps=5, rounds=2)
    assert model_dims(quant.model) == (4 + 1 + 4, 2)
    sites = [_site("a", _ds())]
    eps_minmax = plan_job(minmax, sites).epsilon
    eps_quant = plan_job(quant, sites).epsilon
    assert eps_quant > eps_minmax
    # with a target ε, σ is calibrated with the quantile release counted: the target holds
    target = parse_job_spec(
        _job(
            dp={"target_epsilon": 3.0},
            encoding={"numeric": "quantile", "quantile_noise_multiplier": 5.0},
        )
    )
    plan = plan_job(with_encoding(target, a), sites)
    assert plan.epsilon == pytest.approx(3.0, rel=0.02)


def _registration(sid: str, ds: DatasetInfo) -> SiteRegistration:
    return SiteRegistration(sid, "0", (ds,), POLICY)


def test_offline_and_disabled_sites_never_block(tmp_path: Path) -> None:
    """A squatter that ties with the only honest site blocks nothing once it is disabled or
    offline: only online, enabled sites are counted (issue 17.7)."""
    odd = _ds(features=(ColumnInfo("income", min=0.0, max=5.0), HOME))
    coord = Coordinator(tmp_path / "orch", offline_after_s=30.0)
    try:
        coord.register(_registration("honest", _ds()))
        coord.register(_registration("squatter", odd))
        spec = parse_job_spec(_job())
        with pytest.raises(InvalidSpecError, match=r"\{honest\} versus \{squatter\}"):
            with_derived_encoding(spec, coord.sites(), coord.max_parameters)
        coord.set_site_enabled("squatter", False)
        derived, agreement = with_derived_encoding(spec, coord.sites(), coord.max_parameters)
        assert agreement.sites == ("honest",) and not agreement.excluded
        assert model_dims(derived.model) == (6, 2)
        coord.register(_registration("late", odd))
        coord.broker.disconnect("late")  # registered once, offline now
        _, agreement = with_derived_encoding(spec, coord.sites(), coord.max_parameters)
        assert agreement.sites == ("honest",) and "late" not in agreement.excluded
    finally:
        coord.stop()
