"""Federated differentially private synthetic data from noisy marginals (MST-style).

Specification
=============

Sources
-------
* McKenna, Miklau & Sheldon 2021, "Winning the NIST Contest: A scalable and general approach
  to differentially private synthetic data", Journal of Privacy and Confidentiality 11(3),
  arXiv:2108.04978 (MST: measure one- and two-way marginals with Gaussian noise, keep a
  maximum spanning tree of two-way marginals, generate rows from the tree model).
* Chow & Liu 1968, "Approximating discrete probability distributions with dependence
  trees", IEEE Trans. Information Theory 14(3): the best tree-structured approximation of a
  joint distribution is a maximum spanning tree of pairwise dependence.
* Dwork & Roth 2014, "The Algorithmic Foundations of Differential Privacy", Foundations and
  Trends in TCS 9(3-4): the Gaussian mechanism (Appendix A, Thm. A.1), post-processing
  (Prop. 2.1) and parallel composition over disjoint data. The exact (ε, δ) of Gaussian
  releases is computed by :mod:`common.accounting` (PRV/PLD), not by the loose textbook bound.
* Wang & Carreira-Perpiñán 2013, "Projection onto the probability simplex: An efficient
  algorithm with a simple proof", arXiv:1309.1541 (used to make noisy counts non-negative).
* Deming & Stephan 1940, "On a least squares adjustment of a sampled frequency table when the
  expected marginal totals are known", Ann. Math. Statist. 11(4) (iterative proportional
  fitting, used to make each tree edge's table agree with the one-way estimates).

Roles and data flow
-------------------
::

    orchestrator                         site (its own data, its own ledger)
    ────────────                         ──────────────────────────────────
    plan = marginal_plan(schema, ε, δ) ─▶ MeasurementPlan.from_dict(...)   (re-derives σ → ε)
                                         ledger.charge(plan.events)         (write-ahead)
                                      ◀─ measure_site(data, schema, plan, rng)  → dict
    combined = combine([dict, dict, …])
    fit_and_sample(combined, schema, rows=…, rng=…) → pandas.DataFrame

Everything that crosses a process boundary is a JSON-safe ``dict`` (``Schema.to_dict``,
``MeasurementPlan.to_dict``, the measurement returned by :func:`measure_site`, the output of
:func:`combine`): only strings, finite floats, ints, lists and dicts. This module imports no
transport code. A site's rows never leave it: a measurement holds noisy counts only.

Schema and discretisation
-------------------------
A :class:`Schema` is a tuple of :class:`ColumnSchema`. It is *declared* in each site's config
(and the same declaration is given to the orchestrator): bounds and categories are public
choices, never learned from the private data, because a bound taken from the data (its minimum
or maximum) is itself a disclosure that no noise covers. :func:`infer_schema` looks at data and
is therefore only a helper for drafting site configs and for tests; it must never run on the
orchestrator or feed a release without review.

* ``numeric`` (``bounds=(lo, hi)``, ``bins=b``): values are clipped to ``[lo, hi]`` (±∞ too),
  then cut into ``b`` equal-width bins; ``hi`` falls in the last bin. A missing or non-numeric
  value is refused (:class:`~common.errors.InvalidSpecError` naming the column only), since no
  bin is declared for it. Decoding draws uniformly inside the bin.
* ``categorical`` (``categories=(c₀, …, c_{k-1})``, JSON scalars): value ``cᵢ`` is bin ``i``;
  any other value, including a missing one, goes to the reserved **"other"** bin ``k``, so
  ``bins == k + 1`` always. Matching is Python equality (``1 == 1.0``; ``"1" != 1``).
  Decoding bin ``i`` gives ``cᵢ``; the "other" bin decodes to a missing value (``None``, which
  pandas shows as ``NaN`` in a string or float column), because the values it stands for are
  exactly the ones that must not be published.

No error message, and no exception chained to one, ever contains a data value: messages name
columns (schema, not data) and shapes only.

What a site measures (the DP analysis)
--------------------------------------
The plan lists marginals: every one-way marginal and the two-way marginals of the chosen
pairs (all pairs by default). The marginal of columns ``S`` is the vector of counts of rows per
cell of the discretised domain of ``S``. Neighbouring datasets differ by adding or removing one
row (as in :mod:`common.accounting`). Every row falls in exactly one cell of every marginal
(numeric values are clipped, unmatched categories go to "other", rows with missing numeric
values are refused before anything is released), so adding or removing a row changes each
marginal's count vector by 1 in exactly one cell: L2 (and L1) sensitivity 1.

Each cell of marginal ``k`` gets independent noise ``N(0, σ_k²)``: marginal ``k`` alone is the
Gaussian mechanism with sensitivity 1 and noise multiplier ``σ_k``, ``DpEvent(σ_k, 1.0, 1)``,
and the ``m`` marginals compose to ``DpEvent(σ, 1.0, m)`` when all share ``σ`` (equivalently:
one Gaussian mechanism on the concatenated vector, L2 sensitivity ``√m``, noise ``σ``).
:attr:`MeasurementPlan.events` groups the marginals by ``σ`` this way, and
:attr:`MeasurementPlan.epsilon` is :func:`~common.accounting.compute_epsilon` of those events.

Budget split (``one_way_share`` of :func:`marginal_plan`). Gaussian mechanisms with
sensitivity 1 and noises ``σ_k`` compose *exactly* to one Gaussian mechanism with
``1/σ_eff² = Σ_k 1/σ_k²`` (the privacy loss of each is ``N(μ_k²/2, μ_k²)`` with
``μ_k = 1/σ_k``, and independent normal losses add). So the budget is a total "precision"
``1/σ_eff²`` (proportional to zCDP's ρ) to share out:

* ``one_way_share=None`` (default): one ``σ`` for every marginal, calibrated with
  ``calibrate_noise_multiplier(target_epsilon=ε, sample_rate=1.0, steps=m, delta=δ)``. The
  one-way marginals then hold ``d/m`` of the precision. With all pairs measured, each column's
  one-way counts are also estimated from its ``d-1`` pair tables, so no dedicated share is
  needed.
* ``one_way_share=s`` in ``(0, 1)``: MST's split (McKenna et al. use ``s = 1/3``):
  ``σ_eff`` from ``calibrate_noise_multiplier(..., steps=1)``, then
  ``σ₁ = σ_eff·√(d/s)`` for the ``d`` one-way and ``σ₂ = σ_eff·√(p/(1-s))`` for the ``p``
  two-way marginals, so ``d/σ₁² + p/σ₂² = 1/σ_eff²``. The composed events are re-accounted and
  both σ raised by 0.1% steps until the accountant's bound is ≤ ε (numerical slack only).
* ``one_way_share=0``: only two-way marginals are measured (every column must be in a pair).

Calibration is conservative (see :func:`~common.accounting.calibrate_noise_multiplier`):
``plan.epsilon ≤ target_epsilon``, always re-checked when a plan is built or parsed.

Federation. Sites hold disjoint rows, so a row's guarantee is the ε of *its own* site's
measurement (parallel composition): each site charges ``plan.events`` to its ledger, and sites
may use different budgets (different σ) for the same marginals. Everything after the noise,
i.e. summing across sites, estimation, tree selection and sampling, is post-processing of the
noisy counts with the public schema (Dwork & Roth, Prop. 2.1), so the synthetic table has the
same guarantee and costs nothing more. Unlike MST, pairs are not selected privately on one
dataset (that would need every site's data in one place); all candidate pairs are measured
and the tree is chosen from the noisy sums.

Plans arriving from the orchestrator are data: :meth:`MeasurementPlan.from_dict` recomputes
the events and ε from the marginals and σ (it never trusts a claimed ε), and
:func:`measure_site` refuses a plan whose schema differs from the site's own declaration.

Noise is drawn through :func:`common.noise.gaussian_np`: from the caller's
:class:`numpy.random.Generator` (in production seeded from OS entropy,
``np.random.default_rng(secrets.randbits(128))``), or, where the site's policy sets
``secure_noise``, from a ChaCha20 CSPRNG with Opacus' countermeasure to floating-point attacks
(see :mod:`common.noise`).

Combination and estimation (orchestrator, post-processing)
----------------------------------------------------------
:func:`combine` sums each marginal's noisy counts over sites; the noise variance of every cell
is the sum of the sites' ``σ²`` and is recorded per marginal. :func:`fit_tree` then

1. estimates the total ``N̂`` as the inverse-variance weighted mean of the marginals' sums;
2. estimates each column's one-way counts as the inverse-variance weighted mean of its direct
   measurement and the row/column sums of every measured pair containing it, and projects the
   result onto ``{x ≥ 0, Σx = N̂}`` (Wang & Carreira-Perpiñán 2013), which removes negative
   counts and shrinks noise-only cells to zero;
3. weights each measured pair by MST's noisy L1 distance from independence,
   ``‖Y_ij − r_i r_jᵀ/N̂‖₁ − √(2/π)·σ_ij·cells`` (the subtracted term is the expected L1 norm of
   the noise, McKenna et al. 2021, Sec. 4), and keeps a maximum spanning tree by Kruskal's
   algorithm (Chow & Liu 1968). Pairs whose weight is not positive show no dependence above the
   noise and are dropped, so the "tree" may be a forest (its components are independent);
4. for each kept edge, denoises the noisy table by soft thresholding (Donoho & Johnstone 1994,
   "Ideal spatial adaptation by wavelet shrinkage", Biometrika 81(3)): every cell loses
   ``max(σ_ij, θ)`` and is clipped at zero, where ``θ`` is the threshold of the projection
   onto ``{T ≥ 0, ΣT = N̂}``. A cell below its own noise std is indistinguishable from an empty
   one, and in the tails of numeric columns such spurious cells would otherwise carry much of
   the correlation error. It then blends in 0.1% of the independent table (so no row or column
   is empty) and rakes the table to both columns' one-way estimates by iterative proportional
   fitting. The conditional of the child given the parent is that table's row normalised.

:meth:`TreeModel.sample` draws each component's root (its first column in schema order) from
its one-way estimate and each child from its conditional given the sampled parent, then decodes
bins to values. Columns keep the schema's names and order.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from numbers import Integral, Real
from typing import Any, Final, Literal, NotRequired, TypedDict, cast

import numpy as np
import numpy.typing as npt
import pandas as pd

from common import noise
from common.accounting import (
    ACCOUNTANTS,
    DpEvent,
    calibrate_noise_multiplier,
    compute_epsilon,
)
from common.errors import InvalidSpecError, InvalidUpdateError, PrivacyAccountingError

__all__ = [
    "DEFAULT_BINS",
    "MAX_BINS",
    "MAX_MARGINAL_CELLS",
    "Category",
    "ColumnDict",
    "ColumnKind",
    "ColumnSchema",
    "DpEventDict",
    "MarginalDict",
    "MeasurementDict",
    "MeasurementPlan",
    "PlanDict",
    "PlannedMarginal",
    "PlannedMarginalDict",
    "Schema",
    "SchemaDict",
    "TreeModel",
    "combine",
    "fit_and_sample",
    "fit_tree",
    "infer_schema",
    "marginal_plan",
    "measure_site",
    "measurement_events",
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


# --------------------------------------------------------------------------- wire shapes
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


class DpEventDict(TypedDict):
    noise_multiplier: float
    sample_rate: float
    steps: int


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


# --------------------------------------------------------------------------- small checks


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


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class ColumnSchema:
    """How one column is discretised: declared in the site config, never learned from data.

    ``bins`` is the size of the column's discretised domain: for ``numeric`` the number of
    equal-width bins over ``bounds`` (at least 2); for ``categorical`` always
    ``len(categories) + 1``, the last bin being the reserved "other" bin (pass 0 to have it
    filled in). See the module docstring for clipping, unknown values and decoding.
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
        """Bin index of each value (1-D array-like); see the module docstring.

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


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PlannedMarginal:
    """One marginal to measure: one or two column names and the noise std of every cell."""

    columns: tuple[str, ...]
    noise_std: float

    def __post_init__(self) -> None:
        cols = tuple(self.columns)
        if len(cols) not in (1, 2) or not all(isinstance(c, str) for c in cols):
            raise InvalidSpecError("A marginal names one or two columns.")
        if len(cols) == 2 and cols[0] == cols[1]:
            raise InvalidSpecError(f"A two-way marginal needs two columns, got {cols[0]!r} twice.")
        std = _finite_float(self.noise_std, f"The noise std of marginal {list(cols)}")
        if std <= 0:
            raise InvalidSpecError(f"The noise std of marginal {list(cols)} must be positive.")
        object.__setattr__(self, "columns", cols)
        object.__setattr__(self, "noise_std", std)


@dataclass(frozen=True)
class MeasurementPlan:
    """What one site measures and with how much noise; built by :func:`marginal_plan`.

    ``epsilon`` is not an input: it is recomputed from :attr:`events` with ``accountant``
    whenever a plan is built (also by :meth:`from_dict`), and a plan whose ε exceeds
    ``target_epsilon`` cannot exist.
    """

    schema: Schema
    marginals: tuple[PlannedMarginal, ...]
    target_epsilon: float
    delta: float
    accountant: str = "prv"
    epsilon: float = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.schema, Schema):
            raise InvalidSpecError("A measurement plan needs a Schema.")
        marginals = tuple(self.marginals)
        if not all(isinstance(m, PlannedMarginal) for m in marginals):
            raise InvalidSpecError("A plan's marginals must be PlannedMarginal instances.")
        if not marginals:
            raise InvalidSpecError("A plan measures at least one marginal.")
        names = set(self.schema.names)
        seen: set[frozenset[str]] = set()
        covered: set[str] = set()
        for m in marginals:
            unknown = [c for c in m.columns if c not in names]
            if unknown:
                raise InvalidSpecError(f"The plan measures undeclared column(s) {unknown}.")
            key = frozenset(m.columns)
            if key in seen:
                raise InvalidSpecError(f"The plan measures marginal {list(m.columns)} twice.")
            seen.add(key)
            covered.update(m.columns)
            cells = math.prod(self.schema.column(c).bins for c in m.columns)
            if cells > MAX_MARGINAL_CELLS:
                raise InvalidSpecError(
                    f"Marginal {list(m.columns)} has {cells:,} cells; at most "
                    f"{MAX_MARGINAL_CELLS:,} are allowed."
                )
        uncovered = [n for n in self.schema.names if n not in covered]
        if uncovered:
            raise InvalidSpecError(f"The plan measures no marginal of column(s) {uncovered}.")
        if self.accountant not in ACCOUNTANTS:
            raise InvalidSpecError(f"Unknown accountant {self.accountant!r}; use {ACCOUNTANTS}.")
        target = _finite_float(self.target_epsilon, "The target ε")
        delta = _finite_float(self.delta, "δ")
        if target <= 0 or not 0 < delta < 1:
            raise InvalidSpecError("A plan needs a positive target ε and δ in (0, 1).")
        object.__setattr__(self, "marginals", marginals)
        object.__setattr__(self, "target_epsilon", target)
        object.__setattr__(self, "delta", delta)
        eps = compute_epsilon(self.events, delta=delta, accountant=self.accountant).epsilon
        if eps > target:
            raise InvalidSpecError(
                f"The plan's noise gives ε={eps:.6g} at δ={delta:g}, above its target ε={target:g}."
            )
        object.__setattr__(self, "epsilon", eps)

    @property
    def events(self) -> tuple[DpEvent, ...]:
        """The DP events one site charges: ``DpEvent(σ, 1.0, #marginals with std σ)`` per σ."""
        counts: dict[float, int] = {}
        for m in self.marginals:
            counts[m.noise_std] = counts.get(m.noise_std, 0) + 1
        return tuple(DpEvent(s, 1.0, n) for s, n in sorted(counts.items()))

    def to_dict(self) -> PlanDict:
        """JSON-safe form (``epsilon`` is informative; :meth:`from_dict` recomputes it)."""
        return {
            "format": _PLAN_FORMAT,
            "version": _VERSION,
            "schema": self.schema.to_dict(),
            "marginals": [
                {"columns": list(m.columns), "noise_std": m.noise_std} for m in self.marginals
            ],
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "epsilon": self.epsilon,
        }

    @classmethod
    def from_dict(cls, raw: object) -> MeasurementPlan:
        """Parse a plan from the wire; its ε is recomputed from the σ, never trusted."""
        d = _mapping(
            raw,
            "A measurement plan",
            {"format", "version", "schema", "marginals", "target_epsilon", "delta", "accountant"},
            {"epsilon"},
        )
        _check_format(d, _PLAN_FORMAT, "A measurement plan")
        if not isinstance(d["marginals"], list | tuple):
            raise InvalidSpecError("A plan's marginals must be a list.")
        marginals = []
        for item in d["marginals"]:
            m = _mapping(item, "A planned marginal", {"columns", "noise_std"}, set())
            if not isinstance(m["columns"], list | tuple):
                raise InvalidSpecError("A planned marginal's columns must be a list.")
            marginals.append(PlannedMarginal(tuple(m["columns"]), m["noise_std"]))
        return cls(
            schema=Schema.from_dict(d["schema"]),
            marginals=tuple(marginals),
            target_epsilon=d["target_epsilon"],
            delta=d["delta"],
            accountant=d["accountant"],
        )


def marginal_plan(
    schema: Schema,
    *,
    target_epsilon: float,
    delta: float,
    pairs: Sequence[tuple[str, str]] | None = None,
    one_way_share: float | None = None,
    accountant: str = "prv",
) -> MeasurementPlan:
    """Plan one site's measurement so that all of it costs at most ``target_epsilon``.

    Measures every one-way marginal (unless ``one_way_share == 0``) and the two-way marginals
    of ``pairs`` (default: all pairs of columns, in schema order). The noise is calibrated as
    the module docstring's "Budget split" says; ``plan.epsilon ≤ target_epsilon`` at ``delta``
    with ``accountant``. Raises :class:`InvalidSpecError` on a bad schema, pair or share, and
    :class:`PrivacyAccountingError` if no σ up to the calibrator's limit meets the target.
    """
    if not isinstance(schema, Schema):
        raise InvalidSpecError("marginal_plan needs a Schema.")
    names = schema.names
    if pairs is None:
        pair_list = list(combinations(names, 2))
    else:
        order = {n: i for i, n in enumerate(names)}
        pair_list = []
        for p in pairs:
            if len(p) != 2 or p[0] not in order or p[1] not in order or p[0] == p[1]:
                raise InvalidSpecError(f"Pair {list(p)} must name two different declared columns.")
            pair_list.append((p[0], p[1]) if order[p[0]] < order[p[1]] else (p[1], p[0]))
        if len(set(pair_list)) != len(pair_list):
            raise InvalidSpecError("A pair is listed twice.")
    share = None if one_way_share is None else float(one_way_share)
    if share is not None and not 0.0 <= share < 1.0:
        raise InvalidSpecError(f"one_way_share must be in [0, 1), got {one_way_share}.")
    if share is not None and not pair_list:
        raise InvalidSpecError("one_way_share needs at least one pair to share the budget with.")
    target = _finite_float(target_epsilon, "The target ε")
    one_way = [] if share == 0.0 else [(n,) for n in names]

    def calibrate(steps: int) -> float:
        return calibrate_noise_multiplier(
            target_epsilon=target,
            sample_rate=1.0,
            steps=steps,
            delta=delta,
            accountant=accountant,
        )

    if share is None or share == 0.0:
        cols: list[tuple[str, ...]] = [*one_way, *pair_list]
        sigma = calibrate(len(cols))
        return MeasurementPlan(
            schema=schema,
            marginals=tuple(PlannedMarginal(c, sigma) for c in cols),
            target_epsilon=target,
            delta=delta,
            accountant=accountant,
        )
    # Exact Gaussian composition: d/σ₁² + p/σ₂² = 1/σ_eff² (module docstring).
    sigma_eff = calibrate(1)
    sigma_1 = sigma_eff * math.sqrt(len(one_way) / share)
    sigma_2 = sigma_eff * math.sqrt(len(pair_list) / (1.0 - share))
    for _ in range(_MAX_SIGMA_INFLATIONS):
        events = [DpEvent(sigma_1, 1.0, len(one_way)), DpEvent(sigma_2, 1.0, len(pair_list))]
        if compute_epsilon(events, delta=delta, accountant=accountant).epsilon <= target:
            return MeasurementPlan(
                schema=schema,
                marginals=(
                    *(PlannedMarginal(c, sigma_1) for c in one_way),
                    *(PlannedMarginal(c, sigma_2) for c in pair_list),
                ),
                target_epsilon=target,
                delta=delta,
                accountant=accountant,
            )
        sigma_1, sigma_2 = sigma_1 * 1.001, sigma_2 * 1.001
    raise PrivacyAccountingError(
        f"Could not split the budget ε={target:g} at δ={delta:g} between the one- and "
        "two-way marginals within the accountant's numerical error."
    )


# --------------------------------------------------------------------------- site side


def _counts(codes: IntArray, schema: Schema, columns: tuple[str, ...]) -> IntArray:
    """Exact counts of one marginal, flattened in C order over ``columns``."""
    flat = np.zeros(codes.shape[0], dtype=np.int64)
    size = 1
    for name in columns:
        b = schema.column(name).bins
        flat = flat * b + codes[:, schema.index(name)]
        size *= b
    return np.bincount(flat, minlength=size).astype(np.int64)


def measure_site(
    data: Any, schema: Schema, plan: MeasurementPlan, rng: np.random.Generator
) -> MeasurementDict:
    """The site's release: every planned marginal's counts plus ``N(0, σ²)`` per cell.

    ``data`` is a DataFrame (columns by name) or a 2-D array (columns in schema order);
    ``schema`` is the site's own declaration, and a plan for any other schema is refused.
    The caller charges ``plan.events`` to the site's ledger *before* the result leaves the
    site. The result is JSON-safe: ``{"format", "version", "schema_fingerprint", "sites": 1,
    "marginals": [{"columns", "shape", "counts", "variance"}], "events", "epsilon", "delta",
    "accountant"}``, where ``counts`` is flat in C order over ``shape`` and ``variance`` is
    ``σ²`` of every cell. Exact counts, row numbers and values never appear in it or in errors.
    """
    if not isinstance(plan, MeasurementPlan) or not isinstance(schema, Schema):
        raise InvalidSpecError("measure_site needs the site's Schema and a MeasurementPlan.")
    if plan.schema.fingerprint() != schema.fingerprint():
        raise InvalidSpecError(
            "The plan is for a different schema than the one this site declares; refused."
        )
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator.")
    codes = schema.encode(data)
    out: list[MarginalDict] = []
    for m in plan.marginals:
        exact = _counts(codes, schema, m.columns)
        noisy = exact + noise.gaussian_np(rng, m.noise_std, exact.shape[0])
        out.append(
            {
                "columns": list(m.columns),
                "shape": [schema.column(c).bins for c in m.columns],
                "counts": [float(v) for v in noisy],
                "variance": m.noise_std**2,
            }
        )
    return {
        "format": _MEASUREMENT_FORMAT,
        "version": _VERSION,
        "schema_fingerprint": schema.fingerprint(),
        "sites": 1,
        "marginals": out,
        "events": [
            {"noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate, "steps": e.steps}
            for e in plan.events
        ],
        "epsilon": plan.epsilon,
        "delta": plan.delta,
        "accountant": plan.accountant,
    }


# --------------------------------------------------------------------------- orchestrator side


@dataclass(frozen=True)
class _Marginal:
    columns: tuple[str, ...]
    shape: tuple[int, ...]
    counts: FloatArray
    variance: float


_MEASUREMENT_REQUIRED: Final = {"format", "version", "schema_fingerprint", "sites", "marginals"}
_MEASUREMENT_OPTIONAL: Final = {"events", "epsilon", "delta", "accountant"}


def _parse_measurement(raw: object, what: str) -> tuple[str, int, list[_Marginal]]:
    try:
        d = _mapping(raw, what, set(_MEASUREMENT_REQUIRED), set(_MEASUREMENT_OPTIONAL))
        _check_format(d, _MEASUREMENT_FORMAT, what)
    except InvalidSpecError as err:
        raise InvalidUpdateError(str(err)) from None
    fp, sites, items = d["schema_fingerprint"], d["sites"], d["marginals"]
    if not isinstance(fp, str):
        raise InvalidUpdateError(f"{what}: schema_fingerprint must be a string.")
    if isinstance(sites, bool) or not isinstance(sites, int) or sites < 1:
        raise InvalidUpdateError(f"{what}: sites must be a positive integer.")
    if not isinstance(items, list | tuple) or not items:
        raise InvalidUpdateError(f"{what}: marginals must be a non-empty list.")
    parsed = []
    for item in items:
        try:
            m = _mapping(
                item, f"{what}: a marginal", {"columns", "shape", "counts", "variance"}, set()
            )
        except InvalidSpecError as err:
            raise InvalidUpdateError(str(err)) from None
        cols, shape, variance = m["columns"], m["shape"], m["variance"]
        if (
            not isinstance(cols, list | tuple)
            or len(cols) not in (1, 2)
            or not all(isinstance(c, str) for c in cols)
        ):
            raise InvalidUpdateError(f"{what}: a marginal must name one or two columns.")
        if (
            not isinstance(shape, list | tuple)
            or len(shape) != len(cols)
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in shape)
        ):
            raise InvalidUpdateError(f"{what}: marginal {list(cols)} has a malformed shape.")
        if not _is_number(variance) or not (math.isfinite(variance) and variance > 0):
            raise InvalidUpdateError(f"{what}: marginal {list(cols)} needs a positive variance.")
        try:
            counts = np.asarray(m["counts"], dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidUpdateError(
                f"{what}: marginal {list(cols)} has non-numeric counts."
            ) from None
        if counts.shape != (math.prod(shape),) or not np.isfinite(counts).all():
            raise InvalidUpdateError(
                f"{what}: marginal {list(cols)} needs {math.prod(shape)} finite counts."
            )
        parsed.append(_Marginal(tuple(cols), tuple(shape), counts, float(variance)))
    return fp, sites, parsed


def measurement_events(measurement: Mapping[str, Any]) -> tuple[DpEvent, ...]:
    """The DP events a site reported with its measurement (for the model card)."""
    raw = measurement.get("events")
    if not isinstance(raw, list | tuple):
        raise InvalidUpdateError("The measurement carries no list of DP events.")
    events = []
    for e in raw:
        try:
            d = _mapping(e, "A DP event", {"noise_multiplier", "sample_rate", "steps"}, set())
            events.append(DpEvent(d["noise_multiplier"], d["sample_rate"], d["steps"]))
        except (InvalidSpecError, ValueError) as err:
            raise InvalidUpdateError(f"Malformed DP event in a measurement: {err}") from None
    return tuple(events)


def combine(measurements: Sequence[Mapping[str, Any]]) -> MeasurementDict:
    """Sum the sites' noisy marginals (post-processing); noise variances add per cell.

    Every measurement must be for the same schema (fingerprint) and the same marginals in the
    same order; sites may have used different σ. Already combined dicts may be combined again.
    The result has the measurement format with ``sites`` summed and no events. Raises
    :class:`InvalidUpdateError` for malformed or mismatched input.
    """
    if isinstance(measurements, Mapping) or not measurements:
        raise InvalidUpdateError("combine needs a non-empty sequence of measurements.")
    first_fp, total_sites, first = _parse_measurement(measurements[0], "Measurement 1")
    counts = [m.counts.copy() for m in first]
    variance = [m.variance for m in first]
    for k, raw in enumerate(measurements[1:], start=2):
        fp, sites, parsed = _parse_measurement(raw, f"Measurement {k}")
        if fp != first_fp:
            raise InvalidUpdateError(f"Measurement {k} is for a different schema.")
        layout = [(m.columns, m.shape) for m in parsed]
        if layout != [(m.columns, m.shape) for m in first]:
            raise InvalidUpdateError(f"Measurement {k} measured different marginals.")
        total_sites += sites
        for i, m in enumerate(parsed):
            counts[i] += m.counts
            variance[i] += m.variance
    return {
        "format": _MEASUREMENT_FORMAT,
        "version": _VERSION,
        "schema_fingerprint": first_fp,
        "sites": total_sites,
        "marginals": [
            {
                "columns": list(m.columns),
                "shape": list(m.shape),
                "counts": [float(v) for v in c],
                "variance": v,
            }
            for m, c, v in zip(first, counts, variance, strict=True)
        ],
    }


def _project_simplex(y: FloatArray, total: float) -> FloatArray:
    """Euclidean projection of ``y`` onto ``{x ≥ 0, Σx = total}`` (Wang & Carreira-Perpiñán)."""
    u = np.sort(y)[::-1]
    css = np.cumsum(u) - total
    ind = np.arange(1, y.size + 1)
    rho = int(np.nonzero(u - css / ind > 0)[0][-1])
    theta = float(css[rho]) / (rho + 1)
    return np.maximum(y - theta, 0.0)


def _rake(table: FloatArray, rows: FloatArray, cols: FloatArray) -> FloatArray:
    """Iterative proportional fitting of a positive table to row and column sums."""
    t = table.copy()
    for _ in range(_IPF_MAX_ITERATIONS):
        t *= (rows / t.sum(axis=1))[:, None]
        t *= (cols / t.sum(axis=0))[None, :]
        if np.abs(t.sum(axis=1) - rows).max() <= _IPF_TOLERANCE * max(rows.sum(), 1.0):
            break
    return t


@dataclass(frozen=True, eq=False)
class TreeModel:
    """A tree- (or forest-) structured distribution over the discretised columns.

    ``one_way[i]`` is column ``i``'s estimated distribution; ``edges`` are ``(parent, child)``
    names in sampling order (every parent is a root or an earlier child); ``conditionals[k]``
    is the table ``P(child = j | parent = i)`` of edge ``k``, shape (parent bins, child bins);
    ``weights`` maps each measured pair (schema order) to its debiased L1 weight; ``total``
    is the estimated number of rows behind the measurements (a noisy post-processed value).
    """

    schema: Schema
    total: float
    one_way: tuple[FloatArray, ...]
    edges: tuple[tuple[str, str], ...]
    conditionals: tuple[FloatArray, ...]
    weights: Mapping[tuple[str, str], float]

    def sample(self, rows: int, rng: np.random.Generator) -> pd.DataFrame:
        """``rows`` synthetic rows, decoded, with the schema's column names and order."""
        if isinstance(rows, bool) or not isinstance(rows, Integral) or rows < 1:
            raise ValueError(f"rows must be a positive integer, got {rows!r}.")
        n = int(rows)
        codes = np.full((n, len(self.schema.columns)), -1, dtype=np.int64)
        children = {child for _, child in self.edges}
        for j, p in enumerate(self.one_way):
            if self.schema.names[j] not in children:
                codes[:, j] = rng.choice(p.size, size=n, p=p)
        for (parent, child), cond in zip(self.edges, self.conditionals, strict=True):
            given = codes[:, self.schema.index(parent)]
            cdf = np.cumsum(cond, axis=1)
            cdf[:, -1] = 1.0
            u = rng.random(n)
            codes[:, self.schema.index(child)] = (u[:, None] >= cdf[given]).sum(axis=1)
        return self.schema.decode(codes, rng)


def fit_tree(combined: Mapping[str, Any], schema: Schema) -> TreeModel:
    """Estimate a :class:`TreeModel` from combined noisy marginals (post-processing only).

    See "Combination and estimation" in the module docstring. ``schema`` is the declared
    schema; the measurements must carry its fingerprint and match its domain sizes.
    """
    fp, _, marginals = _parse_measurement(combined, "The combined measurement")
    if fp != schema.fingerprint():
        raise InvalidUpdateError("The combined measurement is for a different schema.")
    names = schema.names
    by_cols: dict[tuple[str, ...], _Marginal] = {}
    for m in marginals:
        if any(c not in names for c in m.columns) or len(set(m.columns)) != len(m.columns):
            raise InvalidUpdateError(f"Marginal {list(m.columns)} does not fit the schema.")
        if m.shape != tuple(schema.column(c).bins for c in m.columns):
            raise InvalidUpdateError(f"Marginal {list(m.columns)} has the wrong shape.")
        key = tuple(sorted(m.columns, key=names.index))
        if key in by_cols:
            raise InvalidUpdateError(f"Marginal {list(m.columns)} is measured twice.")
        by_cols[key] = _Marginal(
            key, tuple(schema.column(c).bins for c in key), _oriented(m, key), m.variance
        )

    # 1. Total: inverse-variance weighted mean of every marginal's sum.
    totals = np.array([m.counts.sum() for m in by_cols.values()])
    total_var = np.array([m.variance * m.counts.size for m in by_cols.values()])
    n_hat = max(float(np.sum(totals / total_var) / np.sum(1.0 / total_var)), 1.0)

    # 2. One-way counts: inverse-variance weighted over every measurement covering a column.
    one_way_counts: list[FloatArray] = []
    for j, name in enumerate(names):
        estimates: list[tuple[FloatArray, float]] = []
        for key, m in by_cols.items():
            if name not in key:
                continue
            if len(key) == 1:
                estimates.append((m.counts, m.variance))
            else:
                table = m.counts.reshape(m.shape)
                axis = 1 if key[0] == name else 0
                estimates.append((table.sum(axis=axis), m.variance * m.shape[axis]))
        if not estimates:
            raise InvalidUpdateError(f"No measured marginal covers column {names[j]!r}.")
        weight = np.array([1.0 / v for _, v in estimates])
        mean = sum(w * y for w, (y, _) in zip(weight, estimates, strict=True)) / weight.sum()
        one_way_counts.append(_project_simplex(np.asarray(mean, dtype=np.float64), n_hat))

    # 3. Debiased L1 distance from independence; maximum spanning forest by Kruskal.
    weights: dict[tuple[str, str], float] = {}
    for key, m in by_cols.items():
        if len(key) != 2:
            continue
        a, b = names.index(key[0]), names.index(key[1])
        indep = np.outer(one_way_counts[a], one_way_counts[b]) / n_hat
        l1 = float(np.abs(m.counts.reshape(m.shape) - indep).sum())
        bias = math.sqrt(2.0 / math.pi) * math.sqrt(m.variance) * m.counts.size
        weights[(key[0], key[1])] = l1 - bias
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    adjacency: dict[str, list[str]] = {n: [] for n in names}
    order = sorted(weights, key=lambda k: (-weights[k], names.index(k[0]), names.index(k[1])))
    for u, v in order:
        if weights[(u, v)] <= 0:
            break
        ru, rv = find(names.index(u)), find(names.index(v))
        if ru != rv:
            parent[ru] = rv
            adjacency[u].append(v)
            adjacency[v].append(u)

    # 4. Orient from each component's first column; rake each edge table to the one-way sums.
    edges: list[tuple[str, str]] = []
    conditionals: list[FloatArray] = []
    visited: set[str] = set()
    for root in names:
        if root in visited:
            continue
        visited.add(root)
        queue = [root]
        while queue:
            u = queue.pop(0)
            for v in sorted(adjacency[u], key=names.index):
                if v in visited:
                    continue
                visited.add(v)
                queue.append(v)
                edges.append((u, v))
                conditionals.append(_edge_conditional(by_cols, names, one_way_counts, u, v, n_hat))
    return TreeModel(
        schema=schema,
        total=n_hat,
        one_way=tuple(c / c.sum() for c in one_way_counts),
        edges=tuple(edges),
        conditionals=tuple(conditionals),
        weights=weights,
    )


def _oriented(m: _Marginal, key: tuple[str, ...]) -> FloatArray:
    """The marginal's flat counts with axes in the order of ``key``."""
    if m.columns == key:
        return m.counts
    return np.ascontiguousarray(m.counts.reshape(m.shape).T).ravel()


def _edge_conditional(
    by_cols: Mapping[tuple[str, ...], _Marginal],
    names: tuple[str, ...],
    one_way_counts: Sequence[FloatArray],
    parent: str,
    child: str,
    n_hat: float,
) -> FloatArray:
    """``P(child | parent)`` from the noisy pair table made consistent with the one-ways."""
    forward = names.index(parent) < names.index(child)
    key = (parent, child) if forward else (child, parent)
    m = by_cols[key]
    table = m.counts.reshape(m.shape)
    if not forward:
        table = table.T
    rows = one_way_counts[names.index(parent)]
    cols = one_way_counts[names.index(child)]
    # Soft-threshold every cell by max(σ, θ), θ being the simplex projection's threshold.
    simplex = _project_simplex(table.ravel(), n_hat).reshape(table.shape)
    projected = np.minimum(simplex, np.maximum(table - math.sqrt(m.variance), 0.0))
    indep = np.outer(rows, cols) / n_hat
    raked = _rake(
        (1.0 - _INDEPENDENCE_BLEND) * projected + _INDEPENDENCE_BLEND * indep + 1e-12,
        rows + 1e-12,
        cols + 1e-12,
    )
    cond = raked / raked.sum(axis=1, keepdims=True)
    return np.asarray(cond, dtype=np.float64)


def fit_and_sample(
    combined: Mapping[str, Any], schema: Schema, *, rows: int, rng: np.random.Generator
) -> pd.DataFrame:
    """``rows`` synthetic rows from combined measurements: :func:`fit_tree` then sample."""
    return fit_tree(combined, schema).sample(rows, rng)
