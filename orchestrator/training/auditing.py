"""Run the empirical privacy audit of a job before its model is released.

The sites score their secret canaries under the final model (``site_agent.handlers.canaries``) and
send the scores with the coins; the orchestrator pools them (all canaries, all sites: each
record of the union is protected at the job's ε, the max over sites) and applies
``common.dp.audit.audit``. A lower bound above the claimed ε means the implementation leaks more
than its accounting says: the job fails and the model is withheld.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from common.dp.audit import audit
from common.errors import JobFailedError
from common.specs import JobSpec
from orchestrator.core.broker import Broker
from orchestrator.core.fanout import fan_out

log = logging.getLogger("dpfed.orchestrator")


def run_audit(
    *,
    broker: Broker,
    site_ids: list[str],
    job_id: str,
    spec: JobSpec,
    weights: bytes,
    claimed_epsilon: float,
    timeout_s: float,
) -> dict[str, Any]:
    """The card's ``audit`` section; raises JobFailedError when the audit contradicts ε."""
    request = json.dumps({"model": spec.model.model_dump(mode="json")})
    res = fan_out(
        broker,
        site_ids=site_ids,
        job_id=job_id,
        kind="audit",
        dataset=spec.dataset,
        request_json=request,
        blob=weights,
        timeout_s=timeout_s,
    )
    losses: list[float] = []
    included: list[bool] = []
    for sid, upd in sorted(res.updates.items()):
        try:
            body = json.loads(upd.meta.result_json)
            ls = [float(v) for v in body["losses"]]
            inc = [bool(v) for v in body["included"]]
        except (ValueError, KeyError, TypeError, RecursionError):
            log.warning("job=%s site=%s sent a malformed audit result", job_id, sid)
            continue
        if len(ls) != len(inc):
            continue
        losses += ls
        included += inc
    missing = sorted(set(site_ids) - set(res.updates))
    if not losses:
        raise JobFailedError(
            "the privacy audit got no canary scores from any site "
            f"({', '.join(f'{s}: {res.failures[s].reason}' for s in missing if s in res.failures)})"
        )
    result = audit(np.array(losses), np.array(included), delta=spec.dp.delta)
    section = {
        **result.as_dict(),
        "claimed_epsilon": claimed_epsilon,
        "sites": sorted(res.updates),
        "sites_missing": missing,
        "verdict": "consistent" if result.epsilon_lower_bound <= claimed_epsilon else "VIOLATION",
    }
    if result.epsilon_lower_bound > claimed_epsilon:
        raise JobFailedError(
            f"PRIVACY AUDIT FAILED: the empirical lower bound ε ≥ {result.epsilon_lower_bound:.3f} "
            f"(one-run audit, {result.correct}/{result.guesses} correct guesses on "
            f"{result.num_canaries} canaries) exceeds the claimed ε = {claimed_epsilon:.3f}. "
            "This means a bug in the DP implementation; the model is withheld."
        )
    return section
