"""apply_schema: every cell typed and bounded, silently, by the same rule for every row."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.domain import ColumnInfo
from common.errors import InvalidSpecError
from common.schema.table import FLOAT32_MAX, MISSING_CODE, TypedTable, apply_schema

AMOUNT = ColumnInfo("amount", "numeric", 0.0, 300_000.0)
HOME = ColumnInfo("home", "categorical", categories=("owner", "rent", "NA"))
LABEL = ColumnInfo("status", "categorical", categories=("good", "bad"))


def test_numeric_cells_are_clipped_and_missing_is_nan() -> None:
    cells = ["12.5", " 7 ", "-3", "1e400", "-inf", "inf", "", "NA", "NaN", "null", "x1", "1,5"]
    table = apply_schema(pd.DataFrame({"amount": cells}), [AMOUNT])
    got = table.columns["amount"]
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got[:6], [12.5, 7.0, 0.0, 300_000.0, 0.0, 300_000.0])
    assert np.isnan(got[6:]).all()


def test_numeric_without_bounds_stays_within_float32() -> None:
    frame = pd.DataFrame({"v": ["1e38", "-1e39", "1e300", "5"]})
    got = apply_schema(frame, [ColumnInfo("v", "numeric")]).columns["v"]
    np.testing.assert_array_equal(got, [1e38, -FLOAT32_MAX, FLOAT32_MAX, 5.0])
    assert np.isfinite(got.astype(np.float32)).all()


def test_categorical_codes_other_and_missing() -> None:
    cells = ["owner", " rent", "NA", "", "None", "castle", "OWNER", None]
    codes = apply_schema(pd.DataFrame({"home": cells}), [HOME]).columns["home"]
    # "NA" is a declared category here, so it is not missing; "None" and empty are.
    assert codes.tolist() == [0, 1, 2, MISSING_CODE, MISSING_CODE, 3, 3, MISSING_CODE]


def test_numbers_match_numeric_categories_from_typed_sources() -> None:
    label = ColumnInfo("y", "categorical", categories=("0", "1"))
    frame = pd.DataFrame({"y": [1.0, 0.0, np.nan, 2.0]})  # Parquet ints with a gap turn float
    assert apply_schema(frame, [label]).columns["y"].tolist() == [1, 0, MISSING_CODE, 2]
    text = pd.DataFrame({"y": ["1", "1.0", "01", "0.5"]})
    assert apply_schema(text, [label]).columns["y"].tolist() == [1, 1, 1, 2]


def test_typed_numeric_columns_and_objects() -> None:
    frame = pd.DataFrame(
        {
            "a": pd.array([1, None, 3], dtype="Int64"),
            "b": pd.Series([True, False, True]),
            "c": pd.Series([10**400, "2", object()], dtype=object),
        }
    )
    schema = [ColumnInfo(n, "numeric", -10.0, 10.0) for n in "abc"]
    table = apply_schema(frame, schema)
    assert table.columns["a"][[0, 2]].tolist() == [1.0, 3.0] and math.isnan(table.columns["a"][1])
    assert table.columns["b"].tolist() == [1.0, 0.0, 1.0]
    assert table.columns["c"][:2].tolist() == [10.0, 2.0] and math.isnan(table.columns["c"][2])


def test_configuration_errors_name_columns_only() -> None:
    frame = pd.DataFrame({"amount": ["secret-value"]})
    with pytest.raises(InvalidSpecError, match="'status'") as err:
        apply_schema(frame, [AMOUNT, LABEL])
    assert "secret-value" not in str(err.value)
    with pytest.raises(InvalidSpecError, match="more than once"):
        apply_schema(frame, [AMOUNT, AMOUNT])


def test_take_select_concat() -> None:
    frame = pd.DataFrame({"amount": ["1", "2", "3"], "status": ["good", "bad", "good"]})
    table = apply_schema(frame, [AMOUNT, LABEL])
    part = table.take(np.array([2, 0]))
    assert part.num_rows == 2 and part.columns["amount"].tolist() == [3.0, 1.0]
    assert table.take(table.columns["status"] == 0).num_rows == 2
    both = TypedTable.concat([table, part.select(["amount", "status"])])
    assert len(both) == 5 and both.columns["status"].tolist() == [0, 1, 0, 0, 0]


cell = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["", "NA", "nan", "inf", "-inf", "1e38", "-1e38", "1e400", "good", "bad"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(cell, cell), min_size=1, max_size=6), extra=st.tuples(cell, cell))
def test_one_row_never_changes_the_others(
    rows: list[tuple[str, str]], extra: tuple[str, str]
) -> None:
    """Adding any row leaves every other row's typed values as they were, and never raises."""
    schema = [AMOUNT, LABEL]
    base = apply_schema(pd.DataFrame(rows, columns=["amount", "status"]), schema)
    more = apply_schema(pd.DataFrame([*rows, extra], columns=["amount", "status"]), schema)
    for name in ("amount", "status"):
        np.testing.assert_array_equal(more.columns[name][:-1], base.columns[name])
    amount = more.columns["amount"]
    assert np.all(np.isnan(amount) | ((amount >= 0) & (amount <= 300_000)))
    assert set(more.columns["status"].tolist()) <= {MISSING_CODE, 0, 1, 2}
