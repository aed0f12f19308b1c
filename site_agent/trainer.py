"""Local DP-SGD at a site, and differentially private validation metrics.

Pure functions over arrays: no gRPC, no ledger, no files. The site pipeline charges the ledger
before :func:`train_local` runs; what leaves is :attr:`LocalResult.delta` with the public
``(q, σ, steps)`` the accountant needs. DP-SGD (Abadi et al., CCS 2016) as in Opacus
(Yousefpour et al., 2021): each step a Poisson sample at rate ``q``, every example's gradient
clipped to ``C`` (book-keeping, :mod:`site_agent.clipping`; Opacus' ghost and hooks modes,
:mod:`site_agent.opacus_modes`), Gaussian noise ``N(0, (σ·C)²)`` from a private generator
(:mod:`common.dp.noise`), a step on the sum over the public ``q·N``. Exactly ``steps`` steps
run, the sampling and noise are secret, every output is finite for any record, and no
un-noised loss leaves: why each holds, ``docs/site-pipeline.md, "Local DP-SGD"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from common.domain import Metrics
from common.dp import noise
from common.errors import InvalidSpecError
from common.specs import ModelSpec, OptimizerSpec, model_dims
from common.training import sgld
from common.training.models import build_model, load_weights
from common.training.schedule import task_schedule
from site_agent.clipping import BookKeeper, supports
from site_agent.data.row_store import EncodedRows, tensor_poisson_loader
from site_agent.generative import batch_loss, check_generative_mode
from site_agent.opacus_modes import device_of, poisson_batches, run_opacus

SUPPORTED_MODES = ("bk", "ghost", "hooks")
"""Per-example clipping modes :func:`train_local` runs: ``"bk"`` (one backward pass,
:mod:`site_agent.clipping`) and Opacus' ``"ghost"`` and ``"hooks"``. Opacus' ``"ew"``
(ExpandedWeights) is left out: it fails on the empty batches Poisson sampling produces."""

_EVAL_BATCH = 4096


@dataclass(frozen=True)
class TrainParams:
    """What one local training task runs. All of it is public (it comes with the task)."""

    noise_multiplier: float
    max_grad_norm: float
    batch_size: int
    """Expected batch size under Poisson sampling: ``q = batch_size / num_examples``."""
    local_epochs: float | None
    local_steps: int | None
    optimizer: OptimizerSpec
    seed: int | None = None
    """Seeds model construction only; never the DP noise or the sampling."""
    public_num_examples: int | None = None
    """The public size the site disclosed instead of its exact row count
    (``policy.disclose_row_counts: false``): when set, ``q = batch_size / public_num_examples``
    and the averaging denominator ``q·public_num_examples`` come from it, never from the rows'
    true number, and :class:`LocalResult` reports it. Poisson sampling at a rate fixed before
    the data is read is sound for any rate; the accountant is told that rate."""
    device: str = "cpu"
    """Where the steps run (``site_agent.device.resolve`` of the site's ``device:``): the
    network, each batch and the noise (drawn there by a private generator on that device).
    The site's setting, not the task's; the delta comes back to the CPU."""


@dataclass(frozen=True)
class LocalResult:
    """What local training releases: the noised model delta and the public DP parameters."""

    delta: dict[str, Tensor]
    """``new_weights - global_weights``, keyed like ``build_model(spec).state_dict()``,
    float32 on CPU."""
    num_examples: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str
    """How per-example gradients were clipped: ``"bk"``, or Opacus' ``"ghost"``/``"hooks"``."""


DEFAULT_AUC_BINS = 10
"""Score bins per class for the ROC AUC histogram (``metrics.auc_bins`` sets it per job).
More bins cut the binning error (at most ½ the share of pairs in one bin) but add noise:
the AUC's noise SE grows about as √bins. At 10 bins, on 900 validation rows over three sites
at σ = 10, the binning error is ~0.01 and the SE ~0.17 (20 bins: ~0 and ~0.24)."""


def metrics_sensitivity(*, histogram: bool) -> float:
    """L2 sensitivity of the released vector: ``√3``, or ``2`` with the score histogram."""
    return 2.0 if histogram else math.sqrt(3.0)


def score_bins(scores: Tensor, bins: int) -> Tensor:
    """Bin index ``0..bins-1`` of each score in [0, 1] (equal widths; NaN → 0, 1 → last)."""
    s = torch.nan_to_num(scores.to(torch.float64), nan=0.0).clamp(0.0, 1.0)
    return (s * bins).floor().clamp(max=bins - 1).to(torch.int64)


@dataclass(frozen=True)
class EvalMetrics:
    """What :func:`evaluate` released (noised unless ``noise_multiplier`` is ``None``).

    ``count_sum``, ``correct_sum``, ``loss_sum`` (times ``B``) and ``score_histogram`` are
    the sums as released; ``accuracy`` and ``loss`` are the site's own ratios of them (0 when
    the noised count is below 1), post-processing for display. ``num_examples`` is the exact
    row count, which stays at the site unless the metrics are exact.
    """

    loss: float
    accuracy: float
    num_examples: int
    noise_multiplier: float | None
    correct_sum: float
    loss_sum: float
    count_sum: float
    score_histogram: tuple[float, ...] = ()

    def released(self) -> Metrics:
        """The wire form of what :func:`evaluate` released."""
        exact = self.noise_multiplier is None
        return Metrics(
            loss=self.loss,
            accuracy=self.accuracy,
            correct_sum=self.correct_sum,
            loss_sum=self.loss_sum,
            num_examples=self.num_examples if exact else 0,
            noise_multiplier=self.noise_multiplier,
            exact=exact,
            count_sum=self.count_sum,
            score_histogram=self.score_histogram,
        )


def choose_grad_sample_mode(spec: ModelSpec) -> str:
    """The fastest per-example clipping mode that supports the model: ``"bk"``.

    Three ways to get the clipped sum ``Σ_i clip_C(∇ℓ_i)`` run here; all three compute the
    same sum (``tests/unit/test_trainer.py`` checks it on every kind of the zoo), so the
    guarantee does not depend on the choice, only the speed does:

    * ``"bk"``: book-keeping clipping (Bu et al., ICML 2023; :mod:`site_agent.clipping`):
      one backward pass that keeps each layer's activations and output gradients, then the
      per-example norms and the clipped sum from them, then the noise and the averaging
      (:meth:`site_agent.clipping.BookKeeper.add_noise`).
    * ``"ghost"``: Opacus' ghost clipping (Li et al., ICLR 2022; Bu et al., NeurIPS 2022):
      the same norms, but a *second* backward pass on the loss re-weighted by the clipping
      factors. Conv and GroupNorm layers fall back to materialised per-example gradients.
    * ``"hooks"``: Opacus' per-example gradients for every layer, kept until the optimiser
      clips them: ``B × |θ|`` floats.

    ``bench/bench_dp_step.py`` measures them against a non-private step (``--modes``);
    ``"bk"`` is the fastest on every kind of the zoo. A model with a layer
    :mod:`site_agent.clipping` does not handle would train with ``"ghost"``.
    """
    return _mode_for(build_model(spec))


def _mode_for(net: nn.Module) -> str:
    return "bk" if supports(net) else "ghost"


_private_generator = noise.private_torch_generator


def _check_arrays(
    spec: ModelSpec, features: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[Tensor, Tensor]:
    x = np.asarray(features)
    y = np.asarray(labels)
    input_dim, num_classes = model_dims(spec)
    if x.ndim != 2 or x.shape[1] != input_dim:
        raise InvalidSpecError(
            f"The features have shape {x.shape}, the model needs (N, {input_dim})."
        )
    if y.shape != (x.shape[0],):
        raise InvalidSpecError(
            f"The labels have shape {y.shape}, expected ({x.shape[0]},) to match the features."
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidSpecError("The labels must be integers (class indices).")
    # Messages say *that* a value is out of range, never which value (it is site data).
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InvalidSpecError(
            f"Some labels are outside 0..{num_classes - 1}; the model has {num_classes} classes."
        )
    # Non-finite features are not refused (a refusal after the charge would say that such a
    # row exists): each path gives such an example a zero contribution instead.
    return (
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
    )


def _optimizer(spec: OptimizerSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if spec.name == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    if spec.momentum != 0.0:
        # Refuse rather than ignore: a user who set it expects it to matter.
        raise InvalidSpecError(
            "optimizer.momentum applies to sgd only; adam has its own moment estimates."
        )
    return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)


def _check_params(params: TrainParams) -> None:
    if not (params.noise_multiplier >= 0.0 and math.isfinite(params.noise_multiplier)):
        raise InvalidSpecError(
            f"noise_multiplier must be a finite number >= 0, got {params.noise_multiplier}."
        )
    if not (params.max_grad_norm > 0.0 and math.isfinite(params.max_grad_norm)):
        raise InvalidSpecError(
            f"max_grad_norm must be a finite number > 0, got {params.max_grad_norm}."
        )


def train_local(
    *,
    model_spec: ModelSpec,
    global_state: Mapping[str, Tensor],
    features: npt.ArrayLike | EncodedRows,
    labels: npt.ArrayLike | None,
    params: TrainParams,
    grad_sample_mode: str | None = None,
) -> LocalResult:
    """Run DP-SGD from ``global_state`` on the site's rows; return the noised delta.

    Runs exactly ``steps`` steps with Poisson sample rate ``q`` as
    :func:`common.training.schedule.task_schedule` computes them; the caller charges the
    ledger with the same numbers *before* calling.

    The Poisson loader is built here, with the exact ``q`` (Opacus' ``poisson_sampling=True``
    would re-derive the rate as ``1 / ceil(N / batch_size)``, which differs from ``q``
    unless ``batch_size`` divides ``N``: the accountant must be told the rate that ran), and
    the averaging denominator is the same public ``q·N``.

    Args:
        model_spec: the task's model.
        global_state: the current global weights (``build_model(spec).state_dict()`` keys).
        features: float array ``(N, input_dim)``, or memory-mapped
            :class:`~site_agent.data.row_store.EncodedRows` (with their labels; ``labels`` None),
            read one Poisson batch at a time (issue 19.3).
        labels: integer class indices ``(N,)``.
        params: the task's DP and optimiser parameters.
        grad_sample_mode: ``"bk"``, ``"ghost"`` or ``"hooks"`` to override
            :func:`choose_grad_sample_mode` (tests and benchmarks). All compute the same
            clipped sum, so the guarantee does not depend on it; only speed does.

    Raises:
        InvalidSpecError: arrays, weights or parameters that do not fit the spec.
    """
    _check_params(params)
    if isinstance(features, EncodedRows):
        rows: EncodedRows | None = features
        if features.width != model_dims(model_spec)[0]:
            raise InvalidSpecError(
                f"The rows have {features.width} features, the model needs "
                f"{model_dims(model_spec)[0]}."
            )
        n = len(features)
    else:
        rows = None
        x, y = _check_arrays(model_spec, features, labels if labels is not None else [])
        n = int(x.shape[0])
    if params.public_num_examples is not None:
        n = params.public_num_examples  # the disclosed size; the rows' own count stays here
    q, steps = task_schedule(
        num_examples=n,
        batch_size=params.batch_size,
        local_epochs=params.local_epochs,
        local_steps=params.local_steps,
    )
    if grad_sample_mode is not None and grad_sample_mode not in SUPPORTED_MODES:
        raise InvalidSpecError(
            f"grad_sample_mode must be one of {', '.join(SUPPORTED_MODES)}, "
            f"got {grad_sample_mode!r}."
        )

    device = torch.device(params.device)
    net = build_model(model_spec, seed=params.seed)
    # choose_grad_sample_mode's choice, on the network already built for training.
    mode = _mode_for(net) if grad_sample_mode is None else grad_sample_mode
    if noise.secure_enabled() and mode != "bk":
        raise InvalidSpecError(
            f"This site requires secure noise (policy.secure_noise), which the {mode!r} "
            "clipping mode cannot draw; only models book-keeping clipping supports can train."
        )
    check_generative_mode(net, mode)
    load_weights(net, global_state, what="the global weights")
    net.to(device)
    net.train()
    start = {k: v.detach().to(torch.float32).clone() for k, v in net.state_dict().items()}

    loader: DataLoader[Any] = (
        tensor_poisson_loader(x, y, q, _private_generator())
        if rows is None
        else rows.poisson_loader(q, _private_generator())
    )
    if params.optimizer.name == "sgld":  # Langevin (common.training.sgld): SGD, topped-up noise
        optimizer: torch.optim.Optimizer = sgld.LangevinSGD(
            list(net.parameters()),
            lr=params.optimizer.lr,
            weight_decay=params.optimizer.weight_decay,
            extra_std=sgld.extra_std(
                lr=params.optimizer.lr,
                temperature=params.optimizer.temperature,
                noise_multiplier=params.noise_multiplier,
                max_grad_norm=params.max_grad_norm,
                expected=q * n,
                num_examples=n,
            ),
            generator=_private_generator(device),
        )
    else:
        optimizer = _optimizer(params.optimizer, list(net.parameters()))
    if mode == "bk":
        _run_bookkeeping(net, optimizer, loader, params=params, steps=steps, expected=q * n)
    else:
        run_opacus(net, optimizer, loader, params=params, steps=steps, expected=q * n, mode=mode)

    # Both paths train ``net``'s parameters in place, and leave no hook or wrapper on it, so
    # its state dict has the spec's key names.
    end = net.state_dict()
    delta = {k: (end[k].detach().to(torch.float32) - start[k]).cpu().contiguous() for k in start}
    _check_finite(delta)
    return LocalResult(
        delta=delta,
        num_examples=n,
        sample_rate=q,
        steps=steps,
        noise_multiplier=float(params.noise_multiplier),
        max_grad_norm=float(params.max_grad_norm),
        grad_sample_mode=mode,
    )


def _check_finite(delta: Mapping[str, Tensor]) -> None:
    """Never release a non-finite update.

    Every step's clipped sum is finite by construction (each example adds at most ``C``, and
    an example with a non-finite gradient adds zero), so the weights are post-processing of
    finite noised sums: whether they stay finite depends on the data only through the DP
    mechanism's outputs, and refusing here reveals nothing more than the update would. The
    message is fixed; it never depends on a value. It can only show when the optimiser
    diverges (e.g. a learning rate far too large for the noise).
    """
    if not all(bool(torch.isfinite(v).all()) for v in delta.values()):
        raise InvalidSpecError(
            "Local training diverged (the weights are no longer finite numbers); the update "
            "is withheld. Lower the learning rate."
        )


def _run_bookkeeping(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    *,
    params: TrainParams,
    steps: int,
    expected: float,
) -> None:
    """DP-SGD steps with book-keeping clipping (:class:`site_agent.clipping.BookKeeper`): the
    clipped sum, the noise ``N(0, (σC)²)`` from the site's private generator and the division
    by the public expected batch size ``q·N`` (post-processing of the noised sum), then the
    optimiser's own step."""
    generator = _private_generator(device_of(net))
    std = params.noise_multiplier * params.max_grad_norm
    # Per-example losses summed: each example's gradient is then its own ∇ℓ_i, which the
    # keeper clips.
    criterion = nn.CrossEntropyLoss(reduction="sum")
    keeper = BookKeeper(net)
    with keeper.attach():
        for xb, yb in poisson_batches(loader, steps, device_of(net)):
            optimizer.zero_grad(set_to_none=True)
            if xb.shape[0] == 0:
                keeper.zero_batch()  # an empty sample still takes a noise-only step
            else:
                # The loss is a tensor that only ever reaches backward(): never a number.
                keeper.clipped_backward(batch_loss(net, criterion, xb, yb), params.max_grad_norm)
            keeper.add_noise(std=std, generator=generator, expected_batch_size=expected)
            optimizer.step()


def evaluate(
    *,
    model_spec: ModelSpec,
    state: Mapping[str, Tensor],
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    loss_bound: float,
    noise_multiplier: float | None,
    auc_bins: int = DEFAULT_AUC_BINS,
) -> EvalMetrics:
    """Validation metrics on site data, released through one Gaussian mechanism.

    Each row ``i`` contributes ``v_i = (1, c_i, ℓ_i/B, e_i)``: a count, ``c_i ∈ {0, 1}`` (is
    the prediction correct), ``ℓ_i ∈ [0, B]`` its cross-entropy clipped to ``B = loss_bound``
    (NaN or ∞ count as ``B``), and, for a model with two classes, ``e_i`` the one-hot
    indicator of its (label, score bin) among ``2·H`` cells, the score being the model's
    P(class 1) cut into ``H = auc_bins`` equal bins of [0, 1] (NaN in the first). Released:
    ``Σ_i v_i + N(0, (σ·Δ)² I)``.

    Sensitivity: adding or removing a row changes the sum by ``v_i``, of squared L2 norm at
    most ``1 + 1 + 1 (+ 1)``: ``Δ = √3``, or ``2`` with the histogram; replacing a row
    changes the count by 0, ``c`` and ``ℓ/B`` by at most 1 and two histogram cells by 1: at
    most ``√4 = 2``. So the release is one Gaussian mechanism with noise multiplier ``σ``
    (std over L2 sensitivity; Dwork & Roth 2014, App. A), charged as ``(σ, q = 1, 1 step)``
    whatever ``Δ`` is; ``tests/unit/test_metric_pooling.py`` checks ``Δ`` on neighbouring
    datasets, and ``orchestrator.metric_pooling`` pools the sums with standard errors from
    the same ``σ·Δ``. No row count leaves exactly: noised metrics carry ``num_examples = 0``.
    The noise comes from a generator seeded from OS entropy, never from a known seed.

    With ``noise_multiplier=None`` the exact sums are returned (outside any guarantee; the
    site's policy decides whether they may leave). No rows gives zero sums (plus noise):
    whether a site has validation rows is not revealed by an error.

    Raises:
        InvalidSpecError: mis-shaped data, a non-positive ``loss_bound``,
            ``noise_multiplier`` or ``auc_bins``, or weights that do not fit the spec.
    """
    if not (loss_bound > 0.0 and math.isfinite(loss_bound)):
        raise InvalidSpecError(f"loss_bound must be a finite number > 0, got {loss_bound}.")
    if noise_multiplier is not None and not (
        noise_multiplier > 0.0 and math.isfinite(noise_multiplier)
    ):
        raise InvalidSpecError(
            f"noise_multiplier must be a finite number > 0 or None, got {noise_multiplier}."
        )
    if auc_bins < 1:
        raise InvalidSpecError(f"auc_bins must be at least 1, got {auc_bins}.")
    x, y = _check_arrays(model_spec, features, labels)
    n = int(x.shape[0])
    binary = model_dims(model_spec)[1] == 2
    hist = torch.zeros(2 * auc_bins if binary else 0, dtype=torch.float64)

    net = build_model(model_spec)
    load_weights(net, state, what="the weights to evaluate")
    net.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # count, correct, clipped loss / B
    with torch.no_grad():
        for start in range(0, n, _EVAL_BATCH):
            xb, yb = x[start : start + _EVAL_BATCH], y[start : start + _EVAL_BATCH]
            logits = net(xb)
            per_example = nn.functional.cross_entropy(logits, yb, reduction="none")
            # NaN or inf losses count as the bound: the clip must hold for *every* example.
            per_example = torch.nan_to_num(per_example, nan=loss_bound, posinf=loss_bound)
            scaled = per_example.to(torch.float64).clamp(0.0, loss_bound) / loss_bound
            sums[0] += float(xb.shape[0])
            sums[1] += (logits.argmax(dim=1) == yb).sum().to(torch.float64)
            sums[2] += scaled.sum()
            if binary:
                scores = torch.softmax(logits.to(torch.float64), dim=1)[:, 1]
                cells = yb * auc_bins + score_bins(scores, auc_bins)
                hist += torch.bincount(cells, minlength=2 * auc_bins).to(torch.float64)

    if noise_multiplier is not None:
        std = noise_multiplier * metrics_sensitivity(histogram=binary)
        gen = _private_generator()
        sums += noise.gaussian_torch(std, (3,), generator=gen, dtype=torch.float64)
        if binary:
            hist += noise.gaussian_torch(std, hist.shape, generator=gen, dtype=torch.float64)
    count, correct_sum, loss_sum = float(sums[0]), float(sums[1]), float(sums[2]) * loss_bound
    return EvalMetrics(
        loss=loss_sum / count if count >= 1 else 0.0,
        accuracy=correct_sum / count if count >= 1 else 0.0,
        num_examples=n,
        noise_multiplier=noise_multiplier,
        correct_sum=correct_sum,
        loss_sum=loss_sum,
        count_sum=count,
        score_histogram=tuple(float(v) for v in hist),
    )
