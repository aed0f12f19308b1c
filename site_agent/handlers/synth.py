"""``synth``: the site's side of federated DP synthetic data (``orchestrator synth``).

The site builds the measurement schema from its *declared* column types and bounds (never
from the data; ``columns``, ``feature_bounds`` and ``num_classes`` in ``site.yaml``), plans
the marginals for the requested ε (``common.synthesis.marginals.marginal_plan``), admits and
charges them to its ledger, then releases the noisy marginal counts of the rows as typed at
load (``common.schema.table``). Every column asked for, the label included, must be declared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from common.domain import ColumnInfo, TaskAssignment
from common.dp import noise
from common.errors import InvalidSpecError, PolicyRefusal
from common.synthesis.discretisation import ColumnSchema, Schema
from common.synthesis.marginals import MeasurementPlan, marginal_plan, measure_site
from site_agent.boundary.admission import Release
from site_agent.boundary.disclosure import SiteContext
from site_agent.config import DatasetConfig
from site_agent.dask_engine import MarginalCounts, StatsEngine, add_marginals
from site_agent.data.loading import LocalDataset
from site_agent.handlers.base import Plan, Reply, TaskHandler, parse_request, reply

MAX_COLUMNS = 16


class SynthRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    target_epsilon: float = Field(gt=0.0, le=100.0)
    delta: float = Field(default=1e-5, gt=0.0, lt=0.01)
    bins: int = Field(default=8, ge=2, le=64)
    columns: tuple[str, ...] | None = Field(default=None, max_length=MAX_COLUMNS)


def _declared(cfg: DatasetConfig, name: str) -> ColumnInfo | None:
    if name == cfg.label:
        return cfg.label_schema()
    info = cfg.feature_schema([name])[0]
    if info.type == "numeric" and (info.min is None or info.max is None):
        return None
    return info


def site_schema(cfg: DatasetConfig, names: tuple[str, ...], bins: int) -> Schema:
    cols = []
    for name in names:
        info = _declared(cfg, name)
        if info is None:
            spec = cfg.columns.get(name)
            raise PolicyRefusal(
                f"column {name!r} of dataset {cfg.name!r} has no declared "
                + ("categories" if spec is not None and spec.type == "categorical" else "bounds")
                + " in this site's config; synthetic data needs every column declared"
            )
        if info.type == "categorical":
            cols.append(ColumnSchema.categorical(name, info.categories))
        else:
            assert info.min is not None and info.max is not None
            cols.append(ColumnSchema.numeric(name, lo=info.min, hi=info.max, bins=bins))
    return Schema(tuple(cols))


def _frame(data: LocalDataset, schema: Schema) -> pd.DataFrame:
    """The typed rows as measure_site reads them: declared categories as their text ("other"
    and missing as None, the "other" bin), numbers as they were clipped at load. A row with a
    missing number in a measured column is left out (a numeric marginal has no bin for it):
    a decision on that record alone."""
    out: dict[str, object] = {}
    keep = np.ones(len(data), dtype=bool)
    for col in schema.columns:
        name = col.name
        codes = data.labels if name == data.label_name else data.table.columns[name]
        if col.kind == "categorical":
            cats = np.array([*(str(c) for c in col.categories or ()), None], dtype=object)
            k = len(cats) - 1
            idx = np.where((codes >= 0) & (codes < k), codes, k).astype(np.int64)
            out[name] = cats[idx]
        else:
            values = np.asarray(codes, dtype=np.float64)
            keep &= ~np.isnan(values)
            out[name] = values
    return pd.DataFrame(out).loc[keep].reset_index(drop=True)


@dataclass(frozen=True)
class SynthPlan(Plan):
    request: SynthRequest
    schema: Schema
    marginals: MeasurementPlan
    engine: StatsEngine | None


class SynthHandler(TaskHandler[SynthPlan]):
    """Admit and charge the planned marginals, then release their noisy counts; with an
    engine (``engine: dask``) the exact counts are computed on the site's cluster after the
    charge (the same counts: ``tests/unit/test_dask_wiring.py``)."""

    kind = "synth"

    def plan(self, site: SiteContext, task: TaskAssignment) -> SynthPlan:
        req = parse_request(SynthRequest, task, source="synth request")
        cfg = site.datasets.config_of(task.dataset)
        shape = site.datasets.shape(task.dataset)
        available = (*shape.feature_names, shape.label)
        names = req.columns or available
        unknown = [n for n in names if n not in available]
        if unknown:
            raise InvalidSpecError(
                f"dataset {task.dataset!r} has no column(s) {', '.join(unknown)}"
            )
        if len(names) > MAX_COLUMNS:
            raise InvalidSpecError(
                f"dataset {task.dataset!r} has {len(names)} columns; choose at most {MAX_COLUMNS}"
            )
        schema = site_schema(cfg, tuple(names), req.bins)
        plan = marginal_plan(schema, target_epsilon=req.target_epsilon, delta=req.delta)
        release = Release(
            what=f"the synthetic-data marginals at ε={req.target_epsilon:g}",
            events=tuple(plan.events),
            delta=req.delta,
            kinds=("synth",),
        )
        return SynthPlan(release, req, schema, plan, site.datasets.engine(task.dataset))

    def run(self, site: SiteContext, task: TaskAssignment, plan: SynthPlan, blob: bytes) -> Reply:
        schema, marginal = plan.schema, plan.marginals
        if plan.engine is not None:
            marginals = tuple(m.columns for m in marginal.marginals)
            counts = plan.engine.fold(MarginalCounts(schema, marginals), None, add_marginals)
            if counts is None:  # no partition holds a row
                counts = [
                    np.zeros(int(np.prod([schema.column(c).bins for c in m])), np.int64)
                    for m in marginals
                ]
            rows = int(counts[0].sum()) if counts else 0  # each kept row counts once per marginal
            measurement = measure_site(
                None, schema, marginal, noise.private_numpy_rng(), counts=counts
            )
        else:
            split = site.datasets.split(task.dataset)
            frame = _frame(split.train, schema)
            if split.validation is not None:
                frame = pd.concat([frame, _frame(split.validation, schema)], ignore_index=True)
            rows = len(frame)
            measurement = measure_site(frame, schema, marginal, noise.private_numpy_rng())
        return reply(
            site,
            task,
            events=marginal.events,
            delta=plan.request.delta,
            num_examples=rows,
            result_json=json.dumps({"schema": schema.to_dict(), "measurement": measurement}),
            task_epsilon=marginal.epsilon,
            accountant=marginal.accountant,
        )
