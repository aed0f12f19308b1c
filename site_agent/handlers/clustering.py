"""``gmm`` and ``gmm_local``: the site's side of a mixture job, one pass over the rows per request.

Every request is priced first (``site_agent.gmm_stats.request_cost``: the sensitivities are
computed here from the request's shape, never read from it), admitted against the site's
policy and budget and charged to the ledger, and only then answered with noised statistics.
CSV datasets are streamed from the file in ``chunk_rows`` chunks, so memory holds one chunk.
Parquet datasets are read row group by row group, each cut into ``chunk_rows`` chunks, by the
statistics engine's map (``site_agent.dask_engine``): in the agent's process for ``engine:
local``, on the site's cluster for ``engine: dask``; both sum the same chunks' statistics in
the same order, so they release the same values (bootstrap requests read the table, loaded
after the charge). SQL datasets are chunked from the table, loaded after the charge. Either
way every row is typed by the declared schema (``site_agent.data.loading``): values clipped to
the declared bounds, rows without a declared label or with a missing value in a requested
column left out, each by a rule on that record alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from common.clustering.federated_em import FederatedEM
from common.domain import TaskAssignment
from common.dp import noise
from common.dp.events import DpEvent
from common.errors import InvalidSpecError
from site_agent.boundary.admission import Release
from site_agent.boundary.disclosure import SiteContext
from site_agent.dask_engine import MixtureRequestStats, StatsEngine, add_mixture
from site_agent.data.loading import LocalDataset, iter_typed_chunks
from site_agent.gmm_stats import answer_request, request_cost
from site_agent.handlers.base import Plan, Reply, TaskHandler, parse_request, reply


class MixtureTask(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    columns: tuple[str, ...] = Field(min_length=1, max_length=64)
    request: dict[str, Any]


def _check_columns(site: SiteContext, columns: tuple[str, ...], dataset: str) -> None:
    """Refuse unknown columns and columns without declared numeric bounds (config only)."""
    cfg = site.datasets.config_of(dataset)
    names = site.datasets.shape(dataset).feature_names
    unknown = [c for c in columns if c not in names]
    if unknown:
        raise InvalidSpecError(f"dataset {dataset!r} has no feature column(s) {unknown}")
    for info in cfg.feature_schema(columns):
        if info.type != "numeric" or info.min is None or info.max is None:
            raise InvalidSpecError(
                f"column {info.name!r} of dataset {dataset!r} has no declared numeric bounds here"
            )


def _rows(part: LocalDataset, columns: tuple[str, ...]) -> npt.NDArray[np.float64]:
    """The typed values of ``columns`` (clipped at load), rows with a missing value left out:
    a decision on each record alone."""
    if not columns:
        return np.zeros((len(part), 0), dtype=np.float64)
    x = np.stack([np.asarray(part.table.columns[c], dtype=np.float64) for c in columns], axis=1)
    return x[~np.isnan(x).any(axis=1)]


@dataclass(frozen=True)
class MixturePlan(Plan):
    body: MixtureTask
    event: DpEvent
    engine: StatsEngine | None


class MixtureHandler(TaskHandler[MixturePlan]):
    """``gmm``: one mixture request, priced from its shape, admitted and charged, then
    answered; with an engine (``engine: dask``) an E-step request's exact statistics are
    computed on the site's cluster after the charge (``tests/unit/test_dask_wiring.py``)."""

    kind = "gmm"

    def plan(self, site: SiteContext, task: TaskAssignment) -> MixturePlan:
        body = parse_request(MixtureTask, task, source="gmm request")
        _check_columns(site, body.columns, task.dataset)
        event = request_cost(body.request)
        release = Release(
            what=f"the mixture statistics (round {task.round})",
            events=(event,),
            delta=site.config.policy.delta,
            kinds=("gmm",),
        )
        return MixturePlan(release, body, event, site.datasets.engine(task.dataset))

    def run(self, site: SiteContext, task: TaskAssignment, plan: MixturePlan, blob: bytes) -> Reply:
        body = plan.body
        result, charged, n_rows = _answer(
            site, task.dataset, body.columns, body.request, plan.engine
        )
        if charged != plan.event:
            raise InvalidSpecError("internal: the answered release differs from the one charged")
        return reply(
            site,
            task,
            events=[plan.event],
            delta=site.config.policy.delta,
            num_examples=max(1, n_rows),
            result_json=json.dumps(result),
        )


def _answer(
    site: SiteContext,
    dataset: str,
    columns: tuple[str, ...],
    request: dict[str, Any],
    engine: StatsEngine | None,
) -> tuple[dict[str, Any], DpEvent, int]:
    """One request answered over the dataset's rows: ``(result, event, rows used)``. Init,
    EM and evaluation requests on Parquet go through the engine's map (``engine`` or, for
    ``engine: local``, the same map in this process); the others stream the rows here."""
    cfg = site.datasets.config_of(dataset)
    if engine is None and cfg.source_format() == "parquet":
        engine = site.datasets.parquet_engine(dataset)
    if engine is not None and request.get("kind") != "gmm.boot":
        stats_map = MixtureRequestStats(columns, cfg.chunk_rows, request)
        rows, partials = engine.fold(stats_map, (0, []), add_mixture)
        result, event = answer_request(
            request, [], rng=noise.private_numpy_rng(), partials=partials
        )
        return result, event, rows
    n_rows = 0

    def in_memory() -> Iterator[LocalDataset]:
        split = site.datasets.split(dataset)
        for part in (split.train, split.validation):
            if part is not None:
                yield part

    def chunks() -> Iterator[npt.NDArray[np.float64]]:
        nonlocal n_rows
        parts = iter_typed_chunks(cfg, columns) if cfg.source_format() == "csv" else in_memory()
        for part in parts:
            x = _rows(part, columns)
            for start in range(0, len(x), cfg.chunk_rows):
                n_rows += len(x[start : start + cfg.chunk_rows])
                yield x[start : start + cfg.chunk_rows]

    result, event = answer_request(request, chunks(), rng=noise.private_numpy_rng())
    return result, event, n_rows


class LocalFitTask(BaseModel):
    """One-shot federation: fit a DP mixture on this site's rows alone and release it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    columns: tuple[str, ...] = Field(min_length=1, max_length=64)
    K: int = Field(ge=1, le=50)
    covariance_type: str = Field(pattern="^(full|diag)$")
    bounds: list[list[float]]
    max_rounds: int = Field(ge=1, le=500)
    tol: float = Field(gt=0.0, le=1.0)
    noise_multiplier: float = Field(ge=0.01, le=1000.0)
    seed: int = Field(ge=0)


@dataclass(frozen=True)
class LocalFitPlan(Plan):
    body: LocalFitTask
    em: FederatedEM
    planned: tuple[DpEvent, ...]
    engine: StatsEngine | None


class LocalFitHandler(TaskHandler[LocalFitPlan]):
    """``gmm_local``: federated EM's state machine run against this site only; the final
    mixture is released. Its intermediate noisy statistics never leave the site, but the
    mixture is computed from them, so the site charges the whole run's worst case (every
    planned release) up front."""

    kind = "gmm_local"

    def with_public_count(self, answer: Reply, total: int) -> Reply:
        """The fit's ``rows`` weight (the orchestrator pools fits by it) is the disclosed
        size too."""
        meta, blob = super().with_public_count(answer, total)
        result = {**json.loads(meta.result_json), "rows": total}
        return dataclasses.replace(meta, result_json=json.dumps(result)), blob

    def plan(self, site: SiteContext, task: TaskAssignment) -> LocalFitPlan:
        body = parse_request(LocalFitTask, task, source="gmm local fit")
        _check_columns(site, body.columns, task.dataset)
        em = FederatedEM(
            K=body.K,
            covariance_type=body.covariance_type,
            bounds=np.asarray(body.bounds, dtype=np.float64),
            max_rounds=body.max_rounds,
            tol=body.tol,
            noise_multiplier=body.noise_multiplier,
            seed=body.seed,
        )
        planned = tuple(em.planned_events())
        release = Release(
            what="a local DP mixture fit (one-shot federation)",
            events=planned,
            delta=site.config.policy.delta,
            kinds=("gmm",),
        )
        return LocalFitPlan(release, body, em, planned, site.datasets.engine(task.dataset))

    def run(
        self, site: SiteContext, task: TaskAssignment, plan: LocalFitPlan, blob: bytes
    ) -> Reply:
        em = plan.em
        n_rows = 0
        request: dict[str, Any] | None = em.initial_request()
        while request is not None:
            result, _, n_rows = _answer(site, task.dataset, plan.body.columns, request, plan.engine)
            request = em.absorb([result])
        params = em.result()
        return reply(
            site,
            task,
            events=plan.planned,
            delta=site.config.policy.delta,
            num_examples=max(1, n_rows),
            result_json=json.dumps({"mixture": params.to_dict(), "rows": n_rows}),
        )
