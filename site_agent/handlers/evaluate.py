"""``evaluate``: a released model's metrics on all rows of a site's dataset.

The model is encoded with its own feature encoding once that agrees with the site's declared
schema; the correct count and the clipped loss sum are released through one Gaussian
mechanism (``site_agent.trainer.evaluate``), charged as one ``DpEvent(σ, q=1, 1 step)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from common.domain import TaskAssignment
from common.dp.accounting import compute_epsilon
from common.dp.events import DpEvent
from common.errors import InvalidSpecError
from common.schema.encoding import FeatureEncoding
from common.schema.table import TypedTable
from common.specs import ModelSpec
from common.training.models import parse_model_spec
from common.training.tensors import state_from_bytes
from site_agent.boundary.admission import Release
from site_agent.boundary.disclosure import SiteContext
from site_agent.boundary.encoding_check import checked_encoding
from site_agent.handlers.base import Plan, Reply, TaskHandler, check_sha256, parse_request, reply
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


@dataclass(frozen=True)
class EvaluatePlan(Plan):
    request: EvaluateRequest
    model_spec: ModelSpec
    encoding: FeatureEncoding
    event: DpEvent


class EvaluateHandler(TaskHandler[EvaluatePlan]):
    kind = "evaluate"

    def plan(self, site: SiteContext, task: TaskAssignment) -> EvaluatePlan:
        req = parse_request(EvaluateRequest, task, source="evaluate request")
        if req.dataset != task.dataset:
            raise InvalidSpecError("the evaluate request names another dataset than its task")
        spec = parse_model_spec(req.model, source="evaluate request model")
        cfg = site.datasets.config_of(req.dataset)
        what = f"evaluating model {req.model_job_id}"
        encoding = checked_encoding(
            cfg,
            site.datasets.shape(req.dataset).feature_names,
            None if req.encoding is None else FeatureEncoding.from_dict(req.encoding),
            what=what,
        )
        for key, value in (("input_dim", encoding.width), ("num_classes", encoding.num_classes)):
            if getattr(spec, key) is not None and getattr(spec, key) != value:
                raise InvalidSpecError(
                    f"the model's {key} is {getattr(spec, key)} but its feature encoding "
                    f"gives {value}"
                )
        spec = spec.model_copy(
            update={"input_dim": encoding.width, "num_classes": encoding.num_classes}
        )
        event = DpEvent(noise_multiplier=req.noise_multiplier, sample_rate=1.0, steps=1)
        release = Release(
            what=f"the evaluation of model {req.model_job_id}",
            events=(event,),
            delta=req.delta,
            kinds=("evaluate",),
        )
        return EvaluatePlan(release, req, spec, encoding, event)

    def check_model(
        self, site: SiteContext, task: TaskAssignment, plan: EvaluatePlan, blob: bytes
    ) -> None:
        check_sha256(blob, task, "the model's")
        state_from_bytes(blob)  # well-formed tensors, before anything is charged

    def run(
        self, site: SiteContext, task: TaskAssignment, plan: EvaluatePlan, blob: bytes
    ) -> Reply:
        req = plan.request
        split = site.datasets.split(req.dataset)
        train, val = split.train, split.validation
        rows = train.table if val is None else TypedTable.concat([train.table, val.table])
        y = train.labels if val is None else np.concatenate([train.labels, val.labels])
        ev = evaluate(
            model_spec=plan.model_spec,
            state=state_from_bytes(blob),
            features=plan.encoding.encode(rows),
            labels=y,
            loss_bound=req.loss_bound,
            noise_multiplier=req.noise_multiplier,
        )
        eps = compute_epsilon([plan.event], delta=req.delta).epsilon
        return reply(
            site,
            task,
            events=[plan.event],
            delta=req.delta,
            num_examples=ev.num_examples,
            result_json=json.dumps({"kind": "evaluate", "epsilon": eps}),
            task_epsilon=eps,
            metrics=ev.released(),
        )
