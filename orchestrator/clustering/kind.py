"""The mixture job kind: how a spec is checked before it runs."""

from __future__ import annotations

from collections.abc import Sequence

from common.domain import SiteStatus
from common.errors import InvalidSpecError, NotFoundError, PrivacyAccountingError
from common.specs import GmmJobSpec
from orchestrator.clustering.setup import build_machine, declared_box
from orchestrator.planning import site_dataset


def prepare(
    spec: GmmJobSpec, sites: Sequence[SiteStatus], max_parameters: int
) -> tuple[GmmJobSpec, int]:
    """Every column needs declared bounds at every site holding the dataset, and a target ε
    must be reachable: refused now rather than failing the job when it starts."""
    holders = [s for s in sites if site_dataset(s, spec.dataset) is not None]
    if not holders:
        raise NotFoundError(f"no registered site exposes dataset {spec.dataset!r}")
    _, bounds = declared_box(spec, holders)
    try:
        build_machine(spec, bounds)
    except PrivacyAccountingError as err:
        raise InvalidSpecError(
            f"dp.target_epsilon={spec.dp.target_epsilon:g} cannot be met by this job: {err}"
        ) from None
    return spec, spec.max_rounds
