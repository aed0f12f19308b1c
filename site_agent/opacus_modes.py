"""Opacus' per-example clipping modes (``ghost``, ``hooks``) made finite for any record, and
the step loop every DP-SGD mode shares (exactly ``steps`` Poisson batches, none skipped).

Opacus computes per-example norms in the model's dtype, and one extreme feature can make a
norm infinite and the clipped sum ``0 · ∞ = NaN``: here an example whose per-example gradient
or norm is not finite gets a clipping factor of zero, as in book-keeping
(:mod:`site_agent.clipping`). :func:`site_agent.trainer.train_local` chooses the mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import Tensor, nn
from torch.utils.data import DataLoader

from common.dp import noise

if TYPE_CHECKING:
    from site_agent.trainer import TrainParams


def device_of(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def poisson_batches(
    loader: DataLoader[Any], steps: int, device: torch.device | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Exactly ``steps`` Poisson batches: one "epoch" of ``1/q`` samples is not a limit.
    Sampled on the CPU beside the rows; each batch then moves to ``device`` when given."""
    batches = iter(loader)
    for _ in range(steps):
        try:
            xb, yb = next(batches)
        except StopIteration:
            batches = iter(loader)
            xb, yb = next(batches)
        if device is not None and device.type != "cpu":
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        yield xb, yb


def check_not_skipped(optimizer: Any) -> None:
    if optimizer._is_last_step_skipped:  # pragma: no cover - would void accounting
        raise RuntimeError("Opacus skipped a DP-SGD step; the accounting would be wrong.")


def _zero_rows(x: Tensor, ok: Tensor) -> Tensor:
    return torch.where(ok.view((-1,) + (1,) * (x.dim() - 1)), x, torch.zeros_like(x))


class _FiniteClipOptimizer(DPOptimizer):  # type: ignore[misc]
    """Opacus' ``DPOptimizer`` (hooks mode) whose clipping cannot produce a NaN.

    Mirrors ``DPOptimizer.clip_and_accumulate`` (``c_i = min(1, C / (‖g_i‖ + 10⁻⁶))``,
    ``summed_grad = Σ_i c_i g_i``), with the norms in float64, and an example whose
    per-example gradient or norm is not finite gets ``c_i = 0`` and zeroed rows.
    """

    def clip_and_accumulate(self) -> None:
        samples = [self._get_flat_grad_sample(p) for p in self.params]
        batch = len(samples[0])
        if batch == 0:  # an empty Poisson sample: Opacus' own handling (a zero sum)
            super().clip_and_accumulate()
            return
        ok = torch.ones(batch, dtype=torch.bool, device=samples[0].device)
        for g in samples:
            ok = ok & torch.isfinite(g).flatten(1).all(1)
        norms = torch.zeros(batch, dtype=torch.float64, device=ok.device)
        for g in samples:
            norms = norms + _zero_rows(g, ok).flatten(1).to(torch.float64).square().sum(1)
        norms = norms.sqrt()
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        factors = torch.where(ok & torch.isfinite(norms), factors, torch.zeros_like(factors))
        for p, g in zip(self.params, samples, strict=True):
            _check_processed_flag(p.grad_sample)
            grad = torch.einsum("i,i...", factors.to(p.dtype), _zero_rows(g.to(p.dtype), ok))
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)


class _FiniteGhostModule(GradSampleModuleFastGradientClipping):  # type: ignore[misc]
    """Opacus' ghost-clipping module whose clipping factor is zero where a norm is not finite
    (Opacus' ``C / (norm + 10⁻⁶)`` would be NaN for a NaN norm, and NaN for the sum)."""

    def get_clipping_coef(self) -> Tensor:
        norms = self.get_norm_sample()
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        return torch.where(torch.isfinite(norms), coef, torch.zeros_like(coef))


def run_opacus(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    *,
    params: TrainParams,
    steps: int,
    expected: float,
    mode: str,
) -> None:
    """DP-SGD steps with Opacus' own per-example gradients (``ghost`` or ``hooks``).

    Opacus computes per-example norms in the model's dtype, and float32 squares overflow
    beyond ``1.8·10¹⁹``: one extreme feature would make a norm infinite and the clipped sum
    ``0 · ∞ = NaN``. So these modes train in float64 (the delta is cast back to float32),
    where no finite float32 input overflows a norm; rows with a non-finite feature are
    taken out of the batch (they contribute zero, as in book-keeping); and the clipping
    factor of any example whose norm or per-example gradient is still not finite is zero
    (:class:`_FiniteClipOptimizer`, :class:`_FiniteGhostModule`).
    """
    net.double()  # in place: the optimiser keeps the same parameter objects
    criterion = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        # "Secure RNG turned off": our generators are seeded from OS entropy (see module doc).
        warnings.simplefilter("ignore", UserWarning)
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        made: tuple[Any, ...] = engine.make_private(
            module=net,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=params.noise_multiplier,
            max_grad_norm=params.max_grad_norm,
            poisson_sampling=False,  # the loader already samples, at the exact q
            grad_sample_mode=mode,
            noise_generator=noise.private_torch_generator(device_of(net)),
        )
    if mode == "ghost":
        dp_model, dp_optimizer, dp_criterion, dp_loader = made
        assert type(dp_model) is GradSampleModuleFastGradientClipping
        dp_model.__class__ = _FiniteGhostModule
    else:
        dp_model, dp_optimizer, dp_loader = made
        dp_criterion = criterion
        assert type(dp_optimizer) is DPOptimizer
        dp_optimizer.__class__ = _FiniteClipOptimizer
    # Each Poisson batch is one step; accumulating several would break the accounting.
    dp_model.forbid_grad_accumulation()
    dp_optimizer.expected_batch_size = expected
    with warnings.catch_warnings():
        # PyTorch notes that the first layer's input needs no gradient; expected here.
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing", category=UserWarning
        )
        for xb, yb in poisson_batches(dp_loader, steps, device_of(net)):
            dp_optimizer.zero_grad(set_to_none=True)
            # Same operations whatever the values: no data-dependent branch.
            keep = torch.isfinite(xb).all(1)
            xb, yb = xb[keep].to(torch.float64), yb[keep]
            # The loss is a tensor that only ever reaches backward(): never a number.
            dp_criterion(dp_model(xb), yb).backward()
            dp_optimizer.step()
            check_not_skipped(dp_optimizer)
    dp_model.to_standard_module()  # removes Opacus' hooks from ``net``
