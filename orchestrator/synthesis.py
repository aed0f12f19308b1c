"""Federated DP synthetic data (``orchestrator synth DATASET --epsilon E --rows N``).

Every online site holding the dataset measures noisy one- and two-way marginals of its own
rows under its own budget (``site_agent.handlers.synth``); the orchestrator checks they used the
same declared schema, sums the counts (``orchestrator.synthesis_tree.combine``), fits a
maximum spanning tree of two-way marginals and samples rows (``fit_and_sample``, MST-style,
McKenna et al. 2021).
No single site's rows or counts are published: only rows sampled from the summed model.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from common.domain import SiteStatus
from common.dp import noise
from common.errors import InvalidSpecError, NotFoundError
from common.synthesis.discretisation import Schema
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
    holders = [s.site_id for s, _ in online_holders(sites, dataset)]
    if not holders:
        raise NotFoundError(f"no online site exposes dataset {dataset!r}")
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
    )
    problems = {sid: f"{f.code}: {f.reason}" for sid, f in res.failures.items()}
    if not res.updates:
        raise NotFoundError(
            f"no site measured dataset {dataset!r}: "
            + "; ".join(f"{sid}: {why}" for sid, why in sorted(problems.items()))
        )
    measurements = []
    schema: Schema | None = None
    for sid, upd in sorted(res.updates.items()):
        try:
            body = json.loads(upd.meta.result_json)
            site_schema = Schema.from_dict(body["schema"])
        except (ValueError, KeyError, TypeError, RecursionError, InvalidSpecError):
            problems[sid] = "INVALID_ARGUMENT: malformed measurement"
            continue
        if schema is None:
            schema = site_schema
        elif site_schema.fingerprint() != schema.fingerprint():
            raise InvalidSpecError(
                f"site {sid} declares a different schema (types, bounds or categories) for "
                f"dataset {dataset!r} than the other sites; align their site.yaml `columns`"
            )
        measurements.append(body["measurement"])
    if schema is None:
        raise NotFoundError(f"no usable measurement of dataset {dataset!r}: {problems}")
    combined = combine(measurements)
    frame = fit_and_sample(combined, schema, rows=rows, rng=noise.private_numpy_rng())
    info = {
        "dataset": dataset,
        "rows": rows,
        "epsilon_per_site": epsilon,
        "delta": delta,
        "sites": sorted(res.updates),
        "sites_missing": problems,
        "columns": list(schema.names),
        "method": "MST-style: summed noisy 1- and 2-way marginals, maximum spanning tree, "
        "sampling (McKenna et al. 2021)",
        "guarantee": f"({epsilon:g}, {delta:g})-DP for each record at its own site",
    }
    return frame.to_csv(index=False), info
