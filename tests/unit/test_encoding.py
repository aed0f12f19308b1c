"""The feature encoding derived from declared schemas (``common.schema.encoding``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.domain import ColumnInfo
from common.errors import InvalidSpecError
from common.schema.encoding import (
    EncodedFeature,
    FeatureEncoding,
    derive_encoding,
    uniform_edges,
)
from common.schema.table import TypedTable, apply_schema

INCOME = ColumnInfo("income", "numeric", min=0.0, max=1000.0, nullable=True)
AGE = ColumnInfo("age", "numeric", min=18.0, max=98.0, nullable=False)
HOME = ColumnInfo("home", "categorical", categories=("owner", "rent", "parents"), nullable=True)
STATUS = ColumnInfo("status", "categorical", categories=("good", "bad"), nullable=False)


def _table(**cols: list[float] | list[int]) -> TypedTable:
    arrays = {
        k: np.asarray(v, dtype=np.int64 if k == "home" else np.float64) for k, v in cols.items()
    }
    n = len(next(iter(arrays.values())))
    return TypedTable(columns=arrays, num_rows=n)  # type: ignore[arg-type]


def test_widths_and_slot_names() -> None:
    enc = derive_encoding([INCOME, AGE, HOME], STATUS)
    # income: value + missing indicator; age: value only; home: 3 + other + missing
    assert enc.width == 2 + 1 + 5
    assert enc.slot_names() == [
        "income",
        "income:missing",
        "age",
        "home=owner",
        "home=rent",
        "home=parents",
        "home:other",
        "home:missing",
    ]
    assert enc.classes == ("good", "bad") and enc.num_classes == 2
    assert enc.feature_schema() == (INCOME, AGE, HOME)
    assert enc.label_schema() == STATUS


def test_minmax_scales_clips_and_flags_missing() -> None:
    enc = derive_encoding([INCOME, AGE], STATUS)
    x = enc.encode(
        _table(income=[0.0, 500.0, 1000.0, np.nan, 5e37], age=[18.0, 58.0, 98.0, 0.0, np.nan])
    )
    assert x.dtype == np.float32 and x.shape == (5, 3)
    np.testing.assert_allclose(x[:, 0], [0.0, 0.5, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(x[:, 1], [0, 0, 0, 1, 0])  # income's missing indicator
    # age is not nullable: out of bounds clipped, a missing cell encodes as the minimum
    np.testing.assert_allclose(x[:, 2], [0.0, 0.5, 1.0, 0.0, 0.0])


def test_one_hot_has_other_and_missing_slots() -> None:
    enc = derive_encoding([HOME], STATUS)
    # codes: 0..2 declared, 3 = other, -1 = missing; anything else counts as other
    x = enc.encode(_table(home=[0, 2, 3, -1, 99, -7]))
    expected = np.zeros((6, 5), dtype=np.float32)
    for row, slot in enumerate([0, 2, 3, 4, 3, 3]):
        expected[row, slot] = 1.0
    np.testing.assert_array_equal(x, expected)


def test_encoding_of_raw_rows_through_the_schema() -> None:
    frame = pd.DataFrame(
        {
            "income": ["250", "", "abc", "1e400"],
            "age": ["38", "NA", "-inf", "200"],
            "home": ["rent", "", "castle", "owner"],
            "status": ["good", "bad", "", "good"],
        }
    )
    enc = derive_encoding([INCOME, AGE, HOME], STATUS)
    x = enc.encode(apply_schema(frame, enc.feature_schema()))
    np.testing.assert_allclose(x[:, 0], [0.25, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(x[:, 1], [0, 1, 1, 0])
    np.testing.assert_allclose(x[:, 2], [0.25, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(x[:, 3:].argmax(axis=1), [1, 4, 3, 0])
    assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0


def test_piecewise_linear_quantile_encoding() -> None:
    """Gorishniy et al. 2022, eq. (1): bins below x are 1, the bin holding x is fractional."""
    edges = (0.0, 100.0, 300.0, 1000.0)
    enc = derive_encoding([INCOME], STATUS, numeric="quantile", edges={"income": edges})
    assert enc.width == 3 + 1
    x = enc.encode(_table(income=[0.0, 50.0, 100.0, 200.0, 650.0, 1000.0, np.nan]))
    expected = np.array(
        [
            [0, 0, 0],
            [0.5, 0, 0],
            [1, 0, 0],
            [1, 0.5, 0],
            [1, 1, 0.5],
            [1, 1, 1],
            [0, 0, 0],
        ],
        dtype=np.float64,
    )
    np.testing.assert_allclose(x[:, :3].astype(np.float64), expected)
    np.testing.assert_array_equal(x[:, 3], [0, 0, 0, 0, 0, 0, 1])


def test_round_trip_to_and_from_dict() -> None:
    enc = derive_encoding(
        [INCOME, AGE, HOME],
        STATUS,
        numeric="quantile",
        edges={"income": uniform_edges(0.0, 1000.0, 4), "age": (18.0, 30.0, 98.0)},
    )
    again = FeatureEncoding.from_dict(enc.to_dict())
    assert again == enc
    assert again.width == enc.width


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(extra=1), "unknown key"),
        (lambda d: d["features"][0].update(edges=[0.0, 500.0, 900.0]), "run from its min"),
        (lambda d: d["features"][0].update(edges=[0.0, 10.0, 5.0, 1000.0]), "strictly increasing"),
        (lambda d: d["features"][0].update(min=float("nan")), "finite"),
        (lambda d: d["features"][0].update(colour="red"), "unknown key"),
        (lambda d: d["features"][2].update(categories=["a", "a"]), "twice"),
        (lambda d: d["label"].update(classes=["only"]), "at least two"),
        (lambda d: d.update(numeric="log"), "Unknown numeric encoding"),
        (lambda d: d["features"].append(dict(d["features"][0])), "more than once"),
    ],
)
def test_from_dict_refuses_malformed_encodings(mutate: object, message: str) -> None:
    d = derive_encoding([INCOME, AGE, HOME], STATUS).to_dict()
    mutate(d)  # type: ignore[operator]
    with pytest.raises(InvalidSpecError, match=message):
        FeatureEncoding.from_dict(d)


def test_derive_needs_bounds_and_a_categorical_label() -> None:
    with pytest.raises(InvalidSpecError, match="no declared bounds"):
        derive_encoding([ColumnInfo("x", "numeric")], STATUS)
    with pytest.raises(InvalidSpecError, match="categorical"):
        derive_encoding([INCOME], ColumnInfo("y", "numeric", min=0.0, max=1.0))
    with pytest.raises(InvalidSpecError, match="no bin edges"):
        derive_encoding([INCOME], STATUS, numeric="quantile")
    with pytest.raises(InvalidSpecError, match="cannot also be a feature"):
        derive_encoding([INCOME, ColumnInfo("status", "numeric", min=0.0, max=1.0)], STATUS)


def test_a_constant_column_encodes_as_zero() -> None:
    enc = EncodedFeature(ColumnInfo("c", "numeric", min=3.0, max=3.0, nullable=False))
    np.testing.assert_array_equal(enc.encode(np.array([3.0, np.nan, 7.0])), [[0.0], [0.0], [0.0]])


def test_encode_names_an_absent_column() -> None:
    enc = derive_encoding([INCOME, AGE], STATUS)
    with pytest.raises(InvalidSpecError, match="'age'"):
        enc.encode(_table(income=[1.0]))


def test_uniform_edges_are_exact_at_the_ends() -> None:
    e = uniform_edges(-1.0, 3.0, 4)
    assert e == (-1.0, 0.0, 1.0, 2.0, 3.0)
