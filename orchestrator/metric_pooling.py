"""Validation metrics pooled over sites from their noised sums, with standard errors.

Each site releases, through one Gaussian mechanism with noise multiplier σ
(``site_agent.trainer.evaluate``), the noised sums over its validation rows of
``v_i = (1, c_i, ℓ_i/B, e_i)``: a row count, the correct predictions, the losses clipped to
``[0, B]`` and, for binary labels, a one-hot (label, score bin) histogram. ``‖v_i‖ ≤ Δ`` with
``Δ = √3`` (``2`` with the histogram), so every coordinate carries independent noise
``N(0, (σΔ)²)``; sites' noises are independent too.

Pooling adds the sites' sums *before* dividing: with ``K`` sites the pooled count ``N̂`` and
correct count ``Ĉ`` each carry noise of variance ``V = Σ_k (σ_k Δ_k)²``, so

    accuracy = Ĉ / N̂,    SE ≈ √(V + accuracy² · V) / N̂          (delta method)
    loss     = L̂ / N̂,    SE ≈ √(B² V + loss² · V) / N̂

The standard errors describe the DP noise only (the sampling error of the validation rows is
not included); they are evaluated at the released values, which is post-processing. Nothing
is clamped: a noised accuracy of 1.07 is shown as such, with its SE, and a pooled count at or
below 1 gives an undefined value (NaN, SE ∞) instead of a made-up one.

ROC AUC comes from the pooled histograms ``n⁻_b`` (label 0) and ``n⁺_b`` (label 1) of the
model's P(class 1) in ``H`` equal bins: the Mann–Whitney statistic with pairs in the same bin
counted ½ (Hanley & McNeil, Radiology 1982; Fawcett, Pattern Recognit. Lett. 2006),

    AUC = Σ_b n⁺_b (Σ_{b'<b} n⁻_{b'} + ½ n⁻_b) / (N⁺ N⁻),

which differs from the AUC of the unbinned scores by at most ``½ Σ_b n⁺_b n⁻_b / (N⁺ N⁻)``
(the pairs sharing a bin), and its SE by the delta method over the ``2H`` noised cells.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from common.domain import Estimate, Metrics, PooledMetrics
from common.dp.events import DpEvent
from common.specs import JobSpec

UNDEFINED = Estimate(math.nan, math.inf)

EVALUATE_LOSS_BOUND = 5.0
"""Per-example loss clip ``B`` of ``orchestrator evaluate`` (the training default)."""


def sensitivity(*, histogram: bool) -> float:
    """L2 sensitivity of one site's released vector: ``√3``, or ``2`` with a histogram."""
    return 2.0 if histogram else math.sqrt(3.0)


def _ratio(num: float, den: float, var_num: float, var_den: float) -> Estimate:
    if not den >= 1.0:
        return UNDEFINED
    value = num / den
    return Estimate(value, math.sqrt(var_num + value * value * var_den) / den)


def auc_from_histograms(negative: npt.ArrayLike, positive: npt.ArrayLike) -> float:
    """ROC AUC of scores binned per class (ties within a bin count ½); NaN if a class has
    no mass. Takes noised (possibly negative) counts as they are."""
    neg, pos = np.asarray(negative, np.float64), np.asarray(positive, np.float64)
    n_neg, n_pos = float(neg.sum()), float(pos.sum())
    if not (n_neg > 0 and n_pos > 0):
        return math.nan
    below = np.cumsum(neg) - neg  # Σ_{b'<b} n⁻_{b'}
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def auc_estimate(negative: npt.ArrayLike, positive: npt.ArrayLike, cell_var: float) -> Estimate:
    """The AUC of :func:`auc_from_histograms` and its SE when every cell carries independent
    noise of variance ``cell_var`` (delta method; undefined unless both classes have > 1)."""
    neg, pos = np.asarray(negative, np.float64), np.asarray(positive, np.float64)
    n_neg, n_pos = float(neg.sum()), float(pos.sum())
    if not (n_neg >= 1.0 and n_pos >= 1.0):
        return UNDEFINED
    auc = auc_from_histograms(neg, pos)
    below = np.cumsum(neg) - neg
    above = pos.sum() - np.cumsum(pos)  # Σ_{b'>b} n⁺_{b'}
    d_pos = (below + 0.5 * neg) / (n_pos * n_neg) - auc / n_pos
    d_neg = (above + 0.5 * pos) / (n_pos * n_neg) - auc / n_neg
    return Estimate(auc, math.sqrt(cell_var * float((d_pos**2).sum() + (d_neg**2).sum())))


def pool_metrics(
    metrics: Sequence[Metrics], *, noise_multiplier: float, loss_bound: float
) -> PooledMetrics | None:
    """Pool the sites' released sums; ``None`` when no site released metrics.

    ``noise_multiplier`` is the σ the orchestrator asked for; a site reporting more noise is
    counted with its own (larger) σ, an exact site with none. A site that predates the noised
    count contributes its exact ``num_examples``. The AUC pools the sites that sent a histogram
    of the most common length (all of them, normally); ``None`` without any.
    """
    if not metrics:
        return None
    var_count = var_correct = var_loss = 0.0
    count = correct = loss = 0.0
    lengths = [len(m.score_histogram) for m in metrics if m.score_histogram]
    hist_len = max(set(lengths), key=lengths.count) if lengths else 0
    hist = np.zeros(hist_len)
    var_cell = 0.0
    for m in metrics:
        has_hist = hist_len > 0 and len(m.score_histogram) == hist_len
        sigma = 0.0 if m.exact else max(noise_multiplier, m.noise_multiplier or 0.0)
        var = (sigma * sensitivity(histogram=bool(m.score_histogram))) ** 2
        count += m.count_sum
        var_count += var
        correct += m.correct_sum
        loss += m.loss_sum
        var_correct += var
        var_loss += var * loss_bound**2
        if has_hist:
            hist += np.asarray(m.score_histogram)
            var_cell += var
    auc = None
    if hist_len >= 2 and hist_len % 2 == 0:
        auc = auc_estimate(hist[: hist_len // 2], hist[hist_len // 2 :], var_cell)
    exact = all(m.exact for m in metrics)
    return PooledMetrics(
        accuracy=_ratio(correct, count, var_correct, var_count),
        loss=_ratio(loss, count, var_loss, var_count),
        num_examples=Estimate(count, math.sqrt(var_count)),
        auc=auc,
        sites=len(metrics),
        exact=exact,
        noise_multiplier=0.0 if exact else noise_multiplier,
    )


def format_estimate(e: Estimate | None) -> str:
    """``0.81 ± 0.03``: decimals down to the SE's first significant digit, at least two
    below 10 (``0.812 ± 0.004``, a count ``433 ± 17``); exact values without ``±``; an
    undefined one says so."""
    if e is None:
        return "-"
    if not math.isfinite(e.value):
        return "undefined (noise ≥ signal)"
    if e.se == 0.0:
        return f"{e.value:.3f}"
    if not math.isfinite(e.se):
        return f"{e.value:.3f} ± ∞"
    least = 2 if abs(e.value) < 10 else 0  # rates and losses keep two decimals
    digits = min(4, max(least, -math.floor(math.log10(e.se))))
    return f"{e.value:.{digits}f} ± {e.se:.{digits}f}"


def pooled_to_dict(p: PooledMetrics) -> dict[str, Any]:
    """JSON form (round rows, model cards, evaluation logs); NaN/∞ become ``None``."""

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x

    out: dict[str, Any] = clean(asdict(p))
    return out


def pooled_from_dict(d: Mapping[str, Any]) -> PooledMetrics:
    """Inverse of :func:`pooled_to_dict`."""

    def est(x: Mapping[str, Any] | None) -> Estimate:
        if x is None:
            return UNDEFINED
        value = math.nan if x.get("value") is None else float(x["value"])
        se = math.inf if x.get("se") is None else float(x["se"])
        return Estimate(value, se)

    return PooledMetrics(
        accuracy=est(d.get("accuracy")),
        loss=est(d.get("loss")),
        num_examples=est(d.get("num_examples")),
        auc=None if d.get("auc") is None else est(d["auc"]),
        sites=int(d.get("sites", 0)),
        exact=bool(d.get("exact", False)),
        noise_multiplier=float(d.get("noise_multiplier", 0.0)),
    )


def metrics_summary(p: PooledMetrics | None) -> str:
    """One line: ``acc 0.81 ± 0.03  loss 0.44 ± 0.05  AUC 0.88 ± 0.02``."""
    if p is None:
        return "no metrics"
    parts = [f"acc {format_estimate(p.accuracy)}", f"loss {format_estimate(p.loss)}"]
    if p.auc is not None:
        parts.append(f"AUC {format_estimate(p.auc)}")
    return "  ".join(parts)


def metrics_plan_summary(spec: JobSpec) -> str:
    """One line for ``orchestrator plan``: which rounds release metrics and what they cost."""
    m = spec.metrics
    if not m.enabled:
        return "metrics: none released"
    planned = [r for r in range(1, spec.rounds + 1) if m.releases_at(r, spec.rounds)]
    where = f"round {planned[0]}" if len(planned) == 1 else f"{len(planned)} rounds"
    if m.exact:
        return f"metrics: EXACT in {where}, outside the DP guarantee (sites must allow it)"
    # Imported here: the accountants load Opacus and torch, which the CLI's start-up
    # (this module is imported by every `orchestrator` command) does not need.
    from common.dp.accounting import compute_epsilon

    alone = compute_epsilon(
        [DpEvent(m.noise_multiplier, 1.0, len(planned))], delta=spec.dp.delta
    ).epsilon
    when = "the final round only" if m.every is None else f"every {m.every} rounds and the last"
    return (
        f"metrics: released in {where} ({when}), σ={m.noise_multiplier:g}; "
        f"they cost ε {alone:.3g} alone at δ={spec.dp.delta:g}, included in each site's job ε"
    )


class _RoundRecord(Protocol):
    round: int
    metrics: dict[str, Any] | None


def metrics_card(spec: JobSpec, rounds: Sequence[_RoundRecord]) -> dict[str, Any]:
    """What the model card says about the metrics: when they were released and what that
    cost (``metrics_release``), and the last released values with their standard errors
    (``final_metrics``)."""
    m = spec.metrics
    planned = [r for r in range(1, spec.rounds + 1) if m.releases_at(r, spec.rounds)]
    release: dict[str, Any] = {
        "rounds": planned,
        "every": m.every,
        "what": (
            "each site's validation rows, scored by its model after that round's local "
            "training, pooled over sites (the released model is the sites' weighted average; "
            "`orchestrator evaluate` scores the released model itself)"
        ),
    }
    if m.enabled and not m.exact:
        from common.dp.accounting import compute_epsilon

        # The same event the plan and every site charge, alone (it is part of the job's ε).
        alone = compute_epsilon(
            [DpEvent(m.noise_multiplier, 1.0, len(planned))], delta=spec.dp.delta
        ).epsilon
        release |= {
            "noise_multiplier": m.noise_multiplier,
            "epsilon_of_metrics_alone": alone,
            "standard_errors": "from the DP noise only (not the validation rows' sampling)",
        }
    final = next((r for r in reversed(rounds) if r.metrics is not None), None)
    out: dict[str, Any] = {"metrics_release": release, "final_metrics": None}
    if final is not None and final.metrics is not None:
        pooled = pooled_from_dict(final.metrics)
        out["final_metrics"] = {
            "round": final.round,
            "summary": metrics_summary(pooled),
            **pooled_to_dict(pooled),
        }
    return out
