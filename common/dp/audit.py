"""Empirical privacy audit of a released model: an ε *lower* bound from one training run.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023: m
canaries, each included with probability ½; the auditor guesses membership from their scores
(loss under the released model) and :func:`audit` reports the largest ε whose p-value
(:func:`p_value`, their Theorem 3.1 with the δ term) is below :data:`SIGNIFICANCE`, with a
loss-threshold membership-inference TPR at low FPRs. A lower bound above the accountant's ε is
a bug and must fail the release; a small one proves nothing. Scores are post-processing of the
released model: no privacy cost. The test and its reading: ``docs/accounting.md``,
"Empirical audit".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats

SIGNIFICANCE = 0.05
GUESS_FRACTIONS = (0.05, 0.1, 0.2)  # k₊ = k₋ = fraction·m, fixed before looking at scores


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[≥ v correct of r guesses] under (ε, δ)-DP with m canaries (Steinke et al. 2023)."""
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError("need epsilon >= 0 and 0 <= delta <= 1")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))
    alpha = 0.0
    acc = 0.0
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q) if v > 0 else np.array([])
    for i in range(1, v + 1):
        acc += float(pmf[i - 1])  # P[Binomial = v − i]
        alpha = max(alpha, acc / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(
    *, m: int, r: int, v: int, delta: float, significance: float = SIGNIFICANCE
) -> float:
    """The largest ε that the observation rejects at ``significance`` (0 if none)."""
    if r == 0 or p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m=m, r=r, v=v, epsilon=hi, delta=delta) < significance:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return lo
    for _ in range(50):
        mid = (lo + hi) / 2
        if p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < significance:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class AuditResult:
    num_canaries: int
    num_included: int
    epsilon_lower_bound: float
    guesses: int
    correct: int
    significance: float
    tpr_at_fpr: dict[str, float]
    auc: float

    def as_dict(self) -> dict[str, object]:
        return {
            "method": "one-run audit (Steinke, Nasr, Jagielski 2023), loss scores",
            "num_canaries": self.num_canaries,
            "num_included": self.num_included,
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "guesses": self.guesses,
            "correct_guesses": self.correct,
            "confidence": 1 - self.significance,
            "membership_inference": {
                "attack": "loss threshold (Yeom et al. 2018) on the canaries",
                "tpr_at_fpr": self.tpr_at_fpr,
                "auc": self.auc,
            },
        }


def audit(
    losses: Sequence[float] | npt.NDArray[np.float64],
    included: Sequence[bool] | npt.NDArray[np.bool_],
    *,
    delta: float,
    significance: float = SIGNIFICANCE,
) -> AuditResult:
    """One-run audit over canary ``losses`` (lower = more likely trained on)."""
    s = np.asarray(losses, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1 or s.size == 0:
        raise ValueError("losses and included must be equal-length, non-empty vectors")
    s = np.nan_to_num(s, nan=np.inf)
    m = int(s.size)
    order = np.argsort(s, kind="stable")
    best = (0.0, 0, 0)
    alpha = significance / len(GUESS_FRACTIONS)  # Bonferroni over the guess sizes tried
    for frac in GUESS_FRACTIONS:
        k = max(1, int(frac * m))
        if 2 * k > m:
            continue
        in_guess, out_guess = order[:k], order[m - k :]
        v = int(inc[in_guess].sum() + (~inc[out_guess]).sum())
        eps = epsilon_lower_bound(m=m, r=2 * k, v=v, delta=delta, significance=alpha)
        if eps > best[0] or best[1] == 0:
            best = (eps, 2 * k, v)
    tpr = {}
    members, non = s[inc], s[~inc]
    for fpr in (0.01, 0.1):
        if members.size and non.size:
            thr = float(np.quantile(non, fpr))  # flag "member" when loss <= thr
            tpr[f"{fpr:g}"] = float((members <= thr).mean())
    auc = float("nan")
    if members.size and non.size:
        # P[member loss < non-member loss], ties half: the Mann-Whitney form of the AUC.
        u = stats.mannwhitneyu(non, members, alternative="two-sided").statistic
        auc = float(u / (members.size * non.size))
    return AuditResult(
        num_canaries=m,
        num_included=int(inc.sum()),
        epsilon_lower_bound=best[0],
        guesses=best[1],
        correct=best[2],
        significance=significance,
        tpr_at_fpr=tpr,
        auc=auc,
    )


def make_canaries(
    *,
    num: int,
    lows: npt.NDArray[np.float64],
    highs: npt.NDArray[np.float64],
    num_classes: int,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Input-space canaries: uniform in the declared feature box, uniform random labels, and
    the secret coin (included with probability ½) of each."""
    x = rng.uniform(lows, highs, size=(num, lows.size)).astype(np.float32)
    y = rng.integers(0, num_classes, size=num).astype(np.int64)
    included = rng.random(num) < 0.5
    return x, y, included
