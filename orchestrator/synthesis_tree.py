"""Orchestrator side of marginal-based synthesis: sum the sites' noisy measurements, fit a
tree model (MST-style, McKenna et al. 2021; Chow & Liu 1968) and sample rows from it.

Post-processing of the noisy counts with the public schema only (Dwork & Roth 2014,
Prop. 2.1), so it costs no budget. Estimation steps: docs/synthesis.md, "Combination and
estimation".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Final

import numpy as np
import pandas as pd

from common.dp.events import DpEvent, event_from_dict
from common.errors import InvalidSpecError, InvalidUpdateError
from common.synthesis.discretisation import (
    _INDEPENDENCE_BLEND,
    _IPF_MAX_ITERATIONS,
    _IPF_TOLERANCE,
    _MEASUREMENT_FORMAT,
    _VERSION,
    FloatArray,
    MeasurementDict,
    Schema,
    _check_format,
    _is_number,
    _mapping,
)

__all__ = [
    "TreeModel",
    "combine",
    "fit_and_sample",
    "fit_tree",
    "measurement_events",
]


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
            events.append(event_from_dict(d))
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

    See "Combination and estimation" in docs/synthesis.md. ``schema`` is the declared
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
