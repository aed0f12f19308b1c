"""The site's side of the privacy audit: secret canaries for a job, and their scores.

Canaries are synthetic (uniform in the dataset's declared feature bounds — [0, 1] for a
column without declared bounds — with uniform random labels), drawn from OS entropy when a
job's first task arrives and kept in the state directory with their inclusion coins, which
never leave the site. Scoring them under the released model is post-processing of a public
model and synthetic records: it costs no privacy on the site's data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from common import noise
from common.audit import make_canaries
from common.errors import InvalidSpecError, NotFoundError
from common.models import build_model, load_weights, parse_model_spec
from common.specs import JobSpec, model_dims
from common.tensors import state_from_bytes
from site_agent.config import DatasetConfig

Canaries = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.bool_]]


def _path(state_dir: Path, job_id: str) -> Path:
    if not job_id.replace("-", "").replace("_", "").isalnum():
        raise InvalidSpecError("invalid job id for an audit")
    return state_dir / "audit" / f"{job_id}.npz"


def canaries_for(
    state_dir: Path, job_id: str, spec: JobSpec, cfg: DatasetConfig, feature_names: tuple[str, ...]
) -> Canaries:
    """This job's canaries, created on first use and stable across rounds and restarts."""
    assert spec.audit is not None
    path = _path(state_dir, job_id)
    if path.exists():
        with np.load(path) as z:
            return z["x"], z["y"], z["included"]
    lows = np.array([_bound(cfg, n)[0] for n in feature_names], dtype=np.float64)
    highs = np.array([_bound(cfg, n)[1] for n in feature_names], dtype=np.float64)
    rng = noise.private_numpy_rng()
    x, y, inc = make_canaries(
        num=spec.audit.canaries,
        lows=lows,
        highs=highs,
        num_classes=model_dims(spec.model)[1],
        rng=rng,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y, included=inc)
    tmp.replace(path)
    return x, y, inc


def _bound(cfg: DatasetConfig, name: str) -> tuple[float, float]:
    spec = cfg.columns.get(name)
    if (
        spec is not None
        and spec.type == "numeric"
        and spec.min is not None
        and spec.max is not None
    ):
        return spec.min, spec.max
    if spec is not None and spec.type == "categorical" and spec.categories:
        return 0.0, float(len(spec.categories))
    return 0.0, 1.0


def score_canaries(state_dir: Path, job_id: str, request_json: str, blob: bytes) -> str:
    """Per-canary losses under the released model, with the coins: the audit's input."""
    path = _path(state_dir, job_id)
    if not path.exists():
        raise NotFoundError(f"this site holds no canaries for job {job_id}")
    try:
        req = json.loads(request_json)
        spec = parse_model_spec(req["model"], source="audit request model")
    except (ValueError, KeyError, TypeError, RecursionError):
        raise InvalidSpecError("malformed audit request") from None
    with np.load(path) as z:
        x, y, inc = z["x"], z["y"], z["included"]
    model = build_model(spec)
    load_weights(model, state_from_bytes(blob), what="the audited model")
    model.eval()
    with torch.no_grad():
        losses = nn.functional.cross_entropy(
            model(torch.from_numpy(x)), torch.from_numpy(y), reduction="none"
        )
    return json.dumps({"losses": losses.tolist(), "included": inc.astype(bool).tolist()})
