"""The JSON request/response messages of federated clustering (protocol ``dpfed.gmm/1``).

Requests go from the orchestrator to the sites, results come back; both sides validate with
:func:`parse_request` / :func:`parse_result` (``InvalidSpecError`` on anything else), and
:func:`release_event` is the one rule for what answering a request costs a site.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.clustering.bootstrap import MAX_REPLICATES
from common.clustering.model import MAX_CANDIDATES, MAX_FEATURES, MAX_MODELS_PER_REQUEST
from common.dp.events import DpEvent
from common.errors import InvalidSpecError

__all__ = [
    "PROTOCOL",
    "BootRequest",
    "BootResult",
    "EmRequest",
    "EmResult",
    "EvalRequest",
    "EvalResult",
    "InitRequest",
    "InitResult",
    "ModelRequest",
    "WireDpEvent",
    "parse_request",
    "parse_result",
]


PROTOCOL: Final = "dpfed.gmm/1"
"""Version tag carried by every request and result."""


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class WireDpEvent(_Wire):
    """A :class:`~common.dp.events.DpEvent` on the wire."""

    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=1)

    @classmethod
    def of(cls, event: DpEvent) -> WireDpEvent:
        return cls(
            noise_multiplier=event.noise_multiplier,
            sample_rate=event.sample_rate,
            steps=event.steps,
        )


class _Request(_Wire):
    """What every request carries: the protocol, the declared bounds (data units) and σ."""

    protocol: Literal["dpfed.gmm/1"] = PROTOCOL
    bounds: tuple[tuple[float, float], ...] = Field(min_length=1, max_length=MAX_FEATURES)
    noise_multiplier: float = Field(gt=0)


class _ModelsRequest(_Request):
    """A request about models: their covariance type (and, per kind, which models)."""

    covariance_type: Literal["full", "diag"]


class _Result(_Wire):
    """What every result carries: the protocol and the DP event the site charged for it."""

    protocol: Literal["dpfed.gmm/1"] = PROTOCOL
    dp_event: WireDpEvent


class InitRequest(_Request):
    """Ask a site for noisy nearest-candidate counts and sums (the DP initialisation).

    ``candidates`` are in data units; the site maps them into its unit box.
    """

    kind: Literal["gmm.init"] = "gmm.init"
    round: int = Field(default=0, ge=0)
    candidates: tuple[tuple[float, ...], ...] = Field(min_length=1, max_length=MAX_CANDIDATES)


class ModelRequest(_Wire):
    """One model whose E-step statistics are asked for; ``params`` in data units."""

    key: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.=-]+$")
    params: dict[str, Any]


class EmRequest(_ModelsRequest):
    """Ask a site for noisy E-step statistics of one or more models (one EM round)."""

    kind: Literal["gmm.em"] = "gmm.em"
    round: int = Field(ge=1)
    loglik_weight: float = Field(default=1.0, gt=0, le=1000)
    models: tuple[ModelRequest, ...] = Field(min_length=1, max_length=MAX_MODELS_PER_REQUEST)


class EvalRequest(_ModelsRequest):
    """Ask a site for the noisy scaled log-likelihood sum of fixed models (model selection)."""

    kind: Literal["gmm.eval"] = "gmm.eval"
    round: int = Field(ge=1)
    models: tuple[ModelRequest, ...] = Field(min_length=1, max_length=MAX_MODELS_PER_REQUEST)


class BootRequest(_ModelsRequest):
    """Ask a site for noisy Poisson-bootstrap replicates of the E-step statistics of the final
    model (the ``bootstrap:`` job option). The site derives the weight norm bound and the
    sensitivity from ``replicates``, ``weight_cap`` and the model's shape itself."""

    kind: Literal["gmm.boot"] = "gmm.boot"
    round: int = Field(ge=1)
    replicates: int = Field(ge=2, le=MAX_REPLICATES)
    weight_cap: int = Field(ge=1, le=100)
    model: ModelRequest


class InitResult(_Result):
    """A site's answer to :class:`InitRequest`: noised :class:`CandidateStats` (unit box)."""

    kind: Literal["gmm.init.result"] = "gmm.init.result"
    round: int = Field(ge=0)
    stats: dict[str, Any]


class EmResult(_Result):
    """A site's answer to :class:`EmRequest`: noised :class:`SufficientStats` per model key."""

    kind: Literal["gmm.em.result"] = "gmm.em.result"
    round: int = Field(ge=1)
    stats: dict[str, dict[str, Any]]


class EvalResult(_Result):
    """A site's answer to :class:`EvalRequest`: noisy :func:`scaled_loglik_sum` per model."""

    kind: Literal["gmm.eval.result"] = "gmm.eval.result"
    round: int = Field(ge=1)
    logliks: dict[str, float]


class BootResult(_Result):
    """A site's answer to :class:`BootRequest`: noised :class:`ReplicateStats` (unit box)."""

    kind: Literal["gmm.boot.result"] = "gmm.boot.result"
    round: int = Field(ge=1)
    key: str
    stats: dict[str, Any]


def _parse(obj: object, options: Mapping[str, type[_Wire]], what: str) -> _Wire:
    if not isinstance(obj, Mapping):
        raise InvalidSpecError(f"A GMM {what} must be a JSON object.")
    kind = obj.get("kind")
    cls = options.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise InvalidSpecError(
            f"Unknown GMM {what} kind {kind!r}; expected one of {sorted(options)}."
        )
    try:
        return cls.model_validate(dict(obj))
    except ValidationError as err:
        raise InvalidSpecError(f"Invalid GMM {what} ({kind}): {err}") from None


def parse_request(obj: object) -> InitRequest | EmRequest | EvalRequest | BootRequest:
    """Validate a request dict; raises :class:`~common.errors.InvalidSpecError`."""
    options: dict[str, type[_Wire]] = {
        "gmm.init": InitRequest,
        "gmm.em": EmRequest,
        "gmm.eval": EvalRequest,
        "gmm.boot": BootRequest,
    }
    return cast(
        InitRequest | EmRequest | EvalRequest | BootRequest, _parse(obj, options, "request")
    )


def release_event(req: InitRequest | EmRequest | EvalRequest | BootRequest) -> DpEvent:
    """What answering ``req`` costs a site: ``DpEvent(σ, 1.0, m)`` for an EM or evaluation
    request naming m models, ``DpEvent(σ, 1.0, 1)`` for an init or a bootstrap request. The
    site charges it and the orchestrator records it, from this one rule."""
    steps = len(req.models) if isinstance(req, EmRequest | EvalRequest) else 1
    return DpEvent(req.noise_multiplier, 1.0, steps)


def parse_result(obj: object) -> InitResult | EmResult | EvalResult | BootResult:
    """Validate a result dict; raises :class:`~common.errors.InvalidSpecError`."""
    options: dict[str, type[_Wire]] = {
        "gmm.init.result": InitResult,
        "gmm.em.result": EmResult,
        "gmm.eval.result": EvalResult,
        "gmm.boot.result": BootResult,
    }
    return cast(InitResult | EmResult | EvalResult | BootResult, _parse(obj, options, "result"))
