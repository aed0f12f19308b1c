"""The registry of job kinds, keyed by the ``kind`` a job spec (or a stored job) names.

As Opacus registers its accountants by name, each kind is one :class:`JobKind` here:
training (``orchestrator.training``), mixtures (``orchestrator.clustering``), and the one-shot
releases, synthetic data (``orchestrator.synthesis``) and federated evaluation
(``orchestrator.evaluation``). The coordinator starts, prepares and plans jobs, and the CLI
writes what a job released, by looking the kind up here; a new kind is a module and an entry.

This module imports no job code: a kind's runner, ``prepare`` and ``plan`` are loaded when
first called, so the CLI reads ``released_files`` without loading torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.errors import InvalidSpecError

if TYPE_CHECKING:
    from common.domain import Plan, SiteStatus
    from orchestrator.core.broker import Broker
    from orchestrator.jobs.base import JobThread


def _no_summary(card: Mapping[str, Any]) -> str:
    return ""


@dataclass(frozen=True)
class JobKind:
    """What the coordinator, the CLI and the status views need to know about one kind of job.

    ``runner()``: the thread class that runs a submitted job of this kind; None for a
    one-shot release answered on the caller's thread (still recorded as a job of its kind,
    and never resumed). ``prepare(spec, sites, max_parameters)``: the spec as the job will
    run it (e.g. with its feature encoding derived from the sites' declared schemas) and its
    number of rounds, or a clear error before anything starts. ``plan(spec, sites, broker,
    max_parameters)``: each site's projected cost; None when the kind is not planned ahead.
    ``released_file``: the artefact written next to ``model_card.json``; ``load_hint``: how to
    load it (``{path}`` filled in); ``summary(card)``: what the CLI adds about a release.
    """

    name: str
    runner: Callable[[], type[JobThread]] | None = None
    prepare: Callable[[Any, Sequence[SiteStatus], int], tuple[Any, int]] | None = None
    plan: Callable[[Any, Sequence[SiteStatus], Broker, int], Plan] | None = None
    released_file: str | None = None
    load_hint: str = ""
    summary: Callable[[Mapping[str, Any]], str] = _no_summary


# ------------------------------------------------------------------ training


def _train_runner() -> type[JobThread]:
    from orchestrator.training.rounds import JobRunner

    return JobRunner


def _train_prepare(spec: Any, sites: Sequence[SiteStatus], max_parameters: int) -> tuple[Any, int]:
    from orchestrator.training.kind import prepare

    return prepare(spec, sites, max_parameters)


def _train_plan(
    spec: Any, sites: Sequence[SiteStatus], broker: Broker, max_parameters: int
) -> Plan:
    from orchestrator.training.kind import plan

    return plan(spec, sites, broker, max_parameters)


TRAIN = JobKind(
    name="train",
    runner=_train_runner,
    prepare=_train_prepare,
    plan=_train_plan,
    released_file="model.safetensors",
    load_hint="common.training.models.load_model({path!r})",
)

# ------------------------------------------------------------------ mixtures


def _gmm_runner() -> type[JobThread]:
    from orchestrator.clustering.runner import GmmRunner

    return GmmRunner


def _gmm_prepare(spec: Any, sites: Sequence[SiteStatus], max_parameters: int) -> tuple[Any, int]:
    from orchestrator.clustering.kind import prepare

    return prepare(spec, sites, max_parameters)


def _gmm_summary(card: Mapping[str, Any]) -> str:
    return f"K = {card['model']['K']}, "


GMM = JobKind(
    name="gmm",
    runner=_gmm_runner,
    prepare=_gmm_prepare,
    released_file="mixture.json",
    load_hint="common.clustering.released.load_mixture({path!r}).predict(X)",
    summary=_gmm_summary,
)

# ------------------------------------------------------------------ one-shot releases

SYNTH = JobKind(name="synth")
"""Synthetic data (``orchestrator.synthesis``): rows go back to the caller, no file."""

EVALUATE = JobKind(name="evaluate")
"""Federated evaluation of a released model (``orchestrator.evaluation``)."""

DEFAULT_KIND = TRAIN.name
"""The kind of a spec that names none."""

KINDS: Mapping[str, JobKind] = {k.name: k for k in (TRAIN, GMM, SYNTH, EVALUATE)}


def kind_named(name: str) -> JobKind:
    """The registered kind ``name``; InvalidSpecError names the registered ones otherwise."""
    kind = KINDS.get(name)
    if kind is None:
        raise InvalidSpecError(
            f"unknown job kind {name!r}; the kinds are: {', '.join(sorted(KINDS))}"
        )
    return kind


def kind_of_spec(spec_json: str) -> JobKind:
    """The kind a job spec (as JSON, e.g. a stored job's) names, ``train`` when none."""
    try:
        data: Any = json.loads(spec_json)
    except (ValueError, RecursionError):
        raise InvalidSpecError("invalid job spec: not valid JSON (or nested too deeply)") from None
    name = data.get("kind", DEFAULT_KIND) if isinstance(data, dict) else DEFAULT_KIND
    return kind_named(str(name))


def released_files(card: Mapping[str, Any]) -> tuple[str, str, str]:
    """What a released job wrote next to its card, from the card: the artefact's file name,
    the CLI's summary of it (e.g. "K = 3, ") and how to load it (``{path}`` to fill in)."""
    kind = kind_named(str(card.get("kind", DEFAULT_KIND)))
    if kind.released_file is None:
        raise InvalidSpecError(f"a {kind.name} job releases no model")
    return kind.released_file, kind.summary(card), kind.load_hint
