"""``audit``: the site's side of the privacy audit: secret canaries for a job, and their scores.

Canaries are synthetic (uniform within the declared schema, encoded with the job's feature
encoding, with uniform random labels), drawn from OS entropy when a
job's first task arrives and kept in the state directory with their inclusion coins, which
never leave the site. Scoring them under the released model is post-processing of a public
model and synthetic records: it costs no privacy on the site's data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from common.domain import ColumnInfo, TaskAssignment
from common.dp import noise
from common.dp.audit import make_canaries
from common.errors import InvalidSpecError, NotFoundError
from common.schema.encoding import FeatureEncoding
from common.schema.table import TypedTable
from common.specs import JobSpec
from common.training.models import build_model, load_weights, parse_model_spec
from common.training.tensors import state_from_bytes
from site_agent.boundary.disclosure import ACCOUNTANT, SiteContext
from site_agent.handlers.base import Plan, Reply, TaskHandler, reply

Canaries = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.bool_]]


def _path(state_dir: Path, job_id: str) -> Path:
    if not job_id.replace("-", "").replace("_", "").isalnum():
        raise InvalidSpecError("invalid job id for an audit")
    return state_dir / "audit" / f"{job_id}.npz"


def canaries_for(
    state_dir: Path, job_id: str, spec: JobSpec, encoding: FeatureEncoding
) -> Canaries:
    """This job's canaries, created on first use and stable across rounds and restarts.

    Each canary is a typed record drawn uniformly within the declared schema (numeric
    columns in ``[min, max]``, categorical ones among the declared categories) with a uniform
    class, then encoded like any row of the dataset; they never read the data.
    """
    assert spec.audit is not None
    path = _path(state_dir, job_id)
    if path.exists():
        with np.load(path) as z:
            return z["x"], z["y"], z["included"]
    schema = encoding.feature_schema()
    lows = np.array([_bound(c)[0] for c in schema], dtype=np.float64)
    highs = np.array([_bound(c)[1] for c in schema], dtype=np.float64)
    rng = noise.private_numpy_rng()
    raw, y, inc = make_canaries(
        num=spec.audit.canaries, lows=lows, highs=highs, num_classes=encoding.num_classes, rng=rng
    )
    columns: dict[str, npt.NDArray[np.float64] | npt.NDArray[np.int64]] = {}
    for j, c in enumerate(schema):
        values = raw[:, j].astype(np.float64)
        if c.type == "categorical":
            k = len(c.categories)
            columns[c.name] = np.clip(np.floor(values), 0, k - 1).astype(np.int64)
        else:
            columns[c.name] = values
    x = encoding.encode(TypedTable(columns=columns, num_rows=int(y.shape[0])))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y, included=inc)
    tmp.replace(path)
    return x, y, inc


def _bound(column: ColumnInfo) -> tuple[float, float]:
    if column.type == "categorical":
        return 0.0, float(len(column.categories))
    assert column.min is not None and column.max is not None  # an encoding has bounds
    return column.min, column.max


def score_canaries(state_dir: Path, job_id: str, request_json: str, blob: bytes) -> str:
    """Per-canary losses under the released model, with the coins: the audit's input."""
    path = _path(state_dir, job_id)
    if not path.exists():
        raise NotFoundError(f"this site holds no canaries for job {job_id}")
    try:
        req = json.loads(request_json)
        spec = parse_model_spec(req["model"], source="audit request model")
    except (ValueError, KeyError, TypeError, RecursionError):
        raise InvalidSpecError("malformed audit request") from None
    with np.load(path) as z:
        x, y, inc = z["x"], z["y"], z["included"]
    model = build_model(spec)
    load_weights(model, state_from_bytes(blob), what="the audited model")
    model.eval()
    with torch.no_grad():
        losses = nn.functional.cross_entropy(
            model(torch.from_numpy(x)), torch.from_numpy(y), reduction="none"
        )
    return json.dumps({"losses": losses.tolist(), "included": inc.astype(bool).tolist()})


class AuditHandler(TaskHandler[Plan]):
    """Scores the job's canaries under the released model; reads no row, charges nothing."""

    kind = "audit"
    counts_rows = False
    in_memory = False

    def plan(self, site: SiteContext, task: TaskAssignment) -> Plan:
        return Plan(None)

    def run(self, site: SiteContext, task: TaskAssignment, plan: Plan, blob: bytes) -> Reply:
        result_json = score_canaries(site.config.state_dir, task.job_id, task.request_json, blob)
        return reply(
            site,
            task,
            events=(),
            delta=site.config.policy.delta,
            num_examples=len(json.loads(result_json)["losses"]),
            result_json=result_json,
            accountant=ACCOUNTANT,
        )
