"""The registry of job kinds, keyed by the ``kind`` a job spec (or a stored job) names.

As Opacus registers its accountants by name, each kind is one :class:`JobKind` from the
module that implements it: training (``orchestrator.training``), mixtures
(``orchestrator.clustering``), and the one-shot releases, synthetic data
(``orchestrator.synthesis``) and federated evaluation (``orchestrator.evaluation``). The
coordinator starts, prepares and plans jobs, and the CLI writes what a job released, by
looking the kind up here: a new kind is a module and a line below.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from common.errors import InvalidSpecError
from orchestrator.clustering.kind import GMM
from orchestrator.evaluation import EVALUATE
from orchestrator.jobs.base import JobKind
from orchestrator.synthesis import SYNTH
from orchestrator.training.kind import TRAIN

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
    the CLI's summary of it and how to load it (``{path}`` to fill in)."""
    kind = kind_named(str(card.get("kind", DEFAULT_KIND)))
    if kind.released_file is None:
        raise InvalidSpecError(f"a {kind.name} job releases no model")
    return kind.released_file, kind.summary(card), kind.load_hint
