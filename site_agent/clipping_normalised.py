"""Book-keeping clipping for the layers other than a dense layer on vectors: convolutions,
dense layers on sequences and GroupNorm's affine (:mod:`site_agent.clipping`).

Their per-example squared norms come from each example's max-normalised inputs and output
gradients (entries in ``[-1, 1]``, the scales in float64, so no square overflows float32
whatever a record holds): the ghost norm from two Gram matrices or the norm of the
materialised per-example gradient, whichever costs fewer operations (Bu et al., ICML 2023,
§3). An example whose tensors hold a NaN or an infinity is flagged; its rows are zeroed, and
the caller gives it factor 0. :func:`write_clipped_sum` then writes ``Σ_i c_i ∇_i`` for a
layer's trainable parameters, undoing the normalisation with float64 multipliers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
class LayerGrad:
    """One layer's book-kept tensors, prepared for norms and the clipped sum.

    Only trainable parameters count: a frozen weight contributes neither to the norm nor to
    the sum (as in Opacus, which clips the gradients of trainable parameters only).

    Tensors are max-normalised per example: the layer's true per-example weight gradient is
    ``weight_scale_i · (ĝ_iᵀ â_i)`` and its bias gradient ``bias_scale_i · Σ_t ĝ_it``.
    """

    layer: nn.Module
    sq_norm: Tensor
    """float64 ``(B,)``: the layer's share of each example's squared gradient norm."""
    bad: Tensor
    """bool ``(B,)``: examples whose book-kept tensors hold a NaN or an infinity."""
    weight_scale: Tensor
    bias_scale: Tensor
    a: Tensor | None = None
    """Inputs ``(B, T, d)`` for the product ``(c ⊙ g)ᵀ a``; ``None`` if not needed."""
    g: Tensor | None = None
    weight_per_example: Tensor | None = None
    bias_per_example: Tensor | None = None


def trainable(layer: nn.Module, name: str) -> bool:
    p = getattr(layer, name, None)
    return isinstance(p, Tensor) and p.requires_grad


def prepare(layer: nn.Module, a_raw: Tensor, g_raw: Tensor) -> LayerGrad:
    """A layer's book-kept input ``a_raw`` and output gradient ``g_raw``: max-normalised
    tensors, squared norms and flags."""
    a_raw, a_scale, a_ok = _normalise(a_raw)
    g_raw, g_scale, g_ok = _normalise(g_raw)
    ok = a_ok & g_ok
    sq_scale = (a_scale * g_scale).square()
    item = LayerGrad(
        layer,
        sq_norm=a_scale.new_zeros(a_scale.shape),
        bad=~ok,
        weight_scale=a_scale * g_scale,
        bias_scale=g_scale,
    )
    if isinstance(layer, nn.GroupNorm):  # per-example gradients are (B, C): materialise
        dims = tuple(range(2, g_raw.dim()))
        if trainable(layer, "weight"):
            w = (a_raw * g_raw).sum(dims) if dims else a_raw * g_raw
            item.weight_per_example = w
            item.sq_norm = item.sq_norm + w.square().sum(1).to(torch.float64) * sq_scale
        if trainable(layer, "bias"):
            item.bias_per_example = g_raw.sum(dims) if dims else g_raw
    else:
        if isinstance(layer, nn.Linear):
            a, g = _as_sequence(a_raw), _as_sequence(g_raw)
        else:
            assert isinstance(layer, (nn.Conv1d, nn.Conv2d))
            # patches (B, d, T) → (B, T, d); output gradient (B, C_out, *spatial) → (B, T, C_out)
            a = _unfold(layer, a_raw).transpose(1, 2)
            g = g_raw.reshape(g_raw.shape[0], g_raw.shape[1], -1).transpose(1, 2)
        if trainable(layer, "weight"):
            sq, item.weight_per_example = _gram_or_materialise(a, g)
            item.sq_norm = item.sq_norm + sq.to(torch.float64) * sq_scale
            if item.weight_per_example is None:
                item.a, item.g = a, g
        if trainable(layer, "bias"):
            item.bias_per_example = g.sum(1)
    if item.bias_per_example is not None:
        b_sq = item.bias_per_example.square().sum(1).to(torch.float64)
        item.sq_norm = item.sq_norm + b_sq * g_scale.square()
    return item


Out = dict[int, Tensor]
"""Where each parameter's clipped sum is written, by the parameter's ``id``: a view of the
keeper's gradient buffer (:class:`BookKeeper`); a parameter not in it gets a new tensor,
added to ``p.grad``."""


def _multiplier(factors: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``min(c_i · scale_i, cap)`` in the parameters' dtype (computed in float64)."""
    return (factors * scale).clamp(max=_MAX_FACTOR).to(dtype)


def write_clipped_sum(item: LayerGrad, factors: Tensor, out: Out) -> None:
    """Write the layer's clipped sums (``factors`` float64)."""
    layer = item.layer
    if trainable(layer, "weight"):
        weight = layer.weight
        assert isinstance(weight, Tensor)
        mult = _multiplier(factors, item.weight_scale, weight.dtype)
        if item.weight_per_example is not None:
            w_sum = torch.einsum("b,b...->...", mult, item.weight_per_example)
        else:  # (c ⊙ g)ᵀ a summed over examples and positions: one matrix product
            assert item.a is not None and item.g is not None
            scaled = item.g * mult.view(-1, 1, 1)
            w_sum = scaled.flatten(0, 1).t() @ item.a.flatten(0, 1)
        store(weight, w_sum.reshape(weight.shape), out)
    if item.bias_per_example is not None:
        bias = layer.bias
        assert isinstance(bias, Tensor)
        mult = _multiplier(factors, item.bias_scale, bias.dtype)
        store(bias, (mult @ item.bias_per_example).reshape(bias.shape), out)


def store(param: Tensor, value: Tensor, out: Out) -> None:
    dest = out.get(id(param))
    if dest is None:
        accumulate(param, value)
    else:
        dest.copy_(value)


def accumulate(param: Tensor, value: Tensor) -> None:
    if param.grad is None:
        param.grad = value.detach().to(param.dtype).contiguous()
    else:
        param.grad.add_(value)
