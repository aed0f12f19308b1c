"""DP quantile bin edges for a job's piecewise-linear encoding (``encoding.numeric: quantile``).

Before the first round, every participating site releases noised histograms of each binned
numeric column over a fixed grid of its declared ``[min, max]`` (``site_agent.handlers.quantiles``:
one Gaussian mechanism, charged to the site's ledger before it is computed). Each answer is
charged to the job as it is received (so it is in the job's ε and on the card), with the
event the orchestrator assigned, never the one a site claims. The sums over sites give a
noisy CDF per column; its inverse at ``t / T`` gives the inner edges (post-processing). The
noisy CDF is made monotone by dropping negative counts; the edges are then mixed with the
uniform ones (weight ``UNIFORM_WEIGHT``) so that they are strictly increasing (every bin at
least ``UNIFORM_WEIGHT / T`` of the range wide) and run exactly from ``min`` to ``max``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from common.errors import InvalidSpecError, InvalidUpdateError, JobFailedError
from common.schema.encoding import FeatureEncoding, derive_encoding, uniform_edges
from common.specs import JobSpec, parse_job_spec
from orchestrator.core.broker import Broker
from orchestrator.core.fanout import fan_out
from orchestrator.core.store import Store
from orchestrator.planning import quantile_event

UNIFORM_WEIGHT = 0.02
"""Share of the uniform edges mixed into the quantile edges (keeps every bin open)."""

KIND = "quantiles"
"""The site task kind (``site_agent.handlers.quantiles``)."""


def edges_from_histogram(
    counts: npt.ArrayLike, low: float, high: float, bins: int
) -> tuple[float, ...]:
    """``bins + 1`` strictly increasing edges from ``low`` to ``high`` at the quantiles
    ``1/bins, ..., (bins-1)/bins`` of the (noisy) histogram ``counts`` over equal cells of
    ``[low, high]``, interpolated linearly within a cell. Negative counts count as zero; with
    no positive count the edges are uniform."""
    c = np.clip(np.nan_to_num(np.asarray(counts, dtype=np.float64), nan=0.0), 0.0, None)
    uniform = np.asarray(uniform_edges(low, high, bins), dtype=np.float64)
    total = float(c.sum())
    if not (total > 0 and math.isfinite(total)):
        return tuple(float(e) for e in uniform)
    cdf = np.concatenate([[0.0], np.cumsum(c)]) / total
    cells = np.linspace(low, high, c.shape[0] + 1)
    inner = []
    for t in np.arange(1, bins) / bins:
        k = int(np.searchsorted(cdf, t, side="left"))  # first boundary with cdf >= t
        k = min(max(k, 1), c.shape[0])
        lo_cdf, hi_cdf = cdf[k - 1], cdf[k]
        frac = (t - lo_cdf) / (hi_cdf - lo_cdf) if hi_cdf > lo_cdf else 1.0
        inner.append(cells[k - 1] + min(max(frac, 0.0), 1.0) * (cells[k] - cells[k - 1]))
    raw = np.asarray([low, *inner, high], dtype=np.float64)
    raw = np.maximum.accumulate(raw)
    mixed = (1.0 - UNIFORM_WEIGHT) * raw + UNIFORM_WEIGHT * uniform
    mixed[0], mixed[-1] = low, high
    if np.any(np.diff(mixed) <= 0):  # a range too narrow for float64 steps: stay uniform
        return tuple(float(e) for e in uniform)
    return tuple(float(e) for e in mixed)


def quantile_request(spec: JobSpec, encoding: FeatureEncoding) -> dict[str, Any]:
    """What each site is asked: the binned columns with their bounds, the grid, σ, δ."""
    cols = [f.column for f in encoding.features if f.kind == "quantile"]
    return {
        "columns": [{"name": c.name, "min": c.min, "max": c.max} for c in cols],
        "grid": spec.encoding.quantile_grid,
        "noise_multiplier": spec.encoding.quantile_noise_multiplier,
        "delta": spec.dp.delta,
    }


def _histograms(
    result_json: str, columns: Sequence[Mapping[str, Any]], grid: int
) -> dict[str, npt.NDArray[np.float64]]:
    """A site's answer, checked: every column, ``grid`` finite numbers each."""
    try:
        data = json.loads(result_json)
        hist = data["histograms"]
        out = {}
        for c in columns:
            h = np.asarray(hist[c["name"]], dtype=np.float64)
            if h.shape != (grid,) or not np.isfinite(h).all():
                raise InvalidUpdateError(f"its histogram of column {c['name']!r} is malformed")
            out[c["name"]] = h
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidUpdateError(f"its quantile histograms cannot be read ({err})") from None
    return out


def release_quantile_edges(
    *,
    store: Store,
    broker: Broker,
    job_id: str,
    spec: JobSpec,
    site_ids: Sequence[str],
    check: Callable[[], None],
    event: Callable[..., None],
    charge_ahead: Callable[..., dict[str, str]],
) -> JobSpec:
    """``spec`` with DP quantile edges in its encoding (``spec`` itself when it has no
    quantile columns or they were released already), stored as the job's spec.

    ``check`` runs while the sites are asked and may raise (``JobThread._abandon_if_stopped``:
    a cancelled job, or JobStopped when the orchestrator shuts down: the job resumes after a
    restart and asks again); ``charge_ahead`` (``JobThread._charge_ahead``) writes every
    asked site's charge before the request is sent, so an answer then rejected, a site that
    does not answer and a crash mid-request all leave the release counted.

    Raises:
        JobFailedError: no site released usable histograms.
    """

    enc = spec.encoding
    if enc.numeric != "quantile" or enc.edges_released:
        return spec
    encoding = enc.feature_encoding(require_edges=False)
    request = quantile_request(spec, encoding)
    assigned = quantile_event(spec)
    edges: dict[str, tuple[float, ...]] = {}
    if request["columns"] and assigned is not None:
        task_ids = charge_ahead(
            list(site_ids),
            0,
            dataset=spec.dataset,
            delta=spec.dp.delta,
            events=[("metrics", assigned)],
        )
        res = fan_out(
            broker,
            site_ids=list(site_ids),
            job_id=job_id,
            kind=KIND,
            dataset=spec.dataset,
            request_json=json.dumps(request),
            timeout_s=spec.round_timeout_s,
            round_=0,
            rounds=spec.rounds,
            check=check,
            task_ids=task_ids,
        )
        sums: dict[str, npt.NDArray[np.float64]] = {}
        used: list[str] = []
        for sid, upd in sorted(res.updates.items()):
            upd.payload.close()
            meta = upd.meta
            try:
                hist = _histograms(meta.result_json, request["columns"], request["grid"])
            except InvalidUpdateError as err:
                event("warning", f"rejected the quantile histograms of site {sid}: {err}", sid)
                continue
            for name, h in hist.items():
                sums[name] = sums[name] + h if name in sums else h
            used.append(sid)
        for sid, fail in sorted(res.failures.items()):
            event("warning", f"site {sid} released no quantile histograms: {fail.reason}", sid)
        if not used:
            raise JobFailedError(
                "no site released quantile histograms, so the encoding has no bin edges: "
                + "; ".join(f"{sid}: {f.reason}" for sid, f in sorted(res.failures.items()))
            )
        for c in request["columns"]:
            edges[c["name"]] = edges_from_histogram(sums[c["name"]], c["min"], c["max"], enc.bins)
        event(
            "info",
            f"quantile bin edges from the noised histograms of {len(used)} site(s) "
            f"({', '.join(used)}; noise multiplier {assigned.noise_multiplier:g}, charged)",
        )
    new = derive_encoding(
        encoding.feature_schema(), encoding.label, numeric="quantile", edges=edges
    )
    if new.width != encoding.width:
        raise InvalidSpecError("internal: the released edges changed the encoding's width")
    data = spec.model_dump(mode="json")
    data["encoding"] = {**data["encoding"], **new.to_dict(), "edges_released": True}
    out = parse_job_spec(data)
    store.update_job(job_id, spec_json=out.model_dump_json())
    return out
