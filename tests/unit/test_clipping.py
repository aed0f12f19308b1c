"""Book-keeping clipping computes Opacus' clipped sum, checked against torch.func."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from common.dp import noise
from common.training.models import build_model
from site_agent.clipping import BookKeeper, supports
from tests.unit.test_trainer import SPECS


def _reference(
    net: nn.Module, x: Tensor, y: Tensor, clip: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example gradients from torch.func (independent of hooks), clipped as Opacus does."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(net, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0), reduction="sum")

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_example.values()))
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return norms, {k: torch.einsum("b,b...->...", factors, g) for k, g in per_example.items()}


def _bookkept(net: nn.Module, x: Tensor, y: Tensor, clip: float) -> Tensor:
    keeper = BookKeeper(net)
    with keeper.attach():
        out = net(x)
        return keeper.clipped_backward(
            nn.functional.cross_entropy(out, y, reduction="sum"), clip
        ).detach()


def _check(net: nn.Module, x: Tensor, y: Tensor, clip: float) -> None:
    ref_norms, ref_sum = _reference(net, x, y, clip)
    norms = _bookkept(net, x, y, clip)
    torch.testing.assert_close(norms, ref_norms.to(norms.dtype), rtol=1e-4, atol=1e-6)
    assert bool((ref_norms > clip).any()), "the test must make clipping bite"
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_sum[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_norms_and_clipped_sum_match_per_example_gradients(kind: str) -> None:
    spec = SPECS[kind]
    net = build_model(spec, seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, spec.input_dim, generator=g) * 3
    y = torch.randint(0, spec.num_classes, (9,), generator=g)
    _check(net, x, y, clip=0.5)


@pytest.mark.parametrize("materialise", [False, True])
def test_both_norm_paths_for_sequences_and_convs(materialise: bool) -> None:
    # Ghost norm when T² <= p·d, materialised per-example gradients otherwise.
    width = 2 if materialise else 16
    net = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(2, width, kernel_size=3, stride=2, padding=1, dilation=1),
            act=nn.Tanh(),
            conv2=nn.Conv2d(width, 4, kernel_size=3, padding=2, dilation=2),
            norm=nn.GroupNorm(2, 4),
            flat=nn.Flatten(2),  # (B, 4, T): a sequence for the next dense layer
            fc=nn.Linear(16, width),
            pool=nn.Flatten(1),
            logits=nn.Linear(4 * width, 3),
        )
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 8, 8, generator=g) * 2
    y = torch.randint(0, 3, (5,), generator=g)
    _check(net, x, y, clip=0.3)


def test_conv1d_with_stride() -> None:
    net = nn.Sequential(
        nn.Conv1d(3, 5, kernel_size=4, stride=3, padding=2), nn.ReLU(), nn.Flatten(1)
    )
    net.append(nn.Linear(5 * 6, 4))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 16, generator=g) * 3
    y = torch.randint(0, 4, (6,), generator=g)
    _check(net, x, y, clip=0.2)


def test_attach_restores_the_layers_and_frozen_parameters_stay_untouched() -> None:
    net = build_model(SPECS["mlp"], seed=0)
    net[0].weight.requires_grad_(False)
    with BookKeeper(net).attach() as keeper:
        assert "forward" in vars(net[-1])
        keeper.clipped_backward(
            nn.functional.cross_entropy(net(torch.randn(4, 64)), torch.arange(4), reduction="sum"),
            1.0,
        )
    assert all("forward" not in vars(m) for m in net.modules())
    assert net[0].weight.grad is None and net[0].bias.grad is not None


def test_unsupported_networks_are_refused() -> None:
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert not supports(bn)
    with pytest.raises(ValueError, match="cannot clip"):
        BookKeeper(bn)
    assert not supports(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))
    assert supports(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.1)))


def test_a_layer_used_twice_is_refused() -> None:
    layer = nn.Linear(4, 4)
    net = nn.Sequential(layer, nn.Tanh(), layer)
    with BookKeeper(net).attach() as keeper:
        loss = net(torch.randn(3, 4)).square().sum()
        with pytest.raises(RuntimeError, match="used twice"):
            keeper.clipped_backward(loss, 1.0)


def test_clipped_backward_outside_attach_is_an_error() -> None:
    net = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(RuntimeError, match="attach"):
        BookKeeper(net).clipped_backward(net(torch.randn(2, 4)).sum(), 1.0)


def _clipped_and_noised(
    net: nn.Module, x: Tensor, y: Tensor, *, std: float, seed: int, expected: float
) -> tuple[list[Tensor], list[Tensor]]:
    """The clipped sums, then the gradients after add_noise (copies)."""
    with BookKeeper(net).attach() as keeper:
        keeper.clipped_backward(nn.functional.cross_entropy(net(x), y, reduction="sum"), 0.5)
        summed = [p.grad.clone() for p in net.parameters() if p.grad is not None]
        gen = torch.Generator().manual_seed(seed)
        keeper.add_noise(std=std, generator=gen, expected_batch_size=expected)
        return summed, [p.grad.clone() for p in net.parameters() if p.grad is not None]


def test_add_noise_draws_once_for_every_parameter_and_divides_by_the_batch_size() -> None:
    net = build_model(SPECS["mlp"], seed=1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 64, generator=g), torch.randint(0, 10, (7,), generator=g)
    summed, noised = _clipped_and_noised(net, x, y, std=0.0, seed=0, expected=3.5)
    for s, n in zip(summed, noised, strict=True):
        torch.testing.assert_close(n, s / 3.5, rtol=0, atol=0)
    for p in net.parameters():
        p.grad = None
    summed, noised = _clipped_and_noised(net, x, y, std=2.0, seed=5, expected=3.5)
    # One draw of N(0, std²) for all parameters, in parameter order, from the generator given.
    drawn = noise.gaussian_torch(
        2.0, (sum(p.numel() for p in net.parameters()),), generator=torch.Generator().manual_seed(5)
    )
    got = torch.cat([(n * 3.5 - s).flatten() for s, n in zip(summed, noised, strict=True)])
    torch.testing.assert_close(got, drawn, rtol=1e-5, atol=1e-5)


def test_add_noise_needs_one_clipped_sum_per_call() -> None:
    net = build_model(SPECS["linear"], seed=0)
    x, y = torch.randn(3, 64), torch.arange(3)
    with BookKeeper(net).attach() as keeper:
        with pytest.raises(RuntimeError, match="clipped sum first"):
            keeper.add_noise(std=1.0, generator=torch.Generator(), expected_batch_size=3.0)
        keeper.clipped_backward(nn.functional.cross_entropy(net(x), y, reduction="sum"), 1.0)
        with pytest.raises(ValueError, match="expected_batch_size"):
            keeper.add_noise(std=1.0, generator=torch.Generator(), expected_batch_size=0.0)
        keeper.add_noise(std=1.0, generator=torch.Generator(), expected_batch_size=3.0)
        with pytest.raises(RuntimeError, match="clipped sum first"):
            keeper.add_noise(std=1.0, generator=torch.Generator(), expected_batch_size=3.0)
        for p in net.parameters():
            p.grad = None
        keeper.zero_batch()  # an empty Poisson sample: noise only
        keeper.add_noise(std=0.0, generator=torch.Generator(), expected_batch_size=3.0)
        assert all(not bool(p.grad.any()) for p in net.parameters() if p.grad is not None)


def test_gradients_not_cleared_accumulate() -> None:
    net = build_model(SPECS["mlp"], seed=2)
    x, y = torch.randn(5, 64) * 3, torch.randint(0, 10, (5,))
    with BookKeeper(net).attach() as keeper:
        loss = nn.functional.cross_entropy
        keeper.clipped_backward(loss(net(x), y, reduction="sum"), 0.5)
        once = [p.grad.clone() for p in net.parameters() if p.grad is not None]
        keeper.clipped_backward(loss(net(x), y, reduction="sum"), 0.5)  # no zero_grad
        twice = [p.grad for p in net.parameters() if p.grad is not None]
    for a, b in zip(once, twice, strict=True):
        torch.testing.assert_close(b, 2 * a)


def test_parameters_of_different_dtypes_are_noised_one_by_one() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2).double())
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    with BookKeeper(net).attach() as keeper:
        out = net[2](net[1](net[0](x)).double())
        keeper.clipped_backward(nn.functional.cross_entropy(out, y, reduction="sum"), 1.0)
        keeper.add_noise(std=1.0, generator=torch.Generator(), expected_batch_size=6.0)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert [g.dtype for g in grads] == [torch.float32] * 2 + [torch.float64] * 2
    assert all(bool(torch.isfinite(g).all()) for g in grads)
