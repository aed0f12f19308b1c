"""The site's side of federated DP synthetic data (``orchestrator synth``).

The site builds the measurement schema from its *declared* column types and bounds (never
from the data), plans the marginals for the requested ε (``common.synth.marginal_plan``),
admits and charges them to its ledger, then releases the noisy marginal counts. Every column
asked for, the label included, must be declared in ``site.yaml`` under ``columns``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from common import noise
from common.domain import TaskAssignment, UpdateMeta
from common.errors import InvalidSpecError, PolicyRefusal
from common.synth import ColumnSchema, Schema, marginal_plan, measure_site
from site_agent.budget import admit_and_charge, parse_request, release_update
from site_agent.config import DatasetConfig, SiteConfig
from site_agent.data import LocalDataset
from site_agent.ledger import Ledger

MAX_COLUMNS = 16


class SynthRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    target_epsilon: float = Field(gt=0.0, le=100.0)
    delta: float = Field(default=1e-5, gt=0.0, lt=0.01)
    bins: int = Field(default=8, ge=2, le=64)
    columns: tuple[str, ...] | None = Field(default=None, max_length=MAX_COLUMNS)


def site_schema(cfg: DatasetConfig, names: tuple[str, ...], bins: int) -> Schema:
    cols = []
    for name in names:
        spec = cfg.columns.get(name)
        if spec is None or (spec.type == "numeric" and spec.min is None):
            raise PolicyRefusal(
                f"column {name!r} of dataset {cfg.name!r} has no declared "
                + ("categories" if spec is not None and spec.type == "categorical" else "bounds")
                + " in this site's config; synthetic data needs every column declared"
            )
        if spec.type == "categorical":
            cols.append(ColumnSchema.categorical(name, spec.categories or ()))
        else:
            assert spec.min is not None and spec.max is not None
            cols.append(ColumnSchema.numeric(name, lo=spec.min, hi=spec.max, bins=bins))
    return Schema(tuple(cols))


def _frame(cfg: DatasetConfig, data: LocalDataset, names: tuple[str, ...]) -> pd.DataFrame:
    out: dict[str, object] = {}
    for name in names:
        if name == data.label_name:
            out[name] = [str(int(v)) for v in data.labels]
            continue
        j = data.feature_names.index(name)
        spec = cfg.columns.get(name)
        if spec is not None and spec.type == "categorical":
            cats = spec.categories or ()
            # codes back to the declared categories; the extra "other" code maps to None
            out[name] = [cats[int(c)] if int(c) < len(cats) else None for c in data.features[:, j]]
        else:
            out[name] = data.features[:, j].astype(np.float64)
    return pd.DataFrame(out)


def run_synth(
    *,
    config: SiteConfig,
    ledger: Ledger,
    task: TaskAssignment,
    data: tuple[LocalDataset, LocalDataset | None],
) -> tuple[UpdateMeta, bytes]:
    req = parse_request(SynthRequest, task, source="synth request")
    cfg = config.dataset(task.dataset)
    assert cfg is not None
    train, val = data
    available = (*train.feature_names, train.label_name)
    names = req.columns or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise InvalidSpecError(f"dataset {task.dataset!r} has no column(s) {', '.join(unknown)}")
    if len(names) > MAX_COLUMNS:
        raise InvalidSpecError(
            f"dataset {task.dataset!r} has {len(names)} columns; choose at most {MAX_COLUMNS}"
        )
    schema = site_schema(cfg, tuple(names), req.bins)
    plan = marginal_plan(schema, target_epsilon=req.target_epsilon, delta=req.delta)
    admit_and_charge(
        config=config,
        ledger=ledger,
        dataset=task.dataset,
        job_id=task.job_id,
        task_id=task.task_id,
        kind="synth",
        events=list(plan.events),
        delta=req.delta,
        what=f"synthetic-data marginals at ε={req.target_epsilon:g}",
    )
    frame = _frame(cfg, train, tuple(names))
    if val is not None:
        frame = pd.concat([frame, _frame(cfg, val, tuple(names))], ignore_index=True)
    measurement = measure_site(frame, schema, plan, noise.private_numpy_rng())
    return release_update(
        config=config,
        ledger=ledger,
        task=task,
        delta=req.delta,
        num_examples=len(frame),
        result_json=json.dumps({"schema": schema.to_dict(), "measurement": measurement}),
        task_epsilon=plan.epsilon,
        accountant=plan.accountant,
    )
