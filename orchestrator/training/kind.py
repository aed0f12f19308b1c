"""The training job kind: how a spec is prepared before it runs, and planned."""

from __future__ import annotations

from collections.abc import Sequence

from common.domain import Plan, SiteStatus
from common.errors import NotFoundError
from common.specs import JobSpec
from orchestrator.admission import with_site_verdicts
from orchestrator.core.broker import Broker
from orchestrator.model_size import check_model_size
from orchestrator.planning import online_holders, plan_job, site_dataset
from orchestrator.schemas import Agreement, agree, with_encoding


def with_derived_encoding(
    spec: JobSpec, sites: Sequence[SiteStatus], max_parameters: int
) -> tuple[JobSpec, Agreement]:
    """``spec`` with the feature encoding derived from the declared schemas of the online,
    enabled sites holding its dataset (those of enabled offline ones when none is online);
    sites whose declaration disagrees with the majority's are excluded
    (``orchestrator.schemas``). The model's size is checked again with the derived
    dimensions."""
    holders = [(s.site_id, d) for s, d in online_holders(sites, spec.dataset)]
    if not holders:
        holders = [
            (s.site_id, d)
            for s in sites
            if s.state != "disabled" and (d := site_dataset(s, spec.dataset)) is not None
        ]
    if not holders:
        raise NotFoundError(f"no registered site exposes dataset {spec.dataset!r}")
    agreement = agree(spec.dataset, holders)
    derived = with_encoding(spec, agreement)
    check_model_size(derived, max_parameters)  # exact, now the dimensions are known
    return derived, agreement


def prepare(spec: JobSpec, sites: Sequence[SiteStatus], max_parameters: int) -> tuple[JobSpec, int]:
    """The spec with its encoding; sites whose declaration disagrees are named in the job's
    events when its participants are chosen (``JobRunner._participants``)."""
    derived, _ = with_derived_encoding(spec, sites, max_parameters)
    return derived, derived.rounds


def plan(spec: JobSpec, sites: Sequence[SiteStatus], broker: Broker, max_parameters: int) -> Plan:
    """Each site's projected cost; each online site's own verdict (admission's dry run)
    replaces the estimate."""
    derived, agreement = with_derived_encoding(spec, sites, max_parameters)
    projected = plan_job(derived, list(sites), excluded=agreement.excluded)
    online = {s.site_id for s in sites if s.state not in ("offline", "disabled")}
    return with_site_verdicts(projected, derived, broker, online=online)
