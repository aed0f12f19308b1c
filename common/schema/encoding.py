"""The feature encoding every site applies: derived from the declared schema, never from data.

One :class:`FeatureEncoding` per job, derived by the orchestrator from the sites' declared
column schemas and sent to every site in the job spec, so that a feature means the same thing
at every site and in the released model. It maps a :class:`~common.schema.table.TypedTable`
(clipped numbers, NaN = missing; category codes, ``K`` = other, ``-1`` = missing) to float32
rows, column by column, in the declared order:

- numeric, ``minmax``: ``(x - min) / (max - min)`` in ``[0, 1]`` (one slot);
- numeric, ``quantile``: the piecewise-linear encoding of Gorishniy, Rubachev, Babenko, "On
  Embeddings for Numerical Features in Tabular Deep Learning" (NeurIPS 2022), eq. (1): for
  bin edges ``b_0 = min < b_1 < ... < b_T = max`` slot ``t`` is 1 when ``x >= b_t``, 0 when
  ``x < b_{t-1}`` and ``(x - b_{t-1}) / (b_t - b_{t-1})`` in between (``T`` slots). The edges
  come from DP quantiles across sites (``orchestrator.training.quantiles``);
- a nullable numeric column adds a missing indicator (1 when missing; the value slots are 0);
  a missing value of a column declared not nullable encodes as the minimum, with no indicator;
- categorical: one-hot over the declared categories plus an "other" and a "missing" slot.

Every row is encoded by the same arithmetic whatever it holds; every output is in ``[0, 1]``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from common.domain import ColumnInfo
from common.errors import InvalidSpecError

if TYPE_CHECKING:
    from common.schema.table import TypedTable

__all__ = [
    "NUMERIC_ENCODINGS",
    "EncodedFeature",
    "FeatureEncoding",
    "derive_encoding",
    "uniform_edges",
]

NUMERIC_ENCODINGS = ("minmax", "quantile")
"""How numeric columns are encoded: min/max scaling, or piecewise-linear over quantile bins."""

MAX_BINS = 256
"""Most quantile bins one numeric column may have."""


@dataclass(frozen=True)
class EncodedFeature:
    """One declared feature column and how it is encoded.

    ``edges`` is empty for min/max scaling and categorical columns; for the quantile encoding
    it holds ``T + 1`` strictly increasing edges from the column's ``min`` to its ``max``.
    """

    column: ColumnInfo
    edges: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        c = self.column
        if c.type == "categorical":
            if self.edges:
                raise InvalidSpecError(f"The categorical column {c.name!r} cannot have bin edges.")
            if len(set(c.categories)) != len(c.categories):
                raise InvalidSpecError(f"The column {c.name!r} declares a category twice.")
            return
        if c.type != "numeric":
            raise InvalidSpecError(
                f"The column {c.name!r} has type {c.type!r}; a column is numeric or categorical."
            )
        if c.min is None or c.max is None:
            raise InvalidSpecError(
                f"The numeric column {c.name!r} has no declared bounds (min and max); the "
                "encoding scales every numeric column by its declared bounds."
            )
        if not (math.isfinite(c.min) and math.isfinite(c.max) and c.min <= c.max):
            raise InvalidSpecError(
                f"The numeric column {c.name!r} needs finite bounds with min <= max."
            )
        if self.edges:
            e = self.edges
            if len(e) < 3 or len(e) > MAX_BINS + 1:
                raise InvalidSpecError(
                    f"The column {c.name!r} needs 2 to {MAX_BINS} quantile bins, got {len(e) - 1}."
                )
            if e[0] != c.min or e[-1] != c.max:
                raise InvalidSpecError(
                    f"The bin edges of column {c.name!r} must run from its min to its max."
                )
            if not all(math.isfinite(x) for x in e) or any(
                b <= a for a, b in itertools.pairwise(e)
            ):
                raise InvalidSpecError(
                    f"The bin edges of column {c.name!r} must be finite and strictly increasing."
                )

    @property
    def name(self) -> str:
        return self.column.name

    @property
    def kind(self) -> str:
        """``minmax``, ``quantile`` or ``onehot``."""
        if self.column.type == "categorical":
            return "onehot"
        return "quantile" if self.edges else "minmax"

    @property
    def width(self) -> int:
        c = self.column
        if c.type == "categorical":
            return len(c.categories) + 2
        values = len(self.edges) - 1 if self.edges else 1
        return values + (1 if c.nullable else 0)

    def slot_names(self) -> list[str]:
        """A readable name for each output slot (for the model card)."""
        c = self.column
        if c.type == "categorical":
            return [f"{c.name}={v}" for v in c.categories] + [
                f"{c.name}:other",
                f"{c.name}:missing",
            ]
        if self.edges:
            values = [f"{c.name}:bin{t}" for t in range(1, len(self.edges))]
        else:
            values = [c.name]
        return values + ([f"{c.name}:missing"] if c.nullable else [])

    def encode(self, values: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """``(N, width)`` slots for one typed column (float64 numbers or int64 codes)."""
        n = values.shape[0]
        out = np.zeros((n, self.width), dtype=np.float32)
        c = self.column
        if c.type == "categorical":
            codes = values.astype(np.int64)
            k = len(c.categories)
            # Declared categories 0..K-1, "other" K (any out-of-range code too), missing K+1.
            slot = np.where((codes >= 0) & (codes <= k), codes, k)
            slot = np.where(codes == -1, k + 1, slot)
            out[np.arange(n), slot] = 1.0
            return out
        assert c.min is not None and c.max is not None
        x = values.astype(np.float64)
        missing = np.isnan(x)
        x = np.clip(np.where(missing, c.min, x), c.min, c.max)
        if self.edges:
            e = np.asarray(self.edges, dtype=np.float64)
            lo, hi = e[:-1], e[1:]
            part = (x[:, None] - lo[None, :]) / (hi - lo)[None, :]
            v = np.clip(part, 0.0, 1.0)
            v[missing] = 0.0
            out[:, : len(lo)] = v
        else:
            span = c.max - c.min
            scaled = (x - c.min) / span if span > 0 else np.zeros_like(x)
            out[:, 0] = np.where(missing, 0.0, np.clip(scaled, 0.0, 1.0))
        if c.nullable:
            out[:, -1] = missing
        return out

    def to_dict(self) -> dict[str, Any]:
        c = self.column
        d: dict[str, Any] = {"name": c.name, "type": c.type, "nullable": c.nullable}
        if c.type == "categorical":
            d["categories"] = list(c.categories)
        else:
            d["min"] = c.min
            d["max"] = c.max
            d["edges"] = list(self.edges)
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> EncodedFeature:
        if not isinstance(d, Mapping):
            raise InvalidSpecError("Each encoded feature must be a mapping.")
        kind = d.get("type")
        allowed = (
            {"name", "type", "nullable", "categories"}
            if kind == "categorical"
            else {"name", "type", "nullable", "min", "max", "edges"}
        )
        extra = sorted(set(d) - allowed)
        if extra:
            raise InvalidSpecError(f"An encoded feature has unknown key(s) {extra}.")
        name = d.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidSpecError("Each encoded feature needs a name.")
        nullable = d.get("nullable", True)
        if not isinstance(nullable, bool):
            raise InvalidSpecError(f"The feature {name!r}: nullable must be true or false.")
        if kind == "categorical":
            cats = d.get("categories", [])
            if not isinstance(cats, list | tuple) or not all(isinstance(v, str) for v in cats):
                raise InvalidSpecError(f"The feature {name!r}: categories must be strings.")
            col = ColumnInfo(name, "categorical", categories=tuple(cats), nullable=nullable)
            return EncodedFeature(col)
        lo, hi = _number(name, "min", d.get("min")), _number(name, "max", d.get("max"))
        edges = d.get("edges", [])
        if not isinstance(edges, list | tuple):
            raise InvalidSpecError(f"The feature {name!r}: edges must be a list of numbers.")
        col = ColumnInfo(name, str(kind), min=lo, max=hi, nullable=nullable)
        return EncodedFeature(col, tuple(_number(name, "edges", v) for v in edges))


def _number(name: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSpecError(f"The feature {name!r}: {key} must be a number.")
    if not math.isfinite(float(value)):
        raise InvalidSpecError(f"The feature {name!r}: {key} must be finite.")
    return float(value)


@dataclass(frozen=True)
class FeatureEncoding:
    """The encoding of a job's features and label (module docstring).

    ``label`` is the label column declared as categorical; its categories are the classes,
    in declared order, and the model's outputs follow that order.
    """

    features: tuple[EncodedFeature, ...]
    label: ColumnInfo
    numeric: str = "minmax"

    def __post_init__(self) -> None:
        if self.numeric not in NUMERIC_ENCODINGS:
            raise InvalidSpecError(
                f"Unknown numeric encoding {self.numeric!r}; use one of {list(NUMERIC_ENCODINGS)}."
            )
        if not self.features:
            raise InvalidSpecError("The encoding needs at least one feature column.")
        names = [f.name for f in self.features]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InvalidSpecError(f"The encoding names the column(s) {twice} more than once.")
        if self.label.name in names:
            raise InvalidSpecError(f"The label {self.label.name!r} cannot also be a feature.")
        if self.label.type != "categorical" or len(self.label.categories) < 2:
            raise InvalidSpecError(
                f"The label {self.label.name!r} must be declared categorical with at least two "
                "classes (its categories, in order)."
            )
        if len(set(self.label.categories)) != len(self.label.categories):
            raise InvalidSpecError(f"The label {self.label.name!r} declares a class twice.")

    @property
    def width(self) -> int:
        """The model's ``input_dim``: the number of encoded slots."""
        return sum(f.width for f in self.features)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.label.categories

    @property
    def num_classes(self) -> int:
        return len(self.label.categories)

    def feature_schema(self) -> tuple[ColumnInfo, ...]:
        """The declared feature columns, in order (what ``apply_schema`` needs)."""
        return tuple(f.column for f in self.features)

    def label_schema(self) -> ColumnInfo:
        return self.label

    def slot_names(self) -> list[str]:
        return [s for f in self.features for s in f.slot_names()]

    def encode(self, table: TypedTable) -> npt.NDArray[np.float32]:
        """``(num_rows, width)`` float32 rows in ``[0, 1]``.

        Raises:
            InvalidSpecError: a feature column is not in the table (names only).
        """
        absent = [f.name for f in self.features if f.name not in table.columns]
        if absent:
            raise InvalidSpecError(
                f"The table has no column(s) {', '.join(repr(n) for n in absent)} that the "
                "encoding needs."
            )
        parts = [f.encode(table.columns[f.name]) for f in self.features]
        return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "numeric": self.numeric,
            "features": [f.to_dict() for f in self.features],
            "label": {"name": self.label.name, "classes": list(self.label.categories)},
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> FeatureEncoding:
        """The inverse of :meth:`to_dict`; InvalidSpecError for anything malformed."""
        if not isinstance(d, Mapping):
            raise InvalidSpecError("The encoding must be a mapping.")
        extra = sorted(set(d) - {"numeric", "features", "label"})
        if extra:
            raise InvalidSpecError(f"The encoding has unknown key(s) {extra}.")
        feats = d.get("features")
        if not isinstance(feats, list | tuple):
            raise InvalidSpecError("The encoding needs a list of features.")
        label = d.get("label")
        if not isinstance(label, Mapping) or set(label) - {"name", "classes"}:
            raise InvalidSpecError("The encoding's label must be a mapping of name and classes.")
        name, classes = label.get("name"), label.get("classes")
        if not isinstance(name, str) or not name:
            raise InvalidSpecError("The encoding's label needs a name.")
        if not isinstance(classes, list | tuple) or not all(isinstance(c, str) for c in classes):
            raise InvalidSpecError("The encoding's label classes must be a list of strings.")
        numeric = d.get("numeric", "minmax")
        return FeatureEncoding(
            features=tuple(EncodedFeature.from_dict(f) for f in feats),
            label=ColumnInfo(name, "categorical", categories=tuple(classes), nullable=False),
            numeric=str(numeric),
        )


def uniform_edges(low: float, high: float, bins: int) -> tuple[float, ...]:
    """``bins + 1`` evenly spaced edges from ``low`` to ``high`` (endpoints exact)."""
    inner = [low + (high - low) * t / bins for t in range(1, bins)]
    return (low, *inner, high)


def derive_encoding(
    features: Sequence[ColumnInfo],
    label: ColumnInfo,
    *,
    numeric: str = "minmax",
    edges: Mapping[str, Sequence[float]] | None = None,
) -> FeatureEncoding:
    """The encoding of an agreed declared schema (``features`` in order, and the label).

    With ``numeric="quantile"`` every numeric column needs its bin edges in ``edges`` (from
    ``orchestrator.training.quantiles``; :func:`uniform_edges` is the placeholder of the right width
    before they are computed), except a constant one (``min == max``), scaled as min/max.

    Raises:
        InvalidSpecError: a numeric column without bounds, a label that is not categorical
            with at least two classes, quantile edges missing or malformed.
    """
    if numeric not in NUMERIC_ENCODINGS:
        raise InvalidSpecError(
            f"Unknown numeric encoding {numeric!r}; use one of {list(NUMERIC_ENCODINGS)}."
        )
    out = []
    for col in features:
        spread = col.min is not None and col.max is not None and col.min < col.max
        if col.type == "numeric" and numeric == "quantile" and spread:
            if edges is None or col.name not in edges:
                raise InvalidSpecError(f"The numeric column {col.name!r} has no bin edges.")
            out.append(EncodedFeature(col, tuple(float(e) for e in edges[col.name])))
        else:
            out.append(EncodedFeature(col))
    return FeatureEncoding(features=tuple(out), label=label, numeric=numeric)
