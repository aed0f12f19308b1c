"""Read models: the store's rows (plus live presence) as the domain types the CLI shows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from common.domain import (
    ColumnInfo,
    DatasetInfo,
    JobEvent,
    JobStatus,
    PolicySummary,
    RoundSummary,
    SiteSpend,
    SiteStatus,
)
from orchestrator.core.broker import Broker
from orchestrator.core.store import JobRow, SiteRow, Store
from orchestrator.metric_pooling import pooled_from_dict


def dataset_from_dict(d: dict[str, Any]) -> DatasetInfo:
    """A DatasetInfo as stored in JSON (tuples became lists, columns became dicts)."""
    return DatasetInfo(
        **{
            **d,
            "columns": tuple(d["columns"]),
            "schema": tuple(_column_from_dict(c) for c in d.get("schema", ())),
            "label_schema": (
                _column_from_dict(d["label_schema"]) if d.get("label_schema") else None
            ),
        }
    )


def _column_from_dict(c: dict[str, Any]) -> ColumnInfo:
    return ColumnInfo(**{**c, "categories": tuple(c.get("categories") or ())})


def site_status(row: SiteRow, broker: Broker) -> SiteStatus:
    live = broker.presence(row.site_id)
    if live is not None and broker.online(row.site_id):
        last_seen, state = live[0], live[1]
    else:
        last_seen, state = (live[0] if live else row.last_seen), "offline"
    if not row.enabled:
        state = "disabled"
    return SiteStatus(
        site_id=row.site_id,
        datasets=tuple(dataset_from_dict(d) for d in row.datasets),
        last_seen=last_seen,
        version=row.version,
        state=state,
        policy=(
            PolicySummary(**{**row.policy, "allowed_models": tuple(row.policy["allowed_models"])})
            if row.policy
            else None
        ),
    )


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def job_status(row: JobRow, store: Store, sites: Sequence[SiteSpend]) -> JobStatus:
    """The job's row, its rounds and events from the store, with each site's spend as given
    (``orchestrator.jobs.accounting.JobAccount.spends``)."""
    rounds = store.rounds(row.job_id)
    return JobStatus(
        job_id=row.job_id,
        name=row.name,
        dataset=row.dataset,
        state=row.state,
        round=row.round,
        rounds=row.rounds,
        epsilon=row.epsilon,
        delta=row.delta,
        accountant=row.accountant,
        error=row.error,
        history=tuple(
            RoundSummary(
                round=r.round,
                site_ids=tuple(r.site_ids),
                loss=_nan(r.loss),
                accuracy=_nan(r.accuracy),
                num_examples=r.num_examples,
                duration_s=r.duration_s,
                epsilon=r.epsilon,
                metrics=None if r.metrics is None else pooled_from_dict(r.metrics),
            )
            for r in rounds
        ),
        sites=tuple(sites),
        events=tuple(
            JobEvent(time=e.time, level=e.level, site_id=e.site_id, message=e.message)
            for e in store.events(row.job_id)
        ),
        created_at=row.created_at,
        updated_at=row.updated_at,
        job_spec_json=row.spec_json,
        model_released=row.model_released,
    )
