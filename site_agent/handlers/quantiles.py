"""``quantiles``: the site's side of DP quantile bin edges (a job's ``encoding.numeric: quantile``).

For each requested numeric column the site counts its rows in ``grid`` equal cells over the
column's *declared* ``[min, max]`` (values are clipped to the bounds when the schema is
applied; a missing cell is not counted) and releases the counts with Gaussian noise. Adding
or removing one record changes at most one count of each column, by one, so the released
vector of ``d`` columns has L2 sensitivity ``√d``; each count gets noise of standard
deviation ``σ·√d``: the Gaussian mechanism with noise multiplier ``σ`` (Dwork & Roth, "The
Algorithmic Foundations of Differential Privacy", 2014, §3.5.1 and Theorem A.1), one
``DpEvent(σ, q=1, steps=1)``. It is admitted and charged to the ledger before any count is
computed. The orchestrator sums the sites' counts and turns the noisy CDF into bin edges
(``orchestrator.training.quantiles``: post-processing).

The request names the columns with their bounds; the site refuses one that is not declared
here as numeric with exactly those bounds (a check of public inputs only).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from common.domain import ColumnInfo, TaskAssignment
from common.dp import noise
from common.dp.accounting import compute_epsilon
from common.dp.events import DpEvent
from common.errors import InvalidSpecError
from common.schema.table import TypedTable
from site_agent.boundary.admission import Release
from site_agent.boundary.disclosure import SiteContext
from site_agent.dask_engine import QuantileCounts, StatsEngine
from site_agent.handlers.base import Plan, Reply, TaskHandler, parse_request, reply

ACCOUNTANT = "prv"


class QuantileColumn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=200)
    min: float = Field(allow_inf_nan=False)
    max: float = Field(allow_inf_nan=False)


class QuantileRequest(BaseModel):
    """What the orchestrator may ask: which declared columns, how fine, how much noise."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    columns: tuple[QuantileColumn, ...] = Field(min_length=1, max_length=1024)
    grid: int = Field(ge=8, le=4096)
    noise_multiplier: float = Field(gt=0.0, le=1e6)
    delta: float = Field(gt=0.0, lt=0.01)


def sensitivity(num_columns: int) -> float:
    """L2 sensitivity of the counts of ``num_columns`` columns under add/remove of a record."""
    return math.sqrt(num_columns)


def histogram_counts(
    table: TypedTable, columns: Sequence[QuantileColumn], grid: int
) -> npt.NDArray[np.float64]:
    """``(len(columns), grid)`` counts of each column's non-missing values in ``grid`` equal
    cells of ``[min, max]`` (the top edge belongs to the last cell). Every value counts once,
    in one cell, whatever it is: values outside the bounds (or ±inf) fall in the end cells."""
    out = np.zeros((len(columns), grid), dtype=np.float64)
    for i, col in enumerate(columns):
        v = np.asarray(table.columns[col.name], dtype=np.float64)
        v = np.clip(v[~np.isnan(v)], col.min, col.max)
        span = col.max - col.min
        cell = (
            np.floor((v - col.min) / span * grid).astype(np.int64)
            if span > 0
            else np.zeros(v.shape, dtype=np.int64)
        )
        out[i] = np.bincount(np.clip(cell, 0, grid - 1), minlength=grid)
    return out


def _check_declared(req: QuantileRequest, declared: Sequence[ColumnInfo], dataset: str) -> None:
    by_name = {c.name: c for c in declared}
    for col in req.columns:
        mine = by_name.get(col.name)
        if mine is None or mine.type != "numeric" or (mine.min, mine.max) != (col.min, col.max):
            raise InvalidSpecError(
                f"The quantile request's column {col.name!r} is not declared at this site as a "
                f"numeric feature of dataset {dataset!r} with bounds [{col.min:g}, {col.max:g}]."
            )


@dataclass(frozen=True)
class QuantilePlan(Plan):
    request: QuantileRequest
    event: DpEvent
    engine: StatsEngine | None


class QuantilesHandler(TaskHandler[QuantilePlan]):
    """Admit, charge, then release the noised histograms of the requested columns; with an
    engine (``engine: dask``) the exact counts are computed on the site's cluster after the
    charge (the same counts: ``tests/unit/test_dask_wiring.py``)."""

    kind = "quantiles"

    def plan(self, site: SiteContext, task: TaskAssignment) -> QuantilePlan:
        req = parse_request(QuantileRequest, task, source="quantile request")
        cfg = site.datasets.config_of(task.dataset)
        declared = cfg.feature_schema(site.datasets.shape(task.dataset).feature_names)
        _check_declared(req, declared, task.dataset)
        event = DpEvent(noise_multiplier=req.noise_multiplier, sample_rate=1.0, steps=1)
        release = Release(
            what="the noised histograms for quantile bin edges",
            events=(event,),
            delta=req.delta,
            kinds=("quantiles",),
        )
        return QuantilePlan(release, req, event, site.datasets.engine(task.dataset))

    def run(
        self, site: SiteContext, task: TaskAssignment, plan: QuantilePlan, blob: bytes
    ) -> Reply:
        req = plan.request
        if plan.engine is not None:
            zero = np.zeros((len(req.columns), req.grid), dtype=np.float64)
            counts = plan.engine.fold(QuantileCounts(tuple(req.columns), req.grid), zero)
            shape = site.datasets.shape(task.dataset)
            rows = shape.num_train + (shape.num_validation or 0)
        else:
            split = site.datasets.split(task.dataset)
            train, val = split.train, split.validation
            table = train.table if val is None else TypedTable.concat([train.table, val.table])
            counts = histogram_counts(table, req.columns, req.grid)
            rows = table.num_rows
        std = req.noise_multiplier * sensitivity(len(req.columns))
        noised = counts + noise.gaussian_np(noise.private_numpy_rng(), std, counts.shape)
        result = {
            "grid": req.grid,
            "histograms": {c.name: noised[i].tolist() for i, c in enumerate(req.columns)},
        }
        eps = compute_epsilon([plan.event], delta=req.delta, accountant=ACCOUNTANT)
        return reply(
            site,
            task,
            events=[plan.event],
            delta=req.delta,
            num_examples=max(1, rows),
            result_json=json.dumps(result),
            task_epsilon=eps.epsilon,
            accountant=eps.accountant,
        )
