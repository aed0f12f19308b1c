"""A job spec's derived encoding: ``model.input_dim``/``num_classes`` filled from it."""

from __future__ import annotations

from typing import Any

import pytest

from common.domain import ColumnInfo
from common.errors import InvalidSpecError
from common.schema.encoding import derive_encoding, uniform_edges
from common.specs import JobSpec, model_dims, parse_job_spec
from common.training.models import build_model, count_spec_parameters

FEATURES = [
    ColumnInfo("income", "numeric", min=0.0, max=1000.0, nullable=True),
    ColumnInfo("home", "categorical", categories=("owner", "rent"), nullable=True),
]
LABEL = ColumnInfo("status", "categorical", categories=("good", "bad"), nullable=False)
ENCODING = derive_encoding(FEATURES, LABEL).to_dict()  # width 2 + 4 = 6, 2 classes


def _job(model: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "dataset": "credit",
        "model": model,
        "rounds": 2,
        "batch_size": 16,
        "dp": {"noise_multiplier": 1.0},
        **extra,
    }


def test_dimensions_may_be_left_out_until_the_encoding_is_derived() -> None:
    spec = parse_job_spec(_job({"kind": "mlp", "hidden": [8]}))
    assert spec.model.input_dim is None and not spec.encoding.derived
    with pytest.raises(InvalidSpecError, match="derives them"):
        model_dims(spec.model)
    with pytest.raises(InvalidSpecError, match="derives them"):
        build_model(spec.model)
    with pytest.raises(InvalidSpecError, match="no feature encoding"):
        spec.feature_encoding()


def test_a_derived_encoding_fills_the_dimensions() -> None:
    spec = parse_job_spec(_job({"kind": "linear"}, encoding=ENCODING))
    assert model_dims(spec.model) == (6, 2)
    assert count_spec_parameters(spec.model) == 6 * 2 + 2
    assert spec.feature_encoding().classes == ("good", "bad")
    again = JobSpec.model_validate_json(spec.model_dump_json())
    assert again == spec


@pytest.mark.parametrize("key, value, derived", [("input_dim", 5, 6), ("num_classes", 3, 2)])
def test_an_explicit_dimension_that_differs_names_both(key: str, value: int, derived: int) -> None:
    with pytest.raises(InvalidSpecError, match=f"model.{key}={value} .* {key}={derived}"):
        parse_job_spec(_job({"kind": "linear", key: value}, encoding=ENCODING))


def test_an_explicit_dimension_that_agrees_is_kept() -> None:
    spec = parse_job_spec(
        _job({"kind": "linear", "input_dim": 6, "num_classes": 2}, encoding=ENCODING)
    )
    assert model_dims(spec.model) == (6, 2)


def test_a_conv_shape_must_match_the_derived_width() -> None:
    conv = {"kind": "cnn1d", "input_shape": [2, 4], "conv": [{"channels": 2}]}
    with pytest.raises(InvalidSpecError, match="does not multiply"):
        parse_job_spec(_job(conv, encoding=ENCODING))
    conv["input_shape"] = [1, 6]
    assert model_dims(parse_job_spec(_job(conv, encoding=ENCODING)).model) == (6, 2)


def test_quantile_edges_must_be_released_before_training() -> None:
    enc = derive_encoding(
        FEATURES, LABEL, numeric="quantile", edges={"income": uniform_edges(0.0, 1000.0, 4)}
    ).to_dict()
    spec = parse_job_spec(_job({"kind": "linear"}, encoding={**enc, "bins": 4}))
    assert model_dims(spec.model) == (4 + 1 + 4, 2)
    with pytest.raises(InvalidSpecError, match="not been released"):
        spec.encoding.feature_encoding(require_edges=True)
    assert spec.feature_encoding().width == 9  # the placeholders have the right width
    released = parse_job_spec(
        _job({"kind": "linear"}, encoding={**enc, "bins": 4, "edges_released": True})
    )
    assert released.encoding.feature_encoding(require_edges=True).width == 9


def test_encoding_options_are_closed() -> None:
    with pytest.raises(InvalidSpecError, match=r"encoding\.scale"):
        parse_job_spec(_job({"kind": "linear"}, encoding={"scale": "log"}))
    with pytest.raises(InvalidSpecError, match=r"encoding\.numeric"):
        parse_job_spec(_job({"kind": "linear"}, encoding={"numeric": "log"}))
