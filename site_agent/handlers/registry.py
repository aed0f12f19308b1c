"""The task kinds this site runs, each with its handler (``site_agent.handlers.base``)."""

from __future__ import annotations

from typing import Any

from common.errors import InvalidSpecError
from site_agent.handlers.admit import AdmitHandler
from site_agent.handlers.base import TaskHandler
from site_agent.handlers.canaries import AuditHandler
from site_agent.handlers.clustering import LocalFitHandler, MixtureHandler
from site_agent.handlers.evaluate import EvaluateHandler
from site_agent.handlers.quantiles import QuantilesHandler
from site_agent.handlers.synth import SynthHandler
from site_agent.handlers.train import TrainHandler

HANDLERS: dict[str, TaskHandler[Any]] = {
    h.kind: h
    for h in (
        TrainHandler(),
        EvaluateHandler(),
        SynthHandler(),
        MixtureHandler(),
        LocalFitHandler(),
        QuantilesHandler(),
        AuditHandler(),
        AdmitHandler(),
    )
}


def handler_for(kind: str) -> TaskHandler[Any]:
    """The handler of task ``kind``; InvalidSpecError naming the kinds this agent runs."""
    handler = HANDLERS.get(kind)
    if handler is None:
        raise InvalidSpecError(f"unknown task kind {kind!r}; this agent runs {', '.join(HANDLERS)}")
    return handler
