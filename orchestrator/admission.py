"""Admission before any spend, on the orchestrator's side (issue 16.1): no site spends on a
job that cannot be released.

Before round 1 every selected site is sent an ``admit`` task (``site_agent.handlers.admit``): it
checks the whole job against its own policy and budget and reserves its cost in its ledger,
or refuses with its reason. With fewer than ``min_sites`` admissions the job fails at once,
before any site trained, and every site that did reserve is told to release. ``orchestrator
plan`` asks the same question without reserving (``check``), so it shows the verdicts the
sites will give, composed the way they compose (RDP over their whole ledgers), never a sum
of ε values.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from common.domain import Plan, SitePlan, TaskFailure
from common.errors import PolicyRefusal
from common.specs import JobSpec
from orchestrator.core.broker import Broker
from orchestrator.core.fanout import fan_out
from orchestrator.core.store import Store

log = logging.getLogger("dpfed.orchestrator")

ADMISSION_REFUSED = "admission refused"
"""How a job that fewer than ``min_sites`` sites admitted fails (its error starts so)."""

RELEASE_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Verdict:
    """One site's answer to an admission request."""

    site_id: str
    admitted: bool
    reason: str = ""
    epsilon_before: float = float("nan")
    epsilon_after: float = float("nan")
    max_epsilon: float = float("nan")


def ask(
    broker: Broker,
    *,
    job_id: str,
    spec: JobSpec,
    noise_multipliers: Mapping[str, float],
    action: str,
    timeout_s: float,
    check: Callable[[], None] | None = None,
) -> dict[str, Verdict]:
    """Each site's verdict on ``spec`` at its assigned σ (``action``: reserve or check)."""
    res = fan_out(
        broker,
        site_ids=sorted(noise_multipliers),
        job_id=job_id,
        kind="admit",
        dataset=spec.dataset,
        request_json=json.dumps({"action": action}),
        timeout_s=timeout_s,
        round_=1,
        rounds=spec.rounds,
        job_spec_json=spec.model_dump_json(),
        noise_multipliers=noise_multipliers,
        check=check,
    )
    out = {sid: _refused(f) for sid, f in res.failures.items()}
    for sid, upd in res.updates.items():
        upd.payload.close()
        try:
            body = json.loads(upd.meta.result_json)
            out[sid] = Verdict(
                site_id=sid,
                admitted=body.get("admitted") is True,
                reason="" if body.get("admitted") is True else "the site did not admit the job",
                epsilon_before=float(body["epsilon_before"]),
                epsilon_after=float(body["epsilon_after"]),
                max_epsilon=float(body["max_epsilon"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            out[sid] = Verdict(sid, False, "its admission answer is malformed")
    return out


def _refused(f: TaskFailure) -> Verdict:
    why = f.reason if f.code == "FAILED_PRECONDITION" else f"{f.code}: {f.reason}"
    return Verdict(site_id=f.site_id, admitted=False, reason=why)


def admit(
    broker: Broker,
    *,
    job_id: str,
    spec: JobSpec,
    noise_multipliers: Mapping[str, float],
    timeout_s: float,
    check: Callable[[], None] | None = None,
    event: Callable[..., None] | None = None,
) -> tuple[list[str], dict[str, Verdict]]:
    """Reserve the job at every site; return the admitting sites and every verdict.

    ``event(level, message, site_id)`` (the job's event log) hears each refusal.

    Raises ``PolicyRefusal`` (its message starts with :data:`ADMISSION_REFUSED` and names
    each refusing site and its reason) when fewer than ``spec.min_sites`` admit; the sites
    that reserved are then told to release first.
    """
    verdicts = ask(
        broker,
        job_id=job_id,
        spec=spec,
        noise_multipliers=noise_multipliers,
        action="reserve",
        timeout_s=timeout_s,
        check=check,
    )
    admitted = sorted(sid for sid, v in verdicts.items() if v.admitted)
    if event is not None:
        for v in sorted(verdicts.values(), key=_by_site):
            if not v.admitted:
                event("warning", f"site {v.site_id} refused the job: {v.reason}", v.site_id)
    if len(admitted) >= spec.min_sites:
        return admitted, verdicts
    # Every site asked, not only those that answered yes: one that answered late may hold one.
    release(broker, job_id=job_id, spec=spec, site_ids=sorted(noise_multipliers))
    refusals = "; ".join(
        f"site {v.site_id}: {v.reason}"
        for v in sorted(verdicts.values(), key=_by_site)
        if not v.admitted
    )
    raise PolicyRefusal(
        f"{ADMISSION_REFUSED}: {len(admitted)} of {len(verdicts)} site(s) admitted the job "
        f"and it needs min_sites={spec.min_sites}; no site trained or was charged. "
        f"{refusals}"
    )


def _by_site(v: Verdict) -> str:
    return v.site_id


def release(broker: Broker, *, job_id: str, spec: JobSpec, site_ids: Sequence[str]) -> None:
    """Tell ``site_ids`` to end the job's reservation; best effort (a site that does not
    hear it keeps the reservation until the job is admitted again or an operator acts)."""
    if not site_ids:
        return
    res = fan_out(
        broker,
        site_ids=list(site_ids),
        job_id=job_id,
        kind="admit",
        dataset=spec.dataset,
        request_json=json.dumps({"action": "release"}),
        timeout_s=RELEASE_TIMEOUT_S,
        rounds=spec.rounds,
        job_spec_json=spec.model_dump_json(),
    )
    for upd in res.updates.values():
        upd.payload.close()
    for sid, f in sorted(res.failures.items()):
        log.warning("job=%s site=%s reservation not released: %s", job_id, sid, f.reason)


def with_site_verdicts(
    plan: Plan, spec: JobSpec, broker: Broker, *, online: set[str], timeout_s: float = 30.0
) -> Plan:
    """``plan`` with each online site's own verdict (a ``check`` admission, nothing
    reserved) in place of the orchestrator's estimate; offline sites would not be selected."""
    sigmas = {r.site_id: r.noise_multiplier for r in plan.sites if r.site_id in online}
    sigmas = {sid: s for sid, s in sigmas.items() if s > 0}
    verdicts = (
        ask(
            broker,
            job_id=f"plan-{uuid.uuid4().hex[:10]}",
            spec=spec,
            noise_multipliers=sigmas,
            action="check",
            timeout_s=timeout_s,
        )
        if sigmas
        else {}
    )
    rows: list[SitePlan] = []
    for r in plan.sites:
        v = verdicts.get(r.site_id)
        if r.site_id not in online:
            rows.append(
                replace(
                    r,
                    would_refuse=True,
                    reason="the site is offline: it cannot be asked, and launch would not "
                    "select it",
                )
            )
        elif v is None:
            rows.append(r)  # σ could not be calibrated: the estimate's reason stands
        elif v.admitted:
            rows.append(
                replace(
                    r,
                    dataset_epsilon_before=v.epsilon_before,
                    dataset_epsilon_after=v.epsilon_after,
                    max_epsilon=v.max_epsilon,
                    would_refuse=False,
                    reason="",
                )
            )
        else:
            rows.append(replace(r, would_refuse=True, reason=v.reason))
    willing = [r for r in rows if not r.would_refuse]
    feasible = len(willing) >= spec.min_sites
    message = (
        ""
        if feasible
        else f"{len(willing)} site(s) would take the job; it needs min_sites={spec.min_sites}"
        if rows
        else plan.message
    )
    return replace(
        plan,
        sites=tuple(rows),
        epsilon=max((r.projected_epsilon for r in willing), default=0.0),
        feasible=feasible,
        message=message,
    )


def release_at_end(
    *, store: Store, broker: Broker, job_id: str, spec: JobSpec, stopping: threading.Event
) -> None:
    """After a job's thread ends: release its reservations unless the orchestrator is only
    shutting down (the job resumes later and still needs them)."""
    if stopping.is_set():
        return
    row = store.job(job_id)
    if row.state not in ("completed", "failed") or not row.participants:
        return
    try:
        release(broker, job_id=job_id, spec=spec, site_ids=sorted(row.participants))
    except Exception:  # best effort: the job has ended either way
        log.exception("job=%s releasing its reservations failed", job_id)
