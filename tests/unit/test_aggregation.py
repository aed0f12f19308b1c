"""``orchestrator.aggregation``: the streaming FedAvg is Flower's weighted mean, one update at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidUpdateError
from orchestrator.aggregation import RunningWeightedMean, apply_delta

SHAPES = [(3,), (4, 5), (2, 3, 3, 3), (), (1,), (7, 1)]


def random_state(
    rng: np.random.Generator, shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    return {
        k: torch.from_numpy(rng.normal(0.0, 3.0, size=s).astype(np.float32))
        for k, s in shapes.items()
    }


def flower_mean(
    deltas: list[dict[str, torch.Tensor]], weights: list[float], keys: list[str]
) -> list[np.ndarray]:
    results = [
        ([d[k].double().numpy() for k in keys], w) for d, w in zip(deltas, weights, strict=True)
    ]
    return aggregate(results)  # type: ignore[arg-type]


def running_mean(
    deltas: list[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    agg = RunningWeightedMean(deltas[0])
    for d, w in zip(deltas, weights, strict=True):
        agg.add(d, w)
    assert agg.count == len(deltas)
    assert agg.total_weight == pytest.approx(sum(weights))
    return agg.mean()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    n_keys=st.integers(min_value=1, max_value=len(SHAPES)),
    weights=st.lists(
        st.integers(min_value=1, max_value=100_000)
        | st.floats(min_value=1e-3, max_value=1e5, allow_nan=False),
        min_size=1,
        max_size=8,
    ),
)
def test_matches_flower_weighted_fedavg(seed: int, n_keys: int, weights: list[float]) -> None:
    rng = np.random.default_rng(seed)
    shapes = {f"layer{i}.weight": SHAPES[i] for i in range(n_keys)}
    deltas = [random_state(rng, shapes) for _ in weights]

    ours = running_mean(deltas, weights)
    keys = list(shapes)
    theirs = flower_mean(deltas, weights, keys)

    assert list(ours) == keys
    for k, ref in zip(keys, theirs, strict=True):
        assert ours[k].dtype == torch.float32
        assert tuple(ours[k].shape) == ref.shape
        np.testing.assert_allclose(ours[k].double().numpy(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_matches_flower_with_dataset_sizes_as_weights(seed: int) -> None:
    """The weights the rounds use: each site's number of training examples."""
    rng = np.random.default_rng(seed)
    shapes = {"fc1.weight": (64, 30), "fc1.bias": (64,), "fc2.weight": (2, 64), "fc2.bias": (2,)}
    sizes = [int(n) for n in rng.integers(50, 50_000, size=int(rng.integers(2, 7)))]
    deltas = [random_state(rng, shapes) for _ in sizes]

    ours = running_mean(deltas, sizes)
    theirs = flower_mean(deltas, sizes, list(shapes))
    for k, ref in zip(shapes, theirs, strict=True):
        np.testing.assert_allclose(ours[k].double().numpy(), ref, rtol=1e-6, atol=1e-6)


def test_equal_weights_give_the_plain_mean() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.0)}
    b = {"w": torch.tensor([3.0, -2.0]), "b": torch.tensor(4.0)}
    agg = RunningWeightedMean(a)
    agg.add(a, 5)
    agg.add(b, 5)
    m = agg.mean()
    assert torch.equal(m["w"], torch.tensor([2.0, 0.0]))
    assert torch.equal(m["b"], torch.tensor(2.0))


def test_weights_matter() -> None:
    a = {"w": torch.tensor([0.0])}
    b = {"w": torch.tensor([4.0])}
    agg = RunningWeightedMean(a)
    agg.add(a, 3)
    agg.add(b, 1)
    assert torch.equal(agg.mean()["w"], torch.tensor([1.0]))


def test_reference_values_are_not_counted() -> None:
    """The reference fixes keys and shapes only; the sum starts at zero."""
    ref = {"w": torch.full((3,), 100.0)}
    agg = RunningWeightedMean(ref)
    agg.add({"w": torch.ones(3)}, 2.0)
    assert torch.equal(agg.mean()["w"], torch.ones(3))


def test_inputs_are_not_modified() -> None:
    ref = {"w": torch.tensor([1.0, 2.0])}
    d = {"w": torch.tensor([3.0, 4.0])}
    agg = RunningWeightedMean(ref)
    agg.add(d, 7.0)
    agg.mean()["w"].add_(1000.0)
    assert torch.equal(d["w"], torch.tensor([3.0, 4.0]))
    assert torch.equal(ref["w"], torch.tensor([1.0, 2.0]))
    assert torch.equal(agg.mean()["w"], torch.tensor([3.0, 4.0]))


@pytest.mark.parametrize("weight", [0, 0.0, -1, -1e-9, float("nan")])
def test_rejects_non_positive_weight(weight: float) -> None:
    d = {"w": torch.ones(2)}
    agg = RunningWeightedMean(d)
    with pytest.raises(InvalidUpdateError, match="weight"):
        agg.add(d, weight)
    assert agg.count == 0
    assert agg.total_weight == 0.0


@pytest.mark.parametrize(
    "delta",
    [
        {"w": torch.ones(2)},
        {"w": torch.ones(2), "b": torch.ones(1), "extra": torch.ones(1)},
        {"w": torch.ones(2), "c": torch.ones(1)},
        {},
    ],
    ids=["missing", "extra", "renamed", "empty"],
)
def test_rejects_mismatched_keys(delta: dict[str, torch.Tensor]) -> None:
    agg = RunningWeightedMean({"w": torch.zeros(2), "b": torch.zeros(1)})
    with pytest.raises(InvalidUpdateError, match="do not match"):
        agg.add(delta, 1.0)
    assert agg.count == 0


def test_mean_of_nothing_is_an_error() -> None:
    with pytest.raises(InvalidUpdateError):
        RunningWeightedMean({"w": torch.zeros(1)}).mean()


def test_apply_delta_adds() -> None:
    state = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5])}
    delta = {"w": torch.tensor([[0.5, -2.0], [0.0, 1.0]]), "b": torch.tensor([-0.5])}
    out = apply_delta(state, delta)
    assert torch.equal(out["w"], torch.tensor([[1.5, 0.0], [3.0, 5.0]]))
    assert torch.equal(out["b"], torch.tensor([0.0]))
    assert all(v.dtype == torch.float32 for v in out.values())
    assert torch.equal(state["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # not in place


def test_apply_delta_of_the_mean_is_fedavg() -> None:
    rng = np.random.default_rng(7)
    shapes = {"w": (5, 3), "b": (5,)}
    state = random_state(rng, shapes)
    deltas = [random_state(rng, shapes) for _ in range(3)]
    weights = [10.0, 30.0, 60.0]
    new = apply_delta(state, running_mean(deltas, weights))
    expected = {
        k: state[k].double()
        + sum(w * d[k].double() for d, w in zip(deltas, weights, strict=True)) / 100.0
        for k in shapes
    }
    for k in shapes:
        np.testing.assert_allclose(
            new[k].double().numpy(), expected[k].numpy(), rtol=1e-6, atol=1e-6
        )


def test_piecewise_fold_matches_the_whole_tensor_computation() -> None:
    """The fold works piece by piece (common.tensors.flat_parts): across piece boundaries,
    and for non-contiguous tensors, it equals the float64 computation on whole tensors."""
    from common.tensors import FLAT_PART, l2_norm

    g = torch.Generator().manual_seed(3)
    rows = FLAT_PART // 100 + 7  # more than one piece
    reference = {"w": torch.zeros(100, rows).t(), "b": torch.zeros(5)}  # "w" is transposed
    assert not reference["w"].is_contiguous()
    deltas = [
        {"w": torch.randn(100, rows, generator=g).t(), "b": torch.randn(5, generator=g)}
        for _ in range(3)
    ]
    weights = [3.0, 1.0, 7.5]
    agg = RunningWeightedMean(reference)
    for d, w in zip(deltas, weights, strict=True):
        agg.add(d, w)
    mean = agg.mean()
    for k in reference:
        expected = sum(d[k].double() * w for d, w in zip(deltas, weights, strict=True)) / sum(
            weights
        )
        assert mean[k].dtype == torch.float32 and mean[k].shape == reference[k].shape
        assert torch.allclose(mean[k].double(), expected, rtol=0, atol=1e-6)
    whole = sum(float(v.double().pow(2).sum()) for v in deltas[0].values()) ** 0.5
    assert l2_norm(deltas[0]) == pytest.approx(whole, rel=1e-12)
