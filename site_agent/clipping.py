"""Per-example gradient clipping in a single backward pass ("book-keeping").

DP-SGD (Abadi et al., CCS 2016) releases ``Σ_i clip_C(∇ℓ_i) + N(0, σ²C²I)``: it needs every
example's gradient norm before it can form the clipped sum. Opacus offers two ways to get
it: ``hooks`` materialises every per-example gradient (``B × |θ|`` floats), and ``ghost``
(Li et al., ICLR 2022) gets the norms from activations and output gradients but then runs a
*second* backward pass on the loss re-weighted by the clipping factors. That second pass is
why ghost clipping costs about twice a non-private step on dense nets.

Book-keeping clipping (Bu, Wang, Zha & Karypis, "Differentially Private Optimization on
Large Model at Small Cost", ICML 2023) needs one backward pass. For a layer ``out = a·Wᵀ``
the per-example weight gradient is ``g_iᵀ a_i`` (``g`` the gradient of the loss with respect
to the layer's output), so during the single backward pass it keeps ("book-keeps") each
layer's input ``a`` and output gradient ``g``, and afterwards

1. computes each example's squared gradient norm layer by layer, either from the two Gram
   matrices ("ghost norm", ``⟨a_i a_iᵀ, g_i g_iᵀ⟩``, which is ``‖a_i‖²‖g_i‖²`` for a dense
   layer on a vector) or by materialising that layer's per-example gradient, whichever
   costs fewer operations (Bu et al. 2023, §3, "hybrid" layer-wise choice);
2. sums the layers to each example's total norm and forms Opacus' clipping factor
   ``c_i = min(1, C / (‖∇ℓ_i‖ + 10⁻⁶))``;
3. writes the clipped sum ``Σ_i c_i g_iᵀ a_i = (c ⊙ g)ᵀ a`` into ``p.grad``: one matrix
   product per layer, the same cost as the weight gradient a non-private step computes.

The backward pass itself computes only input gradients (the weight gradients of the
non-private pass would be thrown away), so the private step costs the non-private one plus
the norms, the noise and a little Python. The result is the same clipped sum that Opacus'
``hooks`` and ``ghost`` modes compute; ``tests/unit/test_clipping.py`` checks the norms
against per-example gradients from ``torch.func`` and the update against Opacus.

Whatever a record holds, the sum stays finite and each example adds at most ``C``: norms
cannot overflow (dense layers on vectors take them in float64; other layers from tensors
max-normalised per example, the scales in float64: :mod:`site_agent.clipping_normalised`),
and an example whose book-kept tensors
hold a NaN or an infinity gets factor 0 and zeroed rows, so it contributes nothing
(``tests/unit/test_finite_clipping.py``).

The gradients live in one buffer while the keeper is attached, so the rest of the step is
two operations: :meth:`BookKeeper.add_noise` adds ``N(0, (σC)²)`` drawn at once for every
parameter from the site's private generator (:mod:`common.dp.noise`), and divides by the
public expected batch size, as Opacus' ``DPOptimizer.add_noise`` and ``scale_grad`` do.

Supported layers: ``nn.Linear`` (any leading dimensions), ``nn.Conv1d`` and ``nn.Conv2d``
(zero padding, one group), ``nn.GroupNorm`` (affine), and any module without parameters of
its own. :func:`supports` tells whether a network qualifies; the trainer falls back to
Opacus' ghost mode otherwise. Correctness needs each example's loss to depend on that
example only, which holds for every layer above (GroupNorm normalises within an example;
BatchNorm would break it and has no support here, as in Opacus).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv1d_input, conv2d_input

from common.dp import noise
from site_agent.clipping_normalised import (
    Out,
    accumulate,
    prepare,
    trainable,
    write_clipped_sum,
)

_CLIP_EPS = 1e-6
"""Opacus' guard in ``max_grad_norm / (norm + 1e-6)`` (``opacus.optimizers.optimizer``)."""


@dataclass
class _Tape:
    """What one backward pass book-keeps for one layer: its inputs and output gradients."""

    layer: nn.Module
    saved: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def clear(self) -> None:
        self.saved.clear()


class _BookKeptFn(torch.autograd.Function):
    """A layer's forward whose backward keeps ``(a, g)`` (its input and output gradient) on
    the layer's tape and returns only the input gradient, never the parameters'.

    The forward takes ``ctx`` itself (no ``setup_context``): with ``setup_context`` PyTorch
    binds every call's arguments through ``inspect.signature``, about 0.1 ms per layer and
    step, a visible share of a small network's step."""

    @classmethod
    def forward(
        cls, ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, tape: _Tape
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.tape = tape
        return cls.compute(x, weight, bias, tape)

    @staticmethod
    def compute(x: Tensor, weight: Tensor, bias: Tensor | None, tape: _Tape) -> Tensor:
        raise NotImplementedError

    @classmethod
    def backward(cls, ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        x, weight = ctx.saved_tensors
        tape: _Tape = ctx.tape
        tape.saved.append((x, grad))
        grad_x = cls.input_grad(tape.layer, x, weight, grad) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None

    @staticmethod
    def input_grad(layer: nn.Module, x: Tensor, weight: Tensor, grad: Tensor) -> Tensor:
        raise NotImplementedError


class _LinearFn(_BookKeptFn):
    """``F.linear``, book-kept."""

    @staticmethod
    def compute(x: Tensor, weight: Tensor, bias: Tensor | None, tape: _Tape) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def input_grad(layer: nn.Module, x: Tensor, weight: Tensor, grad: Tensor) -> Tensor:
        return grad @ weight


class _ConvFn(_BookKeptFn):
    """``F.conv1d``/``F.conv2d``, book-kept."""

    @staticmethod
    def compute(x: Tensor, weight: Tensor, bias: Tensor | None, tape: _Tape) -> Tensor:
        conv = tape.layer
        assert isinstance(conv, (nn.Conv1d, nn.Conv2d))
        fn = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv1d
        return fn(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def input_grad(layer: nn.Module, x: Tensor, weight: Tensor, grad: Tensor) -> Tensor:
        assert isinstance(layer, (nn.Conv1d, nn.Conv2d))
        input_grad = conv2d_input if isinstance(layer, nn.Conv2d) else conv1d_input
        grad_x: Tensor = input_grad(  # type: ignore[no-untyped-call]
            x.shape, weight, grad, layer.stride, layer.padding, layer.dilation, layer.groups
        )
        return grad_x


class _AffineFn(_BookKeptFn):
    """GroupNorm's per-channel affine ``x̂·w + b``, book-kept (``a`` is ``x̂``)."""

    @staticmethod
    def compute(  # type: ignore[override]
        xhat: Tensor, weight: Tensor, bias: Tensor, tape: _Tape
    ) -> Tensor:
        shape = (1, -1) + (1,) * (xhat.dim() - 2)
        return torch.addcmul(bias.view(shape), xhat, weight.view(shape))

    @staticmethod
    def input_grad(layer: nn.Module, x: Tensor, weight: Tensor, grad: Tensor) -> Tensor:
        return grad * weight.view((1, -1) + (1,) * (x.dim() - 2))


def _linear_forward(tape: _Tape) -> Any:
    layer = tape.layer
    assert isinstance(layer, nn.Linear)

    def forward(x: Tensor) -> Tensor:
        return _LinearFn.apply(x, layer.weight, layer.bias, tape)  # type: ignore[no-untyped-call,no-any-return]

    return forward


def _conv_forward(tape: _Tape) -> Any:
    layer = tape.layer
    assert isinstance(layer, (nn.Conv1d, nn.Conv2d))

    def forward(x: Tensor) -> Tensor:
        return _ConvFn.apply(x, layer.weight, layer.bias, tape)  # type: ignore[no-untyped-call,no-any-return]

    return forward


def _groupnorm_forward(tape: _Tape) -> Any:
    layer = tape.layer
    assert isinstance(layer, nn.GroupNorm)

    def forward(x: Tensor) -> Tensor:
        xhat = F.group_norm(x, layer.num_groups, None, None, layer.eps)
        return _AffineFn.apply(xhat, layer.weight, layer.bias, tape)  # type: ignore[no-untyped-call,no-any-return]

    return forward


def _supported_layer(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
    if isinstance(module, nn.GroupNorm):
        return module.affine
    return False


def supports(net: nn.Module) -> bool:
    """Whether every trainable parameter of ``net`` sits in a layer this module handles."""
    for module in net.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and not _supported_layer(module):
            return False
    return True


# -- per-example norms and the clipped sum, layer by layer ------------------------------------


def _is_dense(tape: _Tape) -> bool:
    """A dense layer on one vector per example (the MLPs' layers) with a trainable weight."""
    a = tape.saved[0][0]
    return (
        isinstance(tape.layer, nn.Linear)
        and a.numel() == a.shape[0] * a.shape[-1]
        and trainable(tape.layer, "weight")
    )


def _dense_sq_norms(tapes: list[_Tape]) -> Tensor:
    """Each example's squared gradient norm summed over dense layers (float64 ``(B,)``).

    For ``out = a·Wᵀ + b`` on vectors the per-example gradients are ``g_i a_iᵀ`` and ``g_i``,
    so the layer's share is ``‖g_i‖²(‖a_i‖² + 1)`` (``‖g_i‖²‖a_i‖²`` without a trainable
    bias). Both norms are taken in float64 from the tensors as they are: float64 norms of
    float32 rows cannot overflow, and no normalised copy is needed (every term ``c_i g_ij
    a_ik`` of the clipped sum is at most ``c_i ‖g_i‖ ‖a_i‖ ≤ C``). A NaN or an infinity in
    ``a_i`` or ``g_i`` makes the example's sum NaN or ∞ (``∞·0`` is NaN), which
    :meth:`BookKeeper.clipped_backward` turns into factor 0. All layers at once: the norms
    are stacked ``(L, B)``, so the arithmetic is a handful of operations whatever the depth.
    """
    norm_a = torch.stack([_row_norms(t.saved[0][0]) for t in tapes])
    norm_g = torch.stack([_row_norms(t.saved[0][1]) for t in tapes])
    biased = [trainable(t.layer, "bias") for t in tapes]
    norm_a.square_()
    if all(biased):
        norm_a.add_(1.0)
    else:
        for row, bias in zip(norm_a, biased, strict=True):
            if bias:
                row.add_(1.0)
    return norm_a.mul_(norm_g.square_()).sum(0)


def _row_norms(x: Tensor) -> Tensor:
    norms: Tensor = torch.linalg.vector_norm(_rows(x), dim=1, dtype=torch.float64)
    return norms


def _rows(x: Tensor) -> Tensor:
    """``(B, …)`` → ``(B, n)``; a dense layer's ``a`` and ``g`` are ``(B, d)`` already."""
    return x if x.dim() == 2 else x.reshape(x.shape[0], -1)


def _write_dense(layer: nn.Module, a: Tensor, g: Tensor, factors: Tensor, out: Out) -> None:
    """``(c ⊙ g)ᵀ a`` and ``Σ_i c_i g_i``, written straight into the gradients' storage;
    ``factors`` in the parameters' dtype."""
    assert isinstance(layer, nn.Linear)
    a, g = _rows(a), _rows(g)
    # c_i = 0 for a non-finite example: its NaN products and ∞ inputs are zeroed, the rest of
    # its row is multiplied by 0. Same operations for every batch.
    scaled = g * factors.view(-1, 1)
    torch.nan_to_num_(scaled, nan=0.0, posinf=0.0, neginf=0.0)
    a = torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    dest = out.get(id(layer.weight))
    if dest is None:
        accumulate(layer.weight, scaled.t() @ a)
    else:
        torch.mm(scaled.t(), a, out=dest)
    if trainable(layer, "bias"):
        assert layer.bias is not None
        dest = out.get(id(layer.bias))
        if dest is None:
            accumulate(layer.bias, scaled.sum(0))
        else:
            torch.sum(scaled, 0, out=dest)


class BookKeeper:
    """Swaps a network's parametrised layers for book-keeping versions while active.

    Use :meth:`attach` as a context manager around the training loop. Each DP-SGD step:
    clear the gradients (``optimizer.zero_grad(set_to_none=True)``), call
    :meth:`clipped_backward` instead of ``loss.backward()`` (or :meth:`zero_batch` for an
    empty Poisson sample), then :meth:`add_noise`, then ``optimizer.step()``.

    While attached, the trainable parameters' gradients are views of one buffer the keeper
    owns (when they share a dtype and device): the clipped sums are written into it, and the
    noise is drawn once for all of them and added to it in place. The next step's
    :meth:`clipped_backward` overwrites it (after the gradients were cleared).
    """

    def __init__(self, net: nn.Module) -> None:
        if not supports(net):
            raise ValueError("The network has a parametrised layer book-keeping cannot clip.")
        self.net = net
        self._tapes: list[_Tape] = []
        self._params: list[Tensor] = []
        self._flat: Tensor | None = None
        self._views: Out = {}
        self._summed = False

    @contextmanager
    def attach(self) -> Iterator[BookKeeper]:
        """Install the book-keeping forwards on the network's layers; restore them after."""
        patched: list[nn.Module] = []
        try:
            for module in self.net.modules():
                if not any(p.requires_grad for p in module.parameters(recurse=False)):
                    continue
                tape = _Tape(module)
                if isinstance(module, nn.Linear):
                    module.forward = _linear_forward(tape)  # type: ignore[method-assign]
                elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
                    module.forward = _conv_forward(tape)  # type: ignore[method-assign]
                else:
                    module.forward = _groupnorm_forward(tape)
                patched.append(module)
                self._tapes.append(tape)
            self._allocate()
            yield self
        finally:
            for module in patched:
                del module.forward  # the instance attribute; the class method shows again
            self._tapes.clear()
            self._params, self._flat, self._views, self._summed = [], None, {}, False

    def _allocate(self) -> None:
        """One gradient buffer for the trainable parameters, if they share dtype and device."""
        self._params = [p for p in self.net.parameters() if p.requires_grad]
        kinds = {(p.dtype, p.device) for p in self._params}
        if len(kinds) != 1:
            return
        ((dtype, device),) = kinds
        self._flat = torch.zeros(sum(p.numel() for p in self._params), dtype=dtype, device=device)
        offset = 0
        for p in self._params:
            self._views[id(p)] = self._flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def clipped_backward(self, loss: Tensor, max_grad_norm: float) -> Tensor:
        """Backward of ``loss`` (a **sum** over the batch), then ``p.grad = Σ_i c_i ∇ℓ_i``
        (added to ``p.grad`` if a parameter's gradient was not cleared).

        An example whose book-kept tensors hold a NaN or an infinity (a non-finite feature, or
        one so large that the forward pass overflowed) contributes zero, silently: its factor
        is 0 and its rows are zeroed before any product, so ``0 · ∞`` never occurs. Norms
        are computed from max-normalised tensors with the scales in float64, so a finite
        example's norm cannot overflow (float32 squares would beyond ``1.8·10¹⁹``). Each
        example therefore adds at most ``C`` to a finite sum, whatever its values: one
        record can neither poison the update nor reveal through a non-finite result that it
        was sampled.

        Returns the per-example gradient norms before clipping, float64, ``inf`` for an
        example that contributes zero (they stay on the site: the trainer never releases
        them).
        """
        if not self._tapes:
            raise RuntimeError("BookKeeper.clipped_backward needs attach() to be active.")
        for tape in self._tapes:
            tape.clear()
        loss.backward()  # type: ignore[no-untyped-call]
        with torch.no_grad():  # the sums are gradients: nothing here is differentiated
            norms = self._clip_and_sum(max_grad_norm, loss.device)
        for tape in self._tapes:
            tape.clear()
        self._summed = True
        return norms

    def _clip_and_sum(self, max_grad_norm: float, device: torch.device) -> Tensor:
        for tape in self._tapes:
            if len(tape.saved) != 1:
                # A layer applied twice has per-example gradient g¹ᵀa¹ + g²ᵀa²: the norm of
                # the sum is not the sum of the norms. No model of the zoo shares a layer.
                raise RuntimeError(
                    "Book-keeping clipping does not support a layer used twice (or not at all)."
                )
        dense: list[_Tape] = []
        others: list[_Tape] = []
        for tape in self._tapes:
            (dense if _is_dense(tape) else others).append(tape)
        items = [prepare(t.layer, *t.saved[0]) for t in others]
        sq_norms = (
            _dense_sq_norms(dense) if dense else torch.zeros((), dtype=torch.float64, device=device)
        )
        for item in items:
            sq_norms = sq_norms + item.sq_norm
        norms = sq_norms.sqrt()
        # Opacus' factor min(1, C / (‖∇ℓ_i‖ + 10⁻⁶)); C/∞ = 0, and a NaN norm gives NaN → 0.
        factors = (max_grad_norm / (norms + _CLIP_EPS)).clamp_(max=1.0)
        torch.nan_to_num_(factors, nan=0.0)
        if items:  # a flagged example of a normalised layer may have a finite norm
            bad = functools.reduce(operator.or_, [item.bad for item in items])
            factors = torch.where(bad, torch.zeros_like(factors), factors)
            norms = torch.where(bad, torch.full_like(norms, math.inf), norms)
        norms = torch.nan_to_num(norms, nan=math.inf, posinf=math.inf)
        # Into the buffer when every gradient was cleared; else new tensors, accumulated.
        out = self._views if all(p.grad is None for p in self._params) else {}
        if dense:
            dense_factors = factors.to(dense[0].saved[0][1].dtype)
            for tape in dense:
                a, g = tape.saved[0]
                _write_dense(tape.layer, a, g, dense_factors, out)
        for item in items:
            write_clipped_sum(item, factors, out)
        for p in self._params:
            if id(p) in out:
                p.grad = out[id(p)]
        return norms

    def zero_batch(self) -> None:
        """An empty Poisson sample: the clipped sum is zero (the noise is still added)."""
        for p in self.net.parameters():
            if p.requires_grad:
                view = self._views.get(id(p))
                p.grad = torch.zeros_like(p) if view is None else view.zero_()
        self._summed = True

    def add_noise(
        self, *, std: float, generator: torch.Generator | None, expected_batch_size: float
    ) -> None:
        """``p.grad ← (p.grad + N(0, std²·I)) / expected_batch_size`` for every trainable
        parameter, once per clipped sum (Opacus' ``DPOptimizer.add_noise`` and
        ``scale_grad``: ``std`` is ``σ·C``, the divisor the public expected batch size
        ``q·N``, so the division is post-processing of the noised sum).

        The noise comes from :func:`common.dp.noise.gaussian_torch`: the site's configured
        source, ``generator`` being its private generator (:func:`common.dp.noise.
        private_torch_generator`, on the parameters' device); one draw for the whole buffer,
        added in place.

        Raises:
            RuntimeError: no clipped sum since the last call (the noise would be added twice).
            ValueError: a non-positive batch size.
        """
        if not self._summed:
            raise RuntimeError(
                "BookKeeper.add_noise needs a clipped sum first (clipped_backward or "
                "zero_batch), once per step."
            )
        if not (expected_batch_size > 0.0 and math.isfinite(expected_batch_size)):
            raise ValueError(
                f"expected_batch_size must be a finite number > 0, got {expected_batch_size}."
            )
        self._summed = False
        flat = self._flat
        if flat is not None and all(p.grad is self._views[id(p)] for p in self._params):
            flat.add_(
                noise.gaussian_torch(
                    std, flat.shape, generator=generator, dtype=flat.dtype, device=flat.device
                )
            )
            flat.div_(expected_batch_size)
            return
        for p in self._params:
            assert p.grad is not None
            drawn = noise.gaussian_torch(
                std, p.shape, generator=generator, dtype=p.grad.dtype, device=p.grad.device
            )
            p.grad = drawn.add_(p.grad).div_(expected_batch_size)
