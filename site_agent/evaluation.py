"""Federated evaluation of a released model on a site's data (``orchestrator evaluate``).

The site evaluates the model on *all* rows of the named dataset, encoded with the model's own
feature encoding once it agrees with the site's declared schema, and releases the correct
count and the clipped loss sum through the Gaussian mechanism (``site_agent.trainer.evaluate``:
one Gaussian with noise multiplier σ at L2 sensitivity √2·unit), charged to its ledger first.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from common.domain import TaskAssignment, UpdateMeta
from common.dp.accounting import compute_epsilon
from common.dp.events import DpEvent
from common.errors import InvalidSpecError, NotFoundError
from common.models import parse_model_spec
from common.schema.encoding import FeatureEncoding
from common.schema.table import TypedTable
from common.tensors import state_from_bytes
from site_agent.budget import admit_and_charge, parse_request, release_update
from site_agent.config import SiteConfig
from site_agent.data import LocalDataset
from site_agent.encoding_check import checked_encoding
from site_agent.ledger import Ledger
from site_agent.trainer import evaluate


class EvaluateRequest(BaseModel):
    """What the orchestrator may ask: data, never code."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model_job_id: str = Field(min_length=1, max_length=64)
    model: dict[str, object]
    dataset: str = Field(min_length=1, max_length=200)
    noise_multiplier: float = Field(gt=0.0, le=1e6)
    loss_bound: float = Field(default=5.0, gt=0.0, le=1e3)
    delta: float = Field(default=1e-5, gt=0.0, lt=0.01)
    encoding: dict[str, Any] | None = Field(
        default=None,
        description="the released model's feature encoding (FeatureEncoding.to_dict); "
        "absent: the min/max encoding of this site's own declaration",
    )


def run_evaluate(
    *,
    config: SiteConfig,
    ledger: Ledger,
    task: TaskAssignment,
    blob: bytes,
    data: tuple[LocalDataset, LocalDataset | None],
) -> tuple[UpdateMeta, bytes]:
    req = parse_request(EvaluateRequest, task, source="evaluate request")
    if req.dataset != task.dataset:
        raise InvalidSpecError("the evaluate request names another dataset than its task")
    spec = parse_model_spec(req.model, source="evaluate request model")
    cfg = config.dataset(req.dataset)
    if cfg is None:
        raise NotFoundError(f"site {config.site_id} has no dataset named {req.dataset!r}")
    train, val = data
    # Public inputs only before the charge: the request, the declared schema, the policy.
    encoding = checked_encoding(
        cfg,
        train.feature_names,
        None if req.encoding is None else FeatureEncoding.from_dict(req.encoding),
        what=f"evaluating model {req.model_job_id}",
    )
    for key, value in (("input_dim", encoding.width), ("num_classes", encoding.num_classes)):
        if getattr(spec, key) is not None and getattr(spec, key) != value:
            raise InvalidSpecError(
                f"the model's {key} is {getattr(spec, key)} but its feature encoding gives {value}"
            )
    spec = spec.model_copy(
        update={"input_dim": encoding.width, "num_classes": encoding.num_classes}
    )
    if hashlib.sha256(blob).hexdigest() != task.model_sha256:
        raise InvalidSpecError("the model's bytes do not match the task's sha256")
    state = state_from_bytes(blob)
    event = DpEvent(noise_multiplier=req.noise_multiplier, sample_rate=1.0, steps=1)
    admit_and_charge(
        config=config,
        ledger=ledger,
        dataset=req.dataset,
        job_id=task.job_id,
        task_id=task.task_id,
        kind="evaluate",
        events=[event],
        delta=req.delta,
        what=f"evaluating model {req.model_job_id}",
    )
    rows = train.table if val is None else TypedTable.concat([train.table, val.table])
    x = encoding.encode(rows)
    y = train.labels if val is None else np.concatenate([train.labels, val.labels])
    ev = evaluate(
        model_spec=spec,
        state=state,
        features=x,
        labels=y,
        loss_bound=req.loss_bound,
        noise_multiplier=req.noise_multiplier,
    )
    metrics = ev.released()
    eps = compute_epsilon([event], delta=req.delta).epsilon
    return release_update(
        config=config,
        ledger=ledger,
        task=task,
        events=[event],
        delta=req.delta,
        num_examples=ev.num_examples,
        result_json=json.dumps({"kind": "evaluate", "epsilon": eps}),
        task_epsilon=eps,
        metrics=metrics,
    )
