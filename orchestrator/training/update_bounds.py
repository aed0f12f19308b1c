"""What an honest site's training update can be, derived only from what the orchestrator assigned.

A site's update is checked against its *task* (σ, the clip norm C, δ, the batch size, the
local epochs or steps, the optimiser), the size the site registered when the job chose it,
and the global model the orchestrator sent; never against the site's own DP report, which
must instead agree with the task (:func:`match_report`). The report's training event must be
one the orchestrator would have assigned, and what the job is charged is that assigned event.

:func:`norm_bound` is a high-probability upper bound on the L2 norm of an honest DP-SGD
update (failure probability below :data:`FAILURE_PROBABILITY` per update). The derivation is
in ``docs/update-bounds.md``: plain and momentum SGD with weight decay are a linear recursion
with scalar coefficients per coordinate, so the noise's contribution is one Gaussian vector
of known variance (Laurent & Massart 2000, Lemma 1; Gaussian concentration of a 1-Lipschitz
function) and the clipped gradients' contribution is bounded through the Poisson batch sizes
(Bernstein's inequality); Adam's per-coordinate step is bounded whatever the gradients
(Kingma & Ba 2015, §2.1, made exact with bias correction).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from common.domain import UpdateMeta
from common.dp.events import DpEvent
from common.errors import InvalidUpdateError
from common.specs import JobSpec, OptimizerSpec
from common.training.schedule import task_schedule
from common.training.sgld import bound_noise_multiplier
from common.training.tensors import RandomAccess, SafetensorsPieces, check_update

MAX_STEPS_PER_TASK = 1_000_000
"""Most DP-SGD steps one task may be assigned (as ``local_steps`` allows): a site whose
registered size would need more (``local_epochs`` over a huge claimed dataset) is left out of
the job, so no bound or accounting runs over an unbounded number of steps."""

FAILURE_PROBABILITY = 1e-12
"""Chance that an honest update exceeds :func:`norm_bound` (each of its two tail bounds gets
half of it)."""

ADAM_BETAS = (0.9, 0.999)
"""``torch.optim.Adam``'s defaults, which the sites' trainer uses."""

_U32 = 2.0**-24  # float32 unit roundoff
_REL_TOL = 1e-9


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _REL_TOL * max(abs(a), abs(b))


@dataclass(frozen=True)
class Assignment:
    """What the orchestrator assigned one site for one round (all of it public)."""

    site_id: str
    noise_multiplier: float
    num_rows: int
    """The size the site registered when the job chose it (its FedAvg weight, before caps)."""
    extra_rows: int
    """Audit canaries the site may add to its rows (0 without an audit): between 0 and this
    many, by coins only the site knows, so the sample rate and steps have that many options."""
    spec: JobSpec
    round: int | None = None
    """The round (1-based) when known: metrics are released only in the rounds
    ``metrics.every`` selects (by default the last), so only those may carry them."""

    def schedule(self, num_examples: int) -> tuple[float, int]:
        return task_schedule(
            num_examples=num_examples,
            batch_size=self.spec.batch_size,
            local_epochs=self.spec.local_epochs,
            local_steps=self.spec.local_steps,
        )

    def metrics_event(self) -> DpEvent | None:
        m = self.spec.metrics
        if not m.enabled or m.exact:
            return None
        if self.round is not None and not m.releases_at(self.round, self.spec.rounds):
            return None
        return DpEvent(noise_multiplier=m.noise_multiplier, sample_rate=1.0, steps=1)


def assigned_worst_case(a: Assignment) -> list[tuple[str, DpEvent]]:
    """What a rejected update is charged: the most a task assigned as ``a`` can have cost,
    from public inputs only (its rejection is published, and the update depended on the
    site's data): the largest sample rate (the registered rows, no canary) with the most
    steps (every canary included), and the metrics release when the job has one."""
    q, _ = a.schedule(a.num_rows)
    _, steps = a.schedule(a.num_rows + a.extra_rows)
    out = [("train", DpEvent(noise_multiplier=a.noise_multiplier, sample_rate=q, steps=steps))]
    metric = a.metrics_event()
    if metric is not None:
        out.append(("metrics", metric))
    return out


@dataclass(frozen=True)
class Matched:
    """A report that agrees with its assignment, and what it is charged."""

    num_examples: int
    """The rows the site trained on (registered rows plus its included canaries)."""
    train: DpEvent
    metrics: DpEvent | None

    def events(self) -> list[tuple[str, DpEvent]]:
        out = [("train", self.train)]
        if self.metrics is not None:
            out.append(("metrics", self.metrics))
        return out


def _rows_for(a: Assignment, q: float) -> list[int]:
    """The training sizes n in [registered, registered + canaries] whose rate is ``q``."""
    lo, hi = a.num_rows, a.num_rows + a.extra_rows
    b = a.spec.batch_size
    if _close(q, 1.0):
        return list(range(lo, min(hi, b) + 1)) if lo <= b else []
    if not 0.0 < q < 1.0:
        return []
    n = round(b / q)
    return [n] if lo <= n <= hi and _close(b / n, q) else []


def match_report(a: Assignment, meta: UpdateMeta) -> Matched:
    """Check that the site's DP report says it ran exactly the assigned task.

    The training event's σ, q and steps, the clip norm, δ, the metrics release and the
    example count must all be what was assigned (q and steps for one of the sizes the site
    may train on); any other event is refused.

    Raises:
        InvalidUpdateError: naming the first disagreement.
    """
    spec = a.spec
    rep = meta.dp_report
    trains = [e.event for e in rep.events if e.kind == "train"]
    metrics = [e.event for e in rep.events if e.kind == "metrics"]
    others = sorted({e.kind for e in rep.events} - {"train", "metrics"})
    if others:
        raise InvalidUpdateError(f"its DP report has events of unknown kind {others[0]!r}")
    if len(trains) != 1:
        raise InvalidUpdateError(
            f"its DP report has {len(trains)} training events; exactly one was assigned"
        )
    train = trains[0]
    if not _close(train.noise_multiplier, a.noise_multiplier):
        raise InvalidUpdateError(
            f"it reports σ={train.noise_multiplier:g}; the task assigned σ={a.noise_multiplier:g}"
        )
    if not _close(rep.max_grad_norm, spec.dp.max_grad_norm):
        raise InvalidUpdateError(
            f"it reports max_grad_norm {rep.max_grad_norm:g}; the job's is "
            f"{spec.dp.max_grad_norm:g}"
        )
    if not _close(rep.delta, spec.dp.delta):
        raise InvalidUpdateError(f"it reports δ={rep.delta:g}; the job's is δ={spec.dp.delta:g}")
    sizes = _rows_for(a, train.sample_rate)
    if not sizes:
        q_lo = a.schedule(a.num_rows + a.extra_rows)[0]
        q_hi = a.schedule(a.num_rows)[0]
        want = f"{q_hi:.6g}" if q_lo == q_hi else f"{q_lo:.6g}..{q_hi:.6g}"
        raise InvalidUpdateError(
            f"it reports sample rate q={train.sample_rate:.6g}; its task gives q={want} "
            f"(batch_size {spec.batch_size} over the {a.num_rows} rows it registered)"
        )
    if meta.num_examples not in sizes:
        raise InvalidUpdateError(
            f"it claims {meta.num_examples} examples; its task was for {a.num_rows} rows"
            + (f" plus up to {a.extra_rows} canaries" if a.extra_rows else "")
        )
    n = meta.num_examples
    q, steps = a.schedule(n)
    if train.steps != steps:
        raise InvalidUpdateError(
            f"it reports {train.steps} steps; its task assigned {steps} steps at q={q:.6g}"
        )
    want_metrics = a.metrics_event()
    if len(metrics) > 1:
        raise InvalidUpdateError(f"its DP report has {len(metrics)} metrics releases, not one")
    if metrics and (want_metrics is None or metrics[0] != want_metrics):
        raise InvalidUpdateError(
            "its metrics release disagrees with the job's metrics settings"
            if want_metrics is not None
            else "it reports a noised metrics release the job did not ask for"
        )
    if want_metrics is None and meta.metrics is not None and not meta.metrics.exact:
        raise InvalidUpdateError("it carries noised metrics the job did not ask for")
    if meta.metrics is not None and not meta.metrics.exact and not metrics:
        raise InvalidUpdateError("it carries noised metrics its DP report does not charge")
    if (
        meta.metrics is not None
        and meta.metrics.exact
        and not (spec.metrics.enabled and spec.metrics.exact)
    ):
        raise InvalidUpdateError("it carries exact metrics the job did not ask for")
    return Matched(
        num_examples=n,
        train=DpEvent(a.noise_multiplier, q, steps),
        metrics=want_metrics if metrics else None,
    )


# ----------------------------------------------------------------------------- the bound


def norm_bound(
    *,
    optimizer: OptimizerSpec,
    max_grad_norm: float,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    num_examples: int,
    num_params: int,
    start_norm: float,
    failure_probability: float = FAILURE_PROBABILITY,
) -> float:
    """Upper bound on ‖Δ‖₂ of an honest DP-SGD update (``docs/update-bounds.md``).

    ``steps`` steps over ``num_examples`` rows at Poisson rate ``sample_rate``, clip norm
    ``max_grad_norm`` (C), Gaussian noise σC per coordinate, the noised sum divided by the
    expected batch ``q·n`` (``site_agent.trainer``), then the optimiser's step, starting from
    weights of norm ``start_norm`` with ``num_params`` coordinates. Holds with probability at
    least ``1 - failure_probability``; ``math.inf`` when the optimiser's recursion diverges
    (e.g. ``lr · weight_decay > 2``), where no bound is finite.
    """
    if steps > MAX_STEPS_PER_TASK:
        raise ValueError(f"{steps} steps exceed the most a task may run ({MAX_STEPS_PER_TASK})")
    # DP-SGLD's extra Langevin noise bounds like DP noise of a larger σ (common.training.sgld)
    noise_multiplier = bound_noise_multiplier(
        name=optimizer.name,
        lr=optimizer.lr,
        temperature=optimizer.temperature,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        sample_rate=sample_rate,
        num_examples=num_examples,
    )
    d = num_params
    log_inv_p = math.log(2.0 / failure_probability)  # each tail gets half
    if optimizer.name == "adam":
        per_coord = optimizer.lr * _adam_step_sum(steps)
        main = math.sqrt(d) * per_coord
        rounding = 2.0 * _U32 * steps * (start_norm + main)
        return 1.01 * (main + rounding) + 1e-12
    alpha, k1, k2, kmax, gain = _sgd_response(
        optimizer.lr, optimizer.momentum, optimizer.weight_decay, steps
    )
    if not all(math.isfinite(v) for v in (alpha, k1, k2, kmax, gain)):
        return math.inf
    c = max_grad_norm
    expected = sample_rate * num_examples  # the trainer's denominator q·n
    # Σ_j |k_j|·|B_j| over n·T Bernoulli(q) draws: mean E·K1, variance ≤ E·K2, terms ≤ kmax.
    tail = kmax * log_inv_p / 3.0
    batch_excess = tail + math.sqrt(tail * tail + 2.0 * expected * k2 * log_inv_p)
    grads = c * k1 + c * batch_excess / expected
    noise = (
        noise_multiplier
        * c
        * math.sqrt(k2)
        / expected
        * (math.sqrt(d) + math.sqrt(2.0 * log_inv_p))
    )
    main = abs(alpha - 1.0) * start_norm + grads + noise
    rounding = 4.0 * _U32 * steps * gain * (gain * start_norm + main)
    return 1.01 * (main + rounding) + 1e-12


@functools.lru_cache(maxsize=256)
def _adam_step_sum(steps: int) -> float:
    """Σ_{t=1..T} of the largest |m̂_t / √v̂_t| any gradients can give (per coordinate)."""
    b1, b2 = ADAM_BETAS
    gamma = b1 * b1 / b2
    t = np.arange(1, steps + 1, dtype=np.float64)
    geo = (1.0 - gamma**t) / (1.0 - gamma)  # Σ_{k<t} γ^k
    a = (1.0 - b1) / (1.0 - b1**t) * np.sqrt((1.0 - b2**t) / (1.0 - b2)) * np.sqrt(geo)
    return float(a.sum())


@functools.lru_cache(maxsize=256)
def _sgd_response(
    lr: float, momentum: float, weight_decay: float, steps: int
) -> tuple[float, float, float, float, float]:
    """(α, K1, K2, k_max, G) of torch's SGD recursion over ``steps`` steps.

    Per coordinate, ``x_t = A x_{t-1} + b g_t`` with ``x = (θ, momentum buffer)``,
    ``A = [[1 - lr·wd, -lr·μ], [wd, μ]]``, ``b = (-lr, 1)``; so
    ``θ_T = α θ_0 + Σ_j k_j g_{T-j}`` with ``α = (A^T)₁₁``, ``k_j = (A^j b)₁``.
    K1 = Σ|k_j|, K2 = Σk_j², k_max = max|k_j|, G = max_j ‖A^j‖_∞ (how far a rounding error
    can travel). The powers are built by doubling: a few array products, not T loops.
    """
    a = np.array([[1.0 - lr * weight_decay, -lr * momentum], [weight_decay, momentum]])
    b = np.array([-lr, 1.0])
    with np.errstate(over="ignore", invalid="ignore"):
        powers = np.eye(2)[None, :, :]  # A^0 .. A^(m-1)
        top = a.copy()  # A^m
        while powers.shape[0] < steps:
            powers = np.concatenate([powers, np.matmul(top, powers)])
            top = top @ top
        powers = powers[:steps]
        k = powers[:, 0, :] @ b
        alpha = float((a @ powers[-1])[0, 0])
        gain = float(np.abs(powers).sum(axis=2).max())
        k_abs = np.abs(k)
        return alpha, float(k_abs.sum()), float((k * k).sum()), float(k_abs.max()), gain


def check_received(
    meta: UpdateMeta,
    payload: RandomAccess,
    payload_sha256: str,
    state: Mapping[str, torch.Tensor],
    a: Assignment,
    *,
    start_norm: float,
) -> tuple[SafetensorsPieces, float, Matched]:
    """Reject an update whose report disagrees with its task (:func:`match_report`) or whose
    values could not come from it (:func:`norm_bound`); return it, to be read piece by piece
    from ``payload``, its L2 norm and the assigned events it is charged.

    Raises:
        InvalidUpdateError: with the reason, for the job's events.
    """
    if payload_sha256 != meta.sha256:
        raise InvalidUpdateError("its bytes do not match the announced sha256")
    matched = match_report(a, meta)
    try:
        delta = SafetensorsPieces(payload)  # checks the header; reads no value yet
    except InvalidUpdateError as err:
        raise InvalidUpdateError(f"its tensors cannot be decoded: {err}") from None
    norm = check_update(delta, state)
    bound = norm_bound(
        optimizer=a.spec.optimizer,
        max_grad_norm=a.spec.dp.max_grad_norm,
        noise_multiplier=a.noise_multiplier,
        sample_rate=matched.train.sample_rate,
        steps=matched.train.steps,
        num_examples=matched.num_examples,
        num_params=sum(v.numel() for v in state.values()),
        start_norm=start_norm,
    )
    if norm > bound:
        raise InvalidUpdateError(
            f"its norm {norm:.3g} is more than its task allows (bound {bound:.3g}, "
            "docs/update-bounds.md)"
        )
    return delta, norm, matched
