"""The declared schema of a synthetic table and its discretisation into bins, plus the
JSON shapes that cross a process boundary.

Bounds and categories are public declarations, never learned from the data (a bound taken
from the data is itself a disclosure): numeric values are clipped and cut into equal-width
bins, unmatched or missing categories go to a reserved "other" bin. No message names a data
value. Details: docs/synthesis.md, "Schema and discretisation".
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Final, Literal, NotRequired, TypedDict, cast

import numpy as np
import numpy.typing as npt
import pandas as pd

from common.dp.events import DpEventDict
from common.errors import InvalidSpecError

__all__ = [
    "DEFAULT_BINS",
    "MAX_BINS",
    "MAX_MARGINAL_CELLS",
    "Category",
    "ColumnDict",
    "ColumnKind",
    "ColumnSchema",
    "MarginalDict",
    "MeasurementDict",
    "PlanDict",
    "PlannedMarginalDict",
    "Schema",
    "SchemaDict",
    "infer_schema",
]


Category = str | int | float | bool
"""A category value: a JSON scalar (finite if a float)."""

ColumnKind = Literal["numeric", "categorical"]

DEFAULT_BINS: Final = 8
"""Default number of equal-width bins of a numeric column."""

MAX_BINS: Final = 1024
"""Largest discretised domain of one column (numeric bins, or categories + "other")."""

MAX_MARGINAL_CELLS: Final = 1_000_000
"""Largest number of cells of one measured marginal (bounds a plan's memory and payload)."""

_PLAN_FORMAT: Final = "dpfed.synth.plan"
_MEASUREMENT_FORMAT: Final = "dpfed.synth.measurement"
_VERSION: Final = 1
_INDEPENDENCE_BLEND: Final = 1e-3  # share of the independent table mixed into each edge table
_IPF_MAX_ITERATIONS: Final = 500
_IPF_TOLERANCE: Final = 1e-9
_MAX_SIGMA_INFLATIONS: Final = 200

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


# What crosses a process boundary. Producers return these; consumers accept any mapping and
# validate it field by field (wire data is untrusted), refusing unknown fields.


class ColumnDict(TypedDict):
    """:meth:`ColumnSchema.to_dict`: ``bounds`` and ``bins`` for numeric columns,
    ``categories`` for categorical ones."""

    name: str
    kind: ColumnKind
    bounds: NotRequired[list[float]]
    bins: NotRequired[int]
    categories: NotRequired[list[Category]]


class SchemaDict(TypedDict):
    """:meth:`Schema.to_dict`."""

    columns: list[ColumnDict]


class PlannedMarginalDict(TypedDict):
    columns: list[str]
    noise_std: float


class PlanDict(TypedDict):
    """:meth:`MeasurementPlan.to_dict` (orchestrator → site)."""

    format: str
    version: int
    schema: SchemaDict
    marginals: list[PlannedMarginalDict]
    target_epsilon: float
    delta: float
    accountant: str
    epsilon: NotRequired[float]


class MarginalDict(TypedDict):
    """Noisy counts of one marginal, flat in C order over ``shape``; ``variance`` is the
    noise variance of every cell."""

    columns: list[str]
    shape: list[int]
    counts: list[float]
    variance: float


class MeasurementDict(TypedDict):
    """:func:`measure_site` (site → orchestrator; with the optional fields) and
    :func:`combine` (without them)."""

    format: str
    version: int
    schema_fingerprint: str
    sites: int
    marginals: list[MarginalDict]
    events: NotRequired[list[DpEventDict]]
    epsilon: NotRequired[float]
    delta: NotRequired[float]
    accountant: NotRequired[str]


def _is_number(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _finite_float(x: object, what: str) -> float:
    if not _is_number(x) or not math.isfinite(float(cast(float, x))):
        raise InvalidSpecError(f"{what} must be a finite number, got {type(x).__name__}.")
    return float(cast(float, x))


def _mapping(raw: object, what: str, required: set[str], optional: set[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise InvalidSpecError(f"{what} must be a mapping, got {type(raw).__name__}.")
    keys = set(raw)
    if not all(isinstance(k, str) for k in keys):
        raise InvalidSpecError(f"{what} has a non-string key.")
    missing = required - keys
    if missing:
        raise InvalidSpecError(f"{what} lacks the field(s) {sorted(missing)}.")
    extra = keys - required - optional
    if extra:
        raise InvalidSpecError(f"{what} has unknown field(s) {sorted(extra)}.")
    return cast(Mapping[str, Any], raw)


def _check_format(raw: Mapping[str, Any], expected: str, what: str) -> None:
    if raw["format"] != expected or raw["version"] != _VERSION:
        raise InvalidSpecError(f"{what} must have format {expected!r} version {_VERSION}.")


def _category(value: object, column: str) -> Category:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str | bool | int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise InvalidSpecError(
        f"Column {column!r}: categories must be strings, booleans, integers or finite floats "
        f"(JSON scalars), got a {type(value).__name__}."
    )


def _as_float(values: Any) -> FloatArray:
    """Values as float64, NaN where missing or not a number (conversion errors quote values,
    so they are never raised from here)."""
    arr = np.asarray(values) if not isinstance(values, pd.Series) else values.to_numpy()
    if arr.dtype.kind in "biuf":
        return np.asarray(arr, dtype=np.float64).ravel()
    try:
        numbers = pd.to_numeric(pd.Series(arr.ravel(), dtype=object), errors="coerce")
        return np.asarray(numbers, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return np.full(arr.size, np.nan)


@dataclass(frozen=True)
class ColumnSchema:
    """How one column is discretised: declared in the site config, never learned from data.

    ``bins`` is the size of the column's discretised domain: for ``numeric`` the number of
    equal-width bins over ``bounds`` (at least 2); for ``categorical`` always
    ``len(categories) + 1``, the last bin being the reserved "other" bin (pass 0 to have it
    filled in). See docs/synthesis.md for clipping, unknown values and decoding.
    """

    name: str
    kind: ColumnKind
    bounds: tuple[float, float] | None = None
    categories: tuple[Category, ...] | None = None
    bins: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidSpecError("A column name must be a non-empty string.")
        name = self.name
        if isinstance(self.bins, bool) or not isinstance(self.bins, Integral):
            raise InvalidSpecError(f"Column {name!r}: bins must be an integer.")
        if self.kind == "numeric":
            if self.categories is not None:
                raise InvalidSpecError(f"Numeric column {name!r} cannot declare categories.")
            if not isinstance(self.bounds, tuple | list) or len(self.bounds) != 2:
                raise InvalidSpecError(f"Numeric column {name!r} needs bounds (lo, hi).")
            lo = _finite_float(self.bounds[0], f"Column {name!r}: the lower bound")
            hi = _finite_float(self.bounds[1], f"Column {name!r}: the upper bound")
            if not lo < hi:
                raise InvalidSpecError(f"Column {name!r}: the bounds need lo < hi.")
            if not 2 <= self.bins <= MAX_BINS:
                raise InvalidSpecError(
                    f"Numeric column {name!r}: bins must be in [2, {MAX_BINS}], got {self.bins}."
                )
            object.__setattr__(self, "bounds", (lo, hi))
            object.__setattr__(self, "bins", int(self.bins))
        elif self.kind == "categorical":
            if self.bounds is not None:
                raise InvalidSpecError(f"Categorical column {name!r} cannot declare bounds.")
            if self.categories is None or len(self.categories) == 0:
                raise InvalidSpecError(f"Categorical column {name!r} needs categories.")
            cats = tuple(_category(c, name) for c in self.categories)
            if len(set(cats)) != len(cats):
                # Python equality: 1, 1.0 and True are the same category.
                raise InvalidSpecError(f"Categorical column {name!r} repeats a category.")
            size = len(cats) + 1
            if size > MAX_BINS:
                raise InvalidSpecError(
                    f"Categorical column {name!r}: at most {MAX_BINS - 1} categories."
                )
            if self.bins not in (0, size):
                raise InvalidSpecError(
                    f"Categorical column {name!r}: bins is len(categories) + 1 = {size} "
                    f"(the last is the reserved 'other' bin), got {self.bins}."
                )
            object.__setattr__(self, "categories", cats)
            object.__setattr__(self, "bins", size)
        else:
            raise InvalidSpecError(
                f"Column {name!r}: kind must be 'numeric' or 'categorical', got {self.kind!r}."
            )

    @classmethod
    def numeric(cls, name: str, *, lo: float, hi: float, bins: int = DEFAULT_BINS) -> ColumnSchema:
        """A numeric column clipped to ``[lo, hi]`` and cut into ``bins`` equal-width bins."""
        return cls(name=name, kind="numeric", bounds=(lo, hi), bins=bins)

    @classmethod
    def categorical(cls, name: str, categories: Iterable[Category]) -> ColumnSchema:
        """A categorical column with the given categories plus the reserved "other" bin."""
        return cls(name=name, kind="categorical", categories=tuple(categories))

    def encode(self, values: Any) -> IntArray:
        """Bin index of each value (1-D array-like); see docs/synthesis.md.

        Raises :class:`InvalidSpecError` naming the column (never a value) when a numeric
        column holds a missing or non-numeric value.
        """
        if self.kind == "numeric":
            lo, hi = cast(tuple[float, float], self.bounds)
            x = _as_float(values)
            if np.isnan(x).any():
                raise InvalidSpecError(
                    f"Column {self.name!r} holds missing or non-numeric values; a numeric column "
                    "has no bin for them (clean the data at the site or declare the column "
                    "categorical)."
                ) from None
            scaled = (np.clip(x, lo, hi) - lo) / (hi - lo) * self.bins
            return np.clip(np.floor(scaled), 0, self.bins - 1).astype(np.int64)
        lookup = {c: i for i, c in enumerate(cast(tuple[Category, ...], self.categories))}
        other = self.bins - 1

        def index(v: object) -> int:
            try:
                return lookup.get(cast(Category, v), other)
            except TypeError:  # unhashable: not a declared category
                return other

        seq = values.tolist() if isinstance(values, np.ndarray | pd.Series) else list(values)
        return np.fromiter((index(v) for v in seq), dtype=np.int64, count=len(seq))

    def decode(self, codes: IntArray, rng: np.random.Generator) -> pd.Series:
        """Values for bin indices: a uniform draw inside the bin, or the category.

        The "other" bin of a categorical column decodes to a missing value (``None``/``NaN``);
        the column's dtype is inferred from the categories (e.g. ``int64`` for integer ones when
        no "other" is drawn).
        """
        codes = np.asarray(codes, dtype=np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= self.bins):
            raise ValueError(f"Column {self.name!r}: bin indices must be in [0, {self.bins}).")
        if self.kind == "numeric":
            lo, hi = cast(tuple[float, float], self.bounds)
            width = (hi - lo) / self.bins
            x = lo + (codes + rng.random(codes.shape[0])) * width
            return pd.Series(np.clip(x, lo, hi), name=self.name, dtype=np.float64)
        table = np.array([*cast(tuple[Category, ...], self.categories), None], dtype=object)
        return pd.Series(table[codes], name=self.name, dtype=object).infer_objects()

    def to_dict(self) -> ColumnDict:
        """JSON-safe form; :meth:`from_dict` inverts it."""
        if self.kind == "numeric":
            lo, hi = cast(tuple[float, float], self.bounds)
            return {"name": self.name, "kind": "numeric", "bounds": [lo, hi], "bins": self.bins}
        return {
            "name": self.name,
            "kind": "categorical",
            "categories": list(cast(tuple[Category, ...], self.categories)),
        }

    @classmethod
    def from_dict(cls, raw: object) -> ColumnSchema:
        """Parse and validate :meth:`to_dict`'s form (unknown fields are refused)."""
        base = _mapping(raw, "A column", {"name", "kind"}, {"bounds", "categories", "bins"})
        kind = base["kind"]
        name = base["name"]
        if kind == "numeric":
            d = _mapping(raw, f"Column {name!r}", {"name", "kind", "bounds", "bins"}, set())
            bounds = d["bounds"]
            if not isinstance(bounds, list | tuple) or len(bounds) != 2:
                raise InvalidSpecError(f"Column {name!r}: bounds must be a pair [lo, hi].")
            return cls(name=name, kind="numeric", bounds=(bounds[0], bounds[1]), bins=d["bins"])
        if kind == "categorical":
            d = _mapping(raw, f"Column {name!r}", {"name", "kind", "categories"}, {"bins"})
            cats = d["categories"]
            if not isinstance(cats, list | tuple):
                raise InvalidSpecError(f"Column {name!r}: categories must be a list.")
            return cls(name=name, kind="categorical", categories=tuple(cats), bins=d.get("bins", 0))
        raise InvalidSpecError(f"Column {name!r}: kind must be 'numeric' or 'categorical'.")


@dataclass(frozen=True)
class Schema:
    """The declared columns, in order. Names are unique."""

    columns: tuple[ColumnSchema, ...]

    def __post_init__(self) -> None:
        cols = tuple(self.columns)
        if not cols or not all(isinstance(c, ColumnSchema) for c in cols):
            raise InvalidSpecError("A schema needs at least one ColumnSchema.")
        names = [c.name for c in cols]
        if len(set(names)) != len(names):
            raise InvalidSpecError("Column names in a schema must be unique.")
        object.__setattr__(self, "columns", cols)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> ColumnSchema:
        for c in self.columns:
            if c.name == name:
                return c
        raise InvalidSpecError(f"The schema has no column {name!r}.")

    def index(self, name: str) -> int:
        return self.names.index(self.column(name).name)

    def encode(self, data: Any) -> IntArray:
        """Bin indices, shape ``(rows, columns)`` in schema order.

        ``data`` is a :class:`pandas.DataFrame` (columns by name; others are ignored) or a 2-D
        array-like whose columns are in schema order.
        """
        if isinstance(data, pd.DataFrame):
            missing = [n for n in self.names if n not in data.columns]
            if missing:
                raise InvalidSpecError(f"The data lacks the declared column(s) {missing}.")
            cols = [data[n].to_numpy() for n in self.names]
            rows = len(data)
        else:
            arr = np.asarray(data)
            if arr.ndim != 2 or arr.shape[1] != len(self.columns):
                raise InvalidSpecError(
                    f"Array data must be 2-D with {len(self.columns)} columns in schema order, "
                    f"got shape {arr.shape}."
                )
            cols = [arr[:, j] for j in range(arr.shape[1])]
            rows = arr.shape[0]
        if rows == 0:
            return np.zeros((0, len(self.columns)), dtype=np.int64)
        return np.stack([c.encode(v) for c, v in zip(self.columns, cols, strict=True)], axis=1)

    def decode(self, codes: IntArray, rng: np.random.Generator) -> pd.DataFrame:
        """A DataFrame (schema names and order) from bin indices of shape ``(rows, columns)``."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != len(self.columns):
            raise ValueError(f"Codes must have shape (rows, {len(self.columns)}).")
        return pd.DataFrame(
            {c.name: c.decode(codes[:, j], rng) for j, c in enumerate(self.columns)},
            columns=list(self.names),
        )

    def to_dict(self) -> SchemaDict:
        """JSON-safe form; :meth:`from_dict` inverts it."""
        return {"columns": [c.to_dict() for c in self.columns]}

    @classmethod
    def from_dict(cls, raw: object) -> Schema:
        """Parse and validate :meth:`to_dict`'s form (unknown fields are refused)."""
        d = _mapping(raw, "A schema", {"columns"}, set())
        cols = d["columns"]
        if not isinstance(cols, list | tuple):
            raise InvalidSpecError("A schema's columns must be a list.")
        return cls(tuple(ColumnSchema.from_dict(c) for c in cols))

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON form: equal schemas, equal fingerprints."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def infer_schema(
    df: pd.DataFrame,
    *,
    bins: int = DEFAULT_BINS,
    categorical_max: int = 10,
    clip_quantile: float = 0.0,
) -> Schema:
    """Draft a schema from data. FOR SITE CONFIGS AND TESTS ONLY: it reads the data.

    Bounds and categories found here are functions of the private rows and are not covered
    by any noise; a production schema is declared (reviewed, rounded, widened) in the site
    config and given to the orchestrator, which must never call this. A column is
    categorical when it is not numeric (booleans count as categorical) or has at most
    ``categorical_max`` distinct values; numeric bounds are the ``clip_quantile`` and
    ``1 - clip_quantile`` quantiles (min and max by default).
    """
    if not 0.0 <= clip_quantile < 0.5:
        raise ValueError(f"clip_quantile must be in [0, 0.5), got {clip_quantile}.")
    cols: list[ColumnSchema] = []
    for name in df.columns:
        s = df[name]
        label = str(name)
        values = s.dropna()
        numeric = pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
        if not numeric or values.nunique() <= categorical_max:
            uniq = [_category(v, label) for v in pd.unique(values)]
            cats = sorted(uniq, key=lambda c: (type(c).__name__, c))
            cols.append(ColumnSchema.categorical(label, cats))
            continue
        x = np.asarray(values, dtype=np.float64)
        x = x[np.isfinite(x)]
        lo, hi = (float(q) for q in np.quantile(x, [clip_quantile, 1.0 - clip_quantile]))
        if not lo < hi:
            hi = lo + 1.0
        cols.append(ColumnSchema.numeric(label, lo=lo, hi=hi, bins=bins))
    return Schema(tuple(cols))
