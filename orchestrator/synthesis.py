"""Federated DP synthetic data (``orchestrator synth DATASET --epsilon E --rows N``).

Every online site holding the dataset measures noisy one- and two-way marginals of its own
rows under its own budget (``site_agent.handlers.synth``); the orchestrator checks they used the
same declared schema, sums the counts (``orchestrator.synthesis_tree.combine``), fits a
maximum spanning tree of two-way marginals and samples rows (``fit_and_sample``, MST-style,
McKenna et al. 2021).
No single site's rows or counts are published: only rows sampled from the summed model.

What each site is charged is computed here from public inputs, before the request goes out:
the default plan for the number of columns it will measure (the request's, or its published
catalog's features and label; :func:`common.synthesis.marginals.planned_events`). A site whose
DP report or measurement states another σ or another number of marginals is left out of the
synthesis (its stated variances would weigh its counts) and is charged the planned events all
the same.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from typing import Any

from common.domain import DatasetInfo, SiteStatus, UpdateMeta
from common.dp import noise
from common.dp.events import DpEvent
from common.errors import DpfedError, InvalidSpecError, NotFoundError
from common.synthesis.discretisation import Schema
from common.synthesis.marginals import default_marginals, planned_events
from orchestrator.core.broker import Broker
from orchestrator.core.store import Store
from orchestrator.jobs.base import send_one_shot
from orchestrator.jobs.kinds import SYNTH
from orchestrator.planning import online_holders
from orchestrator.synthesis_tree import combine, fit_and_sample

MAX_ROWS = 1_000_000


def synthesize(
    *,
    broker: Broker,
    sites: list[SiteStatus],
    dataset: str,
    epsilon: float,
    rows: int,
    delta: float = 1e-5,
    bins: int = 8,
    columns: tuple[str, ...] = (),
    timeout_s: float = 300.0,
    store: Store | None = None,
) -> tuple[str, dict[str, Any]]:
    """(CSV text, info) of ``rows`` synthetic rows with the dataset's declared schema."""
    if not 0 < rows <= MAX_ROWS:
        raise InvalidSpecError(f"rows must be between 1 and {MAX_ROWS}")
    if not 0 < epsilon <= 100:
        raise InvalidSpecError("epsilon must be in (0, 100]")
    holding = online_holders(sites, dataset)
    holders = [s.site_id for s, _ in holding]
    if not holders:
        raise NotFoundError(f"no online site exposes dataset {dataset!r}")
    by_count: dict[int, tuple[DpEvent, ...]] = {}
    planned: dict[str, tuple[DpEvent, ...]] = {}
    for site, ds in holding:
        d = _measured_columns(ds, columns)
        if d not in by_count:
            by_count[d] = planned_events(d, target_epsilon=epsilon, delta=delta)
        planned[site.site_id] = by_count[d]
    request = json.dumps(
        {
            "target_epsilon": epsilon,
            "delta": delta,
            "bins": bins,
            "columns": list(columns) or None,
        }
    )
    synth_id = f"synth-{uuid.uuid4().hex[:10]}"
    res = send_one_shot(
        broker,
        store,
        kind=SYNTH.name,
        job_id=synth_id,
        site_ids=holders,
        dataset=dataset,
        delta=delta,
        request_json=request,
        timeout_s=timeout_s,
        assigned={sid: [("metrics", e) for e in events] for sid, events in planned.items()},
    )
    problems = {sid: f"{f.code}: {f.reason}" for sid, f in res.failures.items()}
    if not res.updates:
        raise NotFoundError(
            f"no site measured dataset {dataset!r}: "
            + "; ".join(f"{sid}: {why}" for sid, why in sorted(problems.items()))
        )
    measurements = []
    used: list[str] = []
    schema: Schema | None = None
    for sid, upd in sorted(res.updates.items()):
        try:
            body = json.loads(upd.meta.result_json)
            site_schema = Schema.from_dict(body["schema"])
            combine([body["measurement"]])  # well-formed on its own
        except (ValueError, KeyError, TypeError, RecursionError, DpfedError):
            problems[sid] = "INVALID_ARGUMENT: malformed measurement; left out (charged as planned)"
            continue
        mismatch = _off_plan(upd.meta, body["measurement"], planned[sid], site_schema)
        if mismatch:
            problems[sid] = f"INVALID_ARGUMENT: {mismatch}; left out (charged as planned)"
            continue
        if schema is None:
            schema = site_schema
        elif site_schema.fingerprint() != schema.fingerprint():
            raise InvalidSpecError(
                f"site {sid} declares a different schema (types, bounds or categories) for "
                f"dataset {dataset!r} than the other sites; align their site.yaml `columns`"
            )
        measurements.append(body["measurement"])
        used.append(sid)
    if schema is None:
        raise NotFoundError(f"no usable measurement of dataset {dataset!r}: {problems}")
    combined = combine(measurements)
    frame = fit_and_sample(combined, schema, rows=rows, rng=noise.private_numpy_rng())
    info = {
        "job_id": synth_id,
        "dataset": dataset,
        "rows": rows,
        "epsilon_per_site": epsilon,
        "delta": delta,
        "sites": used,
        "sites_missing": problems,
        "columns": list(schema.names),
        "method": "MST-style: summed noisy 1- and 2-way marginals, maximum spanning tree, "
        "sampling (McKenna et al. 2021)",
        "guarantee": f"({epsilon:g}, {delta:g})-DP for each record at its own site",
    }
    return frame.to_csv(index=False), info


def _measured_columns(info: DatasetInfo, columns: Sequence[str]) -> int:
    """How many columns a site measures: the request's, or all its published features and
    its label (``site_agent.handlers.synth``)."""
    return len(columns) if columns else len(info.columns) + 1


def _off_plan(
    meta: UpdateMeta,
    measurement: Any,
    planned: Sequence[DpEvent],
    schema: Schema,
) -> str:
    """Why a site's answer departs from its planned release (empty when it does not): its DP
    report must list exactly the events it was charged (``planned``, from the catalog's
    column count), and its measurement the default plan's marginals for its declared
    ``schema`` (:func:`~common.synthesis.marginals.default_marginals`), with their shapes and
    the planned variance σ² (its stated variances would weigh its counts)."""
    reported = [(e.kind, e.event) for e in meta.dp_report.events]
    if len(reported) != len(planned) or any(
        kind != "metrics"
        or got.steps != want.steps
        or got.sample_rate != want.sample_rate
        or not math.isclose(got.noise_multiplier, want.noise_multiplier, rel_tol=1e-9)
        for (kind, got), want in zip(reported, planned, strict=False)
    ):
        return "its DP report states other DP events than the request fixed"
    marginals = default_marginals(schema)
    (event,) = planned  # the default plan: one σ for every marginal
    if event.steps != len(marginals):
        return "it declares other columns than its catalog publishes"
    layout = [
        (list(cols), [schema.column(c).bins for c in cols], event.noise_multiplier**2)
        for cols in marginals
    ]
    stated = [
        (list(m["columns"]), list(m["shape"]), float(m["variance"]))
        for m in measurement["marginals"]
    ]
    if len(stated) != len(layout) or any(
        cols != want_cols or shape != want_shape or not math.isclose(var, want_var, rel_tol=1e-9)
        for (cols, shape, var), (want_cols, want_shape, want_var) in zip(
            stated, layout, strict=True
        )
    ):
        return "its measurement states other marginals or noise than the request fixed"
    return ""
