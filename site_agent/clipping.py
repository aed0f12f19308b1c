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
max-normalised per example, the scales in float64), and an example whose book-kept tensors
hold a NaN or an infinity gets factor 0 and zeroed rows, so it contributes nothing
(``tests/unit/test_finite_clipping.py``).

Noise and averaging are left to Opacus' ``DPOptimizerFastGradientClipping`` (as
``site_agent.trainer.SiteNoiseOptimizer``, which draws the noise through
:mod:`common.dp.noise`): it adds ``N(0, (σC)²)`` to ``p.grad`` and divides by the expected
batch size.

Supported layers: ``nn.Linear`` (any leading dimensions), ``nn.Conv1d`` and ``nn.Conv2d``
(zero padding, one group), ``nn.GroupNorm`` (affine), and any module without parameters of
its own. :func:`supports` tells whether a network qualifies; the trainer falls back to
Opacus' ghost mode otherwise. Correctness needs each example's loss to depend on that
example only, which holds for every layer above (GroupNorm normalises within an example;
BatchNorm would break it and has no support here, as in Opacus).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv1d_input, conv2d_input

_CLIP_EPS = 1e-6
"""Opacus' guard in ``max_grad_norm / (norm + 1e-6)`` (``opacus.optimizers.optimizer``)."""


@dataclass
class _Tape:
    """What one backward pass book-keeps for one layer: its inputs and output gradients."""

    layer: nn.Module
    saved: list[tuple[Tensor, Tensor]] = field(default_factory=list)


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


_MAX_FACTOR = 1e24
"""Cap on the float32 multiplier ``c_i · s_i`` applied to an example's max-normalised
tensors. It is at most ``C / ‖Ĝ_i‖`` (the normalised gradient's norm), which for a dense
layer on vectors is at most ``C``; only a gradient that cancels to below ``C·10⁻²⁴`` of its
scale could reach the cap, and the cap only ever scales a contribution *down*. With entries
of ``ĝ`` and ``â`` in ``[-1, 1]`` it keeps every term of the clipped sum below ``10²⁴``."""


def _as_sequence(x: Tensor) -> Tensor:
    """``(B, …, d)`` → ``(B, T, d)``: a dense layer's positions as a sequence."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _unfold(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """The conv's input patches, ``(B, C_in·k, T)``: the conv is ``W · patches``."""
    if isinstance(conv, nn.Conv2d):
        padding = conv.padding
        assert not isinstance(padding, str)  # refused by supports()
        return F.unfold(
            x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride
        )
    return F.unfold(
        x.unsqueeze(2),
        (1, conv.kernel_size[0]),
        dilation=(1, conv.dilation[0]),
        padding=(0, int(conv.padding[0])),
        stride=(1, conv.stride[0]),
    )


def _normalise(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each example divided by its largest absolute value; those scales (float64); and
    whether the example's values are all finite.

    Rows holding a NaN or an infinity become zeros (scale 1). Entries of the result lie in
    ``[-1, 1]``, so squares and Gram matrices of it cannot overflow float32 whatever the
    input's magnitude; the scales carry the magnitude in float64, where ``(3.4·10³⁸)⁴``
    still fits. Always the same three passes whatever the values (no data-dependent branch):
    the max-norm (NaN or ∞ for a non-finite row), a division (by ∞ for such a row), and
    zeroing what is not finite.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    rows = x.reshape(x.shape[0], -1)
    # max |x| per row without an |x| copy (vector_norm's ord=∞ is ten times slower); NaN and
    # ∞ propagate through amax/amin and maximum.
    scale = torch.maximum(rows.amax(1), -rows.amin(1))
    ok = torch.isfinite(scale)
    one = torch.ones((), dtype=x.dtype, device=x.device)
    scale = torch.where(scale > 0, scale, one)
    out = x / torch.where(ok, scale, math.inf).view(shape)
    torch.nan_to_num_(out, nan=0.0, posinf=0.0, neginf=0.0)
    return out, torch.where(ok, scale, one).to(torch.float64), ok


def _gram_or_materialise(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor | None]:
    """Squared norms of the per-example products ``g_iᵀ a_i`` for ``a (B,T,d)``, ``g (B,T,p)``.

    Returns ``(norms², per_example)`` where ``per_example`` is the ``(B, p, d)`` gradient if
    it was materialised (cheaper than the Gram matrices when ``T² > p·d``), else ``None``.
    The inputs are max-normalised (:func:`_normalise`), so nothing here overflows.
    """
    t, d, p = a.shape[1], a.shape[2], g.shape[2]
    if t == 1:
        return (a.square().sum((1, 2))) * (g.square().sum((1, 2))), None
    if t * t <= p * d:
        gram_a = torch.bmm(a, a.transpose(1, 2))
        gram_g = torch.bmm(g, g.transpose(1, 2))
        return (gram_a * gram_g).sum((1, 2)), None
    per_example = torch.bmm(g.transpose(1, 2), a)
    return per_example.square().sum((1, 2)), per_example


@dataclass
class _LayerGrad:
    """One layer's book-kept tensors, prepared for norms and the clipped sum.

    Only trainable parameters count: a frozen weight contributes neither to the norm nor to
    the sum (as in Opacus, which clips the gradients of trainable parameters only).

    Tensors are max-normalised per example: the layer's true per-example weight gradient is
    ``weight_scale_i · (ĝ_iᵀ â_i)`` and its bias gradient ``bias_scale_i · Σ_t ĝ_it``.
    """

    layer: nn.Module
    sq_norm: Tensor
    """float64 ``(B,)``: the layer's share of each example's squared gradient norm."""
    bad: Tensor | None
    """bool ``(B,)``: examples whose book-kept tensors hold a NaN or an infinity; ``None``
    when a non-finite tensor always shows as a non-finite ``sq_norm`` (dense layers)."""
    weight_scale: Tensor
    bias_scale: Tensor
    a: Tensor | None = None
    """Inputs ``(B, T, d)`` for the product ``(c ⊙ g)ᵀ a``; ``None`` if not needed."""
    g: Tensor | None = None
    weight_per_example: Tensor | None = None
    bias_per_example: Tensor | None = None
    dense: bool = False
    """A dense layer on one vector per example: ``a (B, d)``, ``g (B, p)`` as book-kept, not
    normalised (:func:`_prepare_dense`)."""


def _trainable(layer: nn.Module, name: str) -> bool:
    p = getattr(layer, name, None)
    return isinstance(p, Tensor) and p.requires_grad


def _prepare(tape: _Tape) -> _LayerGrad:
    layer = tape.layer
    if len(tape.saved) != 1:
        # A layer applied twice has per-example gradient g¹ᵀa¹ + g²ᵀa²: the norm of the sum
        # is not the sum of the norms. No model of the zoo shares a layer; refuse, loudly.
        raise RuntimeError(
            "Book-keeping clipping does not support a layer used twice (or not at all)."
        )
    a_raw, g_raw = tape.saved[0]
    if isinstance(layer, nn.Linear) and a_raw.numel() == a_raw.shape[0] * a_raw.shape[-1]:
        return _prepare_dense(layer, a_raw, g_raw)
    a_raw, a_scale, a_ok = _normalise(a_raw)
    g_raw, g_scale, g_ok = _normalise(g_raw)
    ok = a_ok & g_ok
    sq_scale = (a_scale * g_scale).square()
    item = _LayerGrad(
        layer,
        sq_norm=a_scale.new_zeros(a_scale.shape),
        bad=~ok,
        weight_scale=a_scale * g_scale,
        bias_scale=g_scale,
    )
    if isinstance(layer, nn.GroupNorm):  # per-example gradients are (B, C): materialise
        dims = tuple(range(2, g_raw.dim()))
        if _trainable(layer, "weight"):
            w = (a_raw * g_raw).sum(dims) if dims else a_raw * g_raw
            item.weight_per_example = w
            item.sq_norm = item.sq_norm + w.square().sum(1).to(torch.float64) * sq_scale
        if _trainable(layer, "bias"):
            item.bias_per_example = g_raw.sum(dims) if dims else g_raw
    else:
        if isinstance(layer, nn.Linear):
            a, g = _as_sequence(a_raw), _as_sequence(g_raw)
        else:
            assert isinstance(layer, (nn.Conv1d, nn.Conv2d))
            # patches (B, d, T) → (B, T, d); output gradient (B, C_out, *spatial) → (B, T, C_out)
            a = _unfold(layer, a_raw).transpose(1, 2)
            g = g_raw.reshape(g_raw.shape[0], g_raw.shape[1], -1).transpose(1, 2)
        if _trainable(layer, "weight"):
            sq, item.weight_per_example = _gram_or_materialise(a, g)
            item.sq_norm = item.sq_norm + sq.to(torch.float64) * sq_scale
            if item.weight_per_example is None:
                item.a, item.g = a, g
        if _trainable(layer, "bias"):
            item.bias_per_example = g.sum(1)
    if item.bias_per_example is not None:
        b_sq = item.bias_per_example.square().sum(1).to(torch.float64)
        item.sq_norm = item.sq_norm + b_sq * g_scale.square()
    return item


def _prepare_dense(layer: nn.Linear, a_raw: Tensor, g_raw: Tensor) -> _LayerGrad:
    """A dense layer on one vector per example (the MLPs' case): ``‖g_i a_iᵀ‖ = ‖a_i‖·‖g_i‖``,
    both norms computed in float64 from the tensors as they are (no normalised copies: every
    term ``c_i g_ij a_ik`` of the clipped sum is at most ``c_i ‖g_i‖ ‖a_i‖ ≤ C``). An example
    with a NaN or an infinity has a non-finite norm; :func:`_write_clipped_sum` zeroes it."""
    a = a_raw.reshape(a_raw.shape[0], -1)
    g = g_raw.reshape(g_raw.shape[0], -1)
    norm_g = torch.linalg.vector_norm(g, dim=1, dtype=torch.float64)
    sq = norm_g.square() if _trainable(layer, "bias") else None
    if _trainable(layer, "weight"):
        norm_a = torch.linalg.vector_norm(a, dim=1, dtype=torch.float64)
        weight_sq = (norm_a * norm_g).square()
        sq = weight_sq if sq is None else sq.add_(weight_sq)
    assert sq is not None  # the layer has a trainable parameter (BookKeeper.attach)
    # No separate flag: a NaN or ∞ in a or g makes this sum NaN or ∞ (∞·0 is NaN; the
    # float64 norms of float32 rows cannot overflow), and clipped_backward gives every
    # example with a non-finite norm factor 0.
    return _LayerGrad(layer, sq, None, _UNUSED, _UNUSED, a=a, g=g, dense=True)


_UNUSED = torch.ones(())
"""The scales of a dense item, which its clipped sum does not read (:func:`_write_dense`)."""


def _write_dense(item: _LayerGrad, factors: Tensor) -> None:
    layer = item.layer
    assert isinstance(layer, nn.Linear) and item.a is not None and item.g is not None
    # c_i = 0 for a non-finite example: its NaN products and ∞ inputs are zeroed, the rest of
    # its row is multiplied by 0. Same operations for every batch.
    scaled = item.g * factors.to(item.g.dtype).view(-1, 1)
    torch.nan_to_num_(scaled, nan=0.0, posinf=0.0, neginf=0.0)
    if _trainable(layer, "weight"):
        a = torch.nan_to_num(item.a, nan=0.0, posinf=0.0, neginf=0.0)
        _accumulate(layer.weight, scaled.t() @ a)
    if _trainable(layer, "bias"):
        assert layer.bias is not None
        _accumulate(layer.bias, scaled.sum(0))


def _multiplier(factors: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``min(c_i · scale_i, cap)`` in the parameters' dtype (computed in float64)."""
    return (factors * scale).clamp(max=_MAX_FACTOR).to(dtype)


def _write_clipped_sum(item: _LayerGrad, factors: Tensor) -> None:
    if item.dense:
        _write_dense(item, factors)
        return
    layer = item.layer
    if _trainable(layer, "weight"):
        weight = layer.weight
        assert isinstance(weight, Tensor)
        mult = _multiplier(factors, item.weight_scale, weight.dtype)
        if item.weight_per_example is not None:
            w_sum = torch.einsum("b,b...->...", mult, item.weight_per_example)
        else:  # (c ⊙ g)ᵀ a summed over examples and positions: one matrix product
            assert item.a is not None and item.g is not None
            scaled = item.g * mult.view(-1, 1, 1)
            w_sum = scaled.flatten(0, 1).t() @ item.a.flatten(0, 1)
        _accumulate(weight, w_sum.reshape(weight.shape))
    if item.bias_per_example is not None:
        bias = layer.bias
        assert isinstance(bias, Tensor)
        mult = _multiplier(factors, item.bias_scale, bias.dtype)
        _accumulate(bias, (mult @ item.bias_per_example).reshape(bias.shape))


def _accumulate(param: Tensor, value: Tensor) -> None:
    if param.grad is None:
        param.grad = value.detach().to(param.dtype).contiguous()
    else:
        param.grad.add_(value)


class BookKeeper:
    """Swaps a network's parametrised layers for book-keeping versions while active.

    Use :meth:`attach` as a context manager around the training loop; call
    :meth:`clipped_backward` instead of ``loss.backward()``.
    """

    def __init__(self, net: nn.Module) -> None:
        if not supports(net):
            raise ValueError("The network has a parametrised layer book-keeping cannot clip.")
        self.net = net
        self._tapes: list[_Tape] = []

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
            yield self
        finally:
            for module in patched:
                del module.forward  # the instance attribute; the class method shows again
            self._tapes.clear()

    def clipped_backward(self, loss: Tensor, max_grad_norm: float) -> Tensor:
        """Backward of ``loss`` (a **sum** over the batch), then ``p.grad = Σ_i c_i ∇ℓ_i``.

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
            tape.saved.clear()
        loss.backward()  # type: ignore[no-untyped-call]
        items = [_prepare(tape) for tape in self._tapes]
        batch = torch.zeros((), dtype=torch.float64, device=loss.device)
        sq_norms = sum((item.sq_norm for item in items), batch)
        norms = sq_norms.sqrt()
        bad = ~torch.isfinite(norms)
        for item in items:
            if item.bad is not None:
                bad = bad | item.bad
        factors = (max_grad_norm / (norms + _CLIP_EPS)).clamp(max=1.0)
        factors = torch.where(bad, torch.zeros_like(factors), factors)
        norms = torch.where(bad, torch.full_like(norms, math.inf), norms)
        for item in items:
            _write_clipped_sum(item, factors)
        for tape in self._tapes:
            tape.saved.clear()
        return norms

    def zero_batch(self) -> None:
        """An empty Poisson sample: the clipped sum is zero (the optimiser still adds noise)."""
        for p in self.net.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
