"""Federated evaluation of a released model (``orchestrator evaluate JOB --dataset D``).

Each site holding ``D`` evaluates the model on its rows and releases noised sums (charged to
its own ledger); the orchestrator pools them: accuracy = Σ noised correct / Σ rows. The ε of
the evaluation is the maximum over sites (disjoint data). Results are kept next to the model.

The sites encode their rows with the encoding on the model's card; a site whose declared
schema of ``D`` is not the one the encoding was derived from is left out, with the reason as
its error (``orchestrator.schemas``).
"""

from __future__ import annotations

import json
import math
import time
import uuid

from common.domain import Evaluation, SiteEvaluation, SiteStatus
from common.dp.events import DpEvent
from common.errors import InvalidSpecError, NotFoundError
from common.training.pipeline import card_encoding
from orchestrator.core.broker import Broker
from orchestrator.core.store import Store
from orchestrator.jobs.base import send_one_shot
from orchestrator.jobs.kinds import EVALUATE
from orchestrator.metric_pooling import EVALUATE_LOSS_BOUND, pool_metrics, pooled_to_dict
from orchestrator.planning import online_holders
from orchestrator.schemas import disagreement

DELTA = 1e-5


def evaluate_model(
    *,
    store: Store,
    broker: Broker,
    sites: list[SiteStatus],
    job_id: str,
    dataset: str,
    noise_multiplier: float,
    timeout_s: float,
) -> Evaluation:
    row = store.job(job_id)
    if not row.model_released:
        raise NotFoundError(f"job {job_id} has released no model to evaluate")
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise InvalidSpecError("evaluate: noise_multiplier must be a positive number")
    model_dir = store.paths.model_dir(job_id)
    card = json.loads((model_dir / "model_card.json").read_text())
    weights = (model_dir / "model.safetensors").read_bytes()
    encoding = card_encoding(card, source=f"the model card of job {job_id}")
    holders = []
    left_out: dict[str, str] = {}
    for s, d in online_holders(sites, dataset):
        why = disagreement(encoding, d)
        if why is None:
            holders.append(s.site_id)
        else:
            left_out[s.site_id] = why
    if not holders:
        if left_out:
            raise InvalidSpecError(
                f"no online site holding dataset {dataset!r} declares the schema the model was "
                "trained on: " + "; ".join(f"{sid}: {why}" for sid, why in sorted(left_out.items()))
            )
        raise NotFoundError(f"no online site exposes dataset {dataset!r}")
    request = json.dumps(
        {
            "model_job_id": job_id,
            "model": card["model"],
            "encoding": encoding.to_dict(),
            "dataset": dataset,
            "noise_multiplier": noise_multiplier,
            "loss_bound": EVALUATE_LOSS_BOUND,
            "delta": DELTA,
        }
    )
    eval_id = f"eval-{job_id}-{uuid.uuid4().hex[:6]}"
    # The request fixes each site's release: one σ-noised set of sums (the site's evaluate
    # handler). That, never a site's report, is what is charged and stated.
    from common.dp.accounting import compute_epsilon  # the accountants load torch: import late

    event = DpEvent(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)
    site_epsilon = compute_epsilon([event], delta=DELTA).epsilon
    # What each site was charged, in the job ledger like any job's (orchestrator.jobs).
    res = send_one_shot(
        broker,
        store,
        kind=EVALUATE.name,
        job_id=eval_id,
        site_ids=holders,
        dataset=dataset,
        delta=DELTA,
        request_json=request,
        timeout_s=timeout_s,
        blob=weights,
        # The kind a one-shot release is reported under; the same event for every site.
        assigned={sid: [("metrics", event)] for sid in holders},
    )
    per_site = [
        SiteEvaluation(sid, None, error=f"left out: {why}") for sid, why in sorted(left_out.items())
    ]
    correct = loss = 0.0
    n = 0
    eps = 0.0
    for sid in holders:
        if sid in res.updates:
            meta = res.updates[sid].meta
            m = meta.metrics
            per_site.append(SiteEvaluation(sid, m, epsilon=site_epsilon))
            if m is not None:
                correct += m.correct_sum
                loss += m.loss_sum
                n += m.num_examples
            eps = site_epsilon
        else:
            fail = res.failures.get(sid)
            per_site.append(
                SiteEvaluation(sid, None, error=f"{fail.code}: {fail.reason}" if fail else "")
            )
    # Pooled from the noised sums, with standard errors and AUC (orchestrator.metric_pooling).
    pooled = pool_metrics(
        [s.metrics for s in per_site if s.metrics is not None],
        noise_multiplier=noise_multiplier,
        loss_bound=EVALUATE_LOSS_BOUND,
    )
    result = Evaluation(
        sites=tuple(per_site),
        loss=pooled.loss.value if pooled else math.nan,
        accuracy=pooled.accuracy.value if pooled else math.nan,
        num_examples=n,
        epsilon=eps,
        delta=DELTA,
        metrics=pooled,
    )
    with (model_dir / "evaluations.jsonl").open("a") as f:
        f.write(
            json.dumps(
                {
                    "time": time.time(),
                    "dataset": dataset,
                    "noise_multiplier": noise_multiplier,
                    "accuracy": result.accuracy,
                    "loss": result.loss,
                    "num_examples": n,
                    "metrics": pooled_to_dict(pooled) if pooled else None,
                    "epsilon": eps,
                    "delta": DELTA,
                    "sites": [{"site_id": s.site_id, "error": s.error} for s in per_site],
                }
            )
            + "\n"
        )
    return result
