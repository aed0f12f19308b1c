"""A raw table under its declared schema: the typed, bounded columns everything else reads.

Contract (issue 15: "the declared schema is the contract between a site's raw data and
everything else"). :func:`apply_schema` turns each declared column of a raw frame (text from
CSV, or typed values from Parquet/SQL) into:

- numeric → ``float64``, clipped to ``[min, max]`` (±inf and values beyond float32's range
  too; a column without bounds is clipped to float32's finite range). ``NaN`` means missing:
  an empty cell, ``NA``/``NaN``/``null``/``None``, or text that is not a number.
- categorical → ``int64`` codes: ``0..K-1`` for the declared categories in declared order,
  ``K`` for "other" (any value not declared), ``-1`` for missing (an empty cell or a missing
  token that is not itself a declared category). A cell matches a category by its stripped
  text, or by number when the category is a number (``1``, ``1.0`` and ``"1"`` match ``"1"``).

Every row is treated by the same code path whatever it holds: no cell value ever raises,
logs or changes anything but its own output. :class:`~common.errors.InvalidSpecError` is
raised only for configuration problems (a declared column absent from the frame, an unknown
type), and its message names columns, never values.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from common.domain import ColumnInfo
from common.errors import InvalidSpecError

__all__ = ["MISSING_CODE", "MISSING_TOKENS", "TypedTable", "apply_schema"]

FLOAT32_MAX = float(np.finfo(np.float32).max)
"""Numeric values are kept within float32's finite range, whatever the bounds say."""

MISSING_CODE = -1
"""The code of a missing categorical cell (``K`` is "other")."""

MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "<na>", "nat"})
"""Cell texts (compared case-insensitively after stripping) that mean "missing"."""


@dataclass(frozen=True, eq=False)
class TypedTable:
    """Columns after :func:`apply_schema`: ``float64`` (numeric, NaN = missing) or ``int64``
    codes (categorical, ``K`` = other, ``-1`` = missing), each ``num_rows`` long."""

    columns: dict[str, npt.NDArray[np.float64] | npt.NDArray[np.int64]]
    num_rows: int

    def __post_init__(self) -> None:
        for name, col in self.columns.items():
            if col.shape != (self.num_rows,):
                raise ValueError(
                    f"column {name!r} has shape {col.shape}, expected ({self.num_rows},)"
                )

    def __len__(self) -> int:
        return self.num_rows

    def take(self, index: npt.NDArray[np.int64] | npt.NDArray[np.bool_]) -> TypedTable:
        """The rows at ``index`` (integer positions or a boolean mask), in that order."""
        cols = {name: col[index] for name, col in self.columns.items()}
        n = int(np.count_nonzero(index)) if index.dtype == np.bool_ else int(index.shape[0])
        return TypedTable(columns=cols, num_rows=n)

    def select(self, names: Sequence[str]) -> TypedTable:
        """Only the columns ``names`` (each must be present)."""
        return TypedTable(columns={n: self.columns[n] for n in names}, num_rows=self.num_rows)

    @staticmethod
    def concat(tables: Sequence[TypedTable]) -> TypedTable:
        """Rows of ``tables`` one after the other; every table has the same columns."""
        if not tables:
            raise ValueError("concat needs at least one table")
        names = list(tables[0].columns)
        cols = {n: np.concatenate([t.columns[n] for t in tables]) for n in names}
        return TypedTable(columns=cols, num_rows=sum(t.num_rows for t in tables))


def apply_schema(frame: pd.DataFrame, schema: Sequence[ColumnInfo]) -> TypedTable:
    """The declared columns of ``frame``, typed and bounded by ``schema`` (module docstring).

    Raises:
        InvalidSpecError: a declared column is not in ``frame``, is declared twice, or has a
            type other than ``numeric`` / ``categorical``.
    """
    names = [c.name for c in schema]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidSpecError(f"The schema declares the column(s) {repeated} more than once.")
    present = {str(c) for c in frame.columns}
    absent = [n for n in names if n not in present]
    if absent:
        raise InvalidSpecError(
            f"The declared column{'s' if len(absent) > 1 else ''} "
            f"{', '.join(repr(n) for n in absent)} {'are' if len(absent) > 1 else 'is'} "
            "not in the data."
        )
    by_name = {str(c): c for c in frame.columns}
    columns: dict[str, npt.NDArray[np.float64] | npt.NDArray[np.int64]] = {}
    for info in schema:
        raw = frame[by_name[info.name]]
        if info.type == "numeric":
            columns[info.name] = numeric_values(raw, info.min, info.max)
        elif info.type == "categorical":
            columns[info.name] = categorical_codes(raw, info.categories)
        else:
            raise InvalidSpecError(
                f"The column {info.name!r} has type {info.type!r}; a column is numeric or "
                "categorical."
            )
    return TypedTable(columns=columns, num_rows=len(frame))


def numeric_values(
    raw: pd.Series, low: float | None, high: float | None
) -> npt.NDArray[np.float64]:
    """``raw`` as float64, NaN where missing or not a number, clipped to the bounds.

    Without bounds the values are clipped to float32's finite range, so that no cell can
    overflow a later float32 computation.
    """
    lo = -FLOAT32_MAX if low is None else max(float(low), -FLOAT32_MAX)
    hi = FLOAT32_MAX if high is None else min(float(high), FLOAT32_MAX)
    values = _to_float64(raw)
    with np.errstate(invalid="ignore"):
        clipped: npt.NDArray[np.float64] = np.clip(values, lo, hi)  # NaN stays NaN
    return clipped


def _to_float64(raw: pd.Series) -> npt.NDArray[np.float64]:
    if pd.api.types.is_bool_dtype(raw.dtype) or pd.api.types.is_numeric_dtype(raw.dtype):
        try:
            return np.asarray(raw.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            pass
    elif raw.dtype == object or pd.api.types.is_string_dtype(raw.dtype):
        try:
            text = raw.astype("string").str.strip()
            parsed = pd.to_numeric(text, errors="coerce")
            return np.asarray(parsed.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            pass
    # Anything else (dates, mixed objects a driver returned): one cell at a time, so that no
    # cell can fail the column.
    return np.fromiter((_cell_float(v) for v in raw.tolist()), dtype=np.float64, count=len(raw))


def _cell_float(value: object) -> float:
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, float | np.number):
        try:
            return float(value)
        except (OverflowError, TypeError, ValueError):
            return math.nan
    if isinstance(value, str | bytes):
        try:
            return float(value.strip())
        except ValueError:
            return math.nan
    return math.nan


def categorical_codes(raw: pd.Series, categories: Sequence[str]) -> npt.NDArray[np.int64]:
    """Codes of ``raw`` against ``categories`` (module docstring): ``0..K-1``, ``K`` other,
    ``-1`` missing."""
    cats = tuple(str(c) for c in categories)
    by_text = {c.strip(): i for i, c in reversed(list(enumerate(cats)))}
    by_number: dict[float, int] = {}
    for i, c in reversed(list(enumerate(cats))):
        number = _finite_number(c)
        if number is not None:
            by_number[number] = i
    other = len(cats)
    memo: dict[tuple[type, Hashable], int] = {}

    def code(value: object) -> int:
        if isinstance(value, str):
            text = value.strip()
        elif value is None or value is pd.NA or value is pd.NaT:
            return MISSING_CODE
        elif isinstance(value, float | np.floating) and math.isnan(value):
            return MISSING_CODE
        elif isinstance(value, bool | np.bool_):
            text = str(bool(value))
        elif isinstance(value, int | float | np.number):
            number = float(value) if math.isfinite(float(value)) else None
            if number is not None and number in by_number:
                return by_number[number]
            text = str(value)
        elif isinstance(value, bytes):
            text = value.decode("utf-8", errors="replace").strip()
        else:
            text = str(value).strip()
        if text in by_text:
            return by_text[text]
        number = _finite_number(text)
        if number is not None and number in by_number:
            return by_number[number]
        if text.lower() in MISSING_TOKENS:
            return MISSING_CODE
        return other

    def cached(value: object) -> int:
        # Keyed by type too: 1, 1.0 and True are equal keys but not the same cell text.
        key = (type(value), value)
        try:
            hit = memo.get(key)
        except TypeError:  # an unhashable cell
            return code(value)
        if hit is None:
            hit = memo[key] = code(value)
        return hit

    return np.fromiter((cached(v) for v in raw.tolist()), dtype=np.int64, count=len(raw))


def _finite_number(text: str) -> float | None:
    try:
        number = float(text)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def schema_by_name(schema: Sequence[ColumnInfo]) -> Mapping[str, ColumnInfo]:
    """``schema`` as a mapping from column name to its declaration."""
    return {c.name: c for c in schema}
