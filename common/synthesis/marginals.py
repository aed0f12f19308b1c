"""The measurement plan (which marginals, at which σ, for a target ε) and a site's noisy
measurement of it.

Every row is in exactly one cell of every marginal, so each marginal has L2 sensitivity 1 and
costs ``DpEvent(σ_k, 1.0, 1)``; :meth:`MeasurementPlan.from_dict` recomputes the events and ε
from the plan's σ (it never trusts a claimed ε). Derivation and budget split:
docs/synthesis.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from common.dp import noise
from common.dp.accounting import ACCOUNTANTS, compute_epsilon
from common.dp.calibrate import calibrate_noise_multiplier
from common.dp.events import DpEvent, event_to_dict
from common.errors import InvalidSpecError, PrivacyAccountingError
from common.synthesis.discretisation import (
    _MAX_SIGMA_INFLATIONS,
    _MEASUREMENT_FORMAT,
    _PLAN_FORMAT,
    _VERSION,
    MAX_MARGINAL_CELLS,
    IntArray,
    MarginalDict,
    MeasurementDict,
    PlanDict,
    Schema,
    _check_format,
    _finite_float,
    _mapping,
)

__all__ = [
    "MeasurementPlan",
    "PlannedMarginal",
    "default_marginals",
    "marginal_plan",
    "measure_site",
    "planned_events",
]


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


def _uniform_sigma(
    num_marginals: int, *, target_epsilon: float, delta: float, accountant: str
) -> float:
    """The one σ at which ``num_marginals`` Gaussian releases of sensitivity 1 cost at most
    ``target_epsilon`` together (q = 1, one step each)."""
    return calibrate_noise_multiplier(
        target_epsilon=target_epsilon,
        sample_rate=1.0,
        steps=num_marginals,
        delta=delta,
        accountant=accountant,
    )


def default_marginals(schema: Schema) -> list[tuple[str, ...]]:
    """The marginals of the default plan (:func:`marginal_plan` without ``pairs`` or
    ``one_way_share``), in the order a site measures them: every column, then every pair of
    columns in schema order. All share the σ of :func:`planned_events`."""
    names = schema.names
    return [*((n,) for n in names), *combinations(names, 2)]


def planned_events(
    num_columns: int, *, target_epsilon: float, delta: float, accountant: str = "prv"
) -> tuple[DpEvent, ...]:
    """What a site's default plan (:func:`marginal_plan` without ``pairs`` or
    ``one_way_share``: every one- and two-way marginal at one σ) charges for a schema of
    ``num_columns`` columns: ``(DpEvent(σ, 1.0, d + d(d−1)/2),)``.

    It depends on the column count and the request only, never on the bins, categories or
    rows, so the orchestrator computes it from the site's published catalog and charges it
    whatever the site reports (``orchestrator.synthesis``); ``tests/unit/test_synth.py``
    checks it equals the plan's events.

    Raises:
        InvalidSpecError: fewer than one column.
        PrivacyAccountingError: no σ up to the calibrator's limit meets the target.
    """
    if num_columns < 1:
        raise InvalidSpecError(
            f"A synthetic-data plan needs at least one column, got {num_columns}."
        )
    count = num_columns + num_columns * (num_columns - 1) // 2
    target = _finite_float(target_epsilon, "The target ε")
    sigma = _uniform_sigma(count, target_epsilon=target, delta=delta, accountant=accountant)
    return (DpEvent(sigma, 1.0, count),)


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
    docs/synthesis.md's "Budget split" says; ``plan.epsilon ≤ target_epsilon`` at ``delta``
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
        return _uniform_sigma(steps, target_epsilon=target, delta=delta, accountant=accountant)

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
    # Exact Gaussian composition: d/σ₁² + p/σ₂² = 1/σ_eff² (docs/synthesis.md).
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
    data: Any,
    schema: Schema,
    plan: MeasurementPlan,
    rng: np.random.Generator,
    *,
    counts: Sequence[IntArray] | None = None,
) -> MeasurementDict:
    """The site's release: every planned marginal's counts plus ``N(0, σ²)`` per cell.

    ``data`` is a DataFrame (columns by name) or a 2-D array (columns in schema order);
    ``schema`` is the site's own declaration, and a plan for any other schema is refused.
    The caller charges ``plan.events`` to the site's ledger *before* the result leaves the
    site. The result is JSON-safe: ``{"format", "version", "schema_fingerprint", "sites": 1,
    "marginals": [{"columns", "shape", "counts", "variance"}], "events", "epsilon", "delta",
    "accountant"}``, where ``counts`` is flat in C order over ``shape`` and ``variance`` is
    ``σ²`` of every cell. Exact counts, row numbers and values never appear in it or in errors.
    ``counts``: the plan's exact marginal counts (in plan order) computed elsewhere, the
    site's Dask cluster (``site_agent.dask_engine``); ``data`` is then not read.
    """
    if not isinstance(plan, MeasurementPlan) or not isinstance(schema, Schema):
        raise InvalidSpecError("measure_site needs the site's Schema and a MeasurementPlan.")
    if plan.schema.fingerprint() != schema.fingerprint():
        raise InvalidSpecError(
            "The plan is for a different schema than the one this site declares; refused."
        )
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator.")
    if counts is not None and len(counts) != len(plan.marginals):
        raise InvalidSpecError("measure_site needs one count vector per planned marginal.")
    if counts is None:
        codes = schema.encode(data)
        counts = [_counts(codes, schema, m.columns) for m in plan.marginals]
    out: list[MarginalDict] = []
    for m, exact in zip(plan.marginals, counts, strict=True):
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
        "events": [event_to_dict(e) for e in plan.events],
        "epsilon": plan.epsilon,
        "delta": plan.delta,
        "accountant": plan.accountant,
    }
