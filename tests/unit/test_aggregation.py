"""``orchestrator.training.aggregation``: the streaming FedAvg is Flower's weighted mean, one update at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate, aggregate_median, aggregate_trimmed_avg
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidUpdateError
from orchestrator.training.aggregation import (
    FedAvgRound,
    RunningWeightedMean,
    apply_delta,
    capped_weights,
    coordinate_aggregate,
    share_denominator,
)

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
    sizes: list[float] = [int(n) for n in rng.integers(50, 50_000, size=int(rng.integers(2, 7)))]
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
    """The fold works piece by piece (common.training.tensors.flat_parts): across piece boundaries,
    and for non-contiguous tensors, it equals the float64 computation on whole tensors."""
    from common.training.tensors import FLAT_PART, l2_norm

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
        expected = torch.stack(
            [d[k].double() * w for d, w in zip(deltas, weights, strict=True)]
        ).sum(0) / sum(weights)
        assert mean[k].dtype == torch.float32 and mean[k].shape == reference[k].shape
        assert torch.allclose(mean[k].double(), expected, rtol=0, atol=1e-6)
    whole = sum(float(v.double().pow(2).sum()) for v in deltas[0].values()) ** 0.5
    assert l2_norm(deltas[0]) == pytest.approx(whole, rel=1e-12)


# ------------------------------------------------------------ share caps and robust methods


@settings(max_examples=80, deadline=None)
@given(
    weights=st.lists(st.floats(min_value=1.0, max_value=1e12), min_size=1, max_size=12),
    share=st.floats(min_value=0.01, max_value=1.0),
)
def test_capped_weights_keep_every_share_under_the_cap_and_touch_only_the_largest(
    weights: list[float], share: float
) -> None:
    w = {f"s{i}": v for i, v in enumerate(weights)}
    capped = capped_weights(w, share)
    limit = max(share, 1.0 / len(w))
    total = sum(capped.values())
    assert max(capped.values()) <= limit * total * (1 + 1e-9)
    assert all(0 < capped[k] <= w[k] for k in w)
    changed = [k for k in w if capped[k] < w[k]]
    # Water-filling: the lowered sites share one level, at least as large as every untouched one.
    if changed:
        level = capped[changed[0]]
        assert all(capped[k] == pytest.approx(level) for k in changed)
        assert all(w[k] <= level * (1 + 1e-9) for k in w if k not in changed)
        if limit < 1.0 and len(changed) < len(w):  # tight: the cap is reached, not undershot
            assert level == pytest.approx(limit * total, rel=1e-9)


def test_a_site_claiming_a_billion_rows_gets_half_the_weight_not_all_of_it() -> None:
    capped = capped_weights({"a": 300, "b": 300, "c": 300, "rogue": 1e9}, 0.5)
    assert capped["rogue"] == pytest.approx(900) and capped["a"] == 300
    assert capped_weights({"a": 300, "b": 100}, 1.0) == {"a": 300, "b": 100}
    assert capped_weights({"only": 5.0}, 0.1) == {"only": 5.0}


def test_share_denominator_gives_the_excess_to_the_current_model() -> None:
    assert share_denominator([1.0, 1.0, 1.0], 0.5) == 3.0
    # Dispatched to 4 with caps, two answered: 900 of 1200 would be 75% > 50%.
    assert share_denominator([900.0, 300.0], 0.5) == 1800.0
    state = {"w": torch.zeros(2)}
    agg = RunningWeightedMean(state)
    agg.add({"w": torch.tensor([1.0, 1.0])}, 900.0)
    agg.add({"w": torch.tensor([-1.0, 1.0])}, 300.0)
    mean = agg.mean(share_denominator([900.0, 300.0], 0.5))
    assert torch.allclose(mean["w"], torch.tensor([600.0 / 1800, 1200.0 / 1800]))
    with pytest.raises(ValueError):
        agg.mean(10.0)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    n=st.integers(min_value=1, max_value=9),
    trim=st.floats(min_value=0.0, max_value=0.49),
)
def test_coordinate_aggregates_match_flowers(seed: int, n: int, trim: float) -> None:
    rng = np.random.default_rng(seed)
    shapes = {"a": (4, 5), "b": (3,), "c": ()}
    deltas = [random_state(rng, shapes) for _ in range(n)]
    keys = list(shapes)
    results = [([d[k].double().numpy() for k in keys], 1) for d in deltas]
    ref = deltas[0]
    med = coordinate_aggregate(deltas, ref, method="median")
    tri = coordinate_aggregate(deltas, ref, method="trimmed_mean", trim=trim)
    for k, want_med, want_tri in zip(
        keys, aggregate_median(results), aggregate_trimmed_avg(results, trim), strict=True
    ):
        np.testing.assert_allclose(med[k].numpy(), want_med, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(tri[k].numpy(), want_tri, rtol=1e-5, atol=1e-5)


def test_coordinate_aggregates_read_spooled_updates_piece_by_piece() -> None:
    from common.training.tensors import FLAT_PART, SafetensorsPieces, state_to_bytes
    from orchestrator.core.spool import Payload

    rng = np.random.default_rng(1)
    shapes = {"big": (FLAT_PART + 7,), "small": (3, 2)}
    deltas = [random_state(rng, shapes) for _ in range(5)]
    deltas[4] = {k: v + 1e8 for k, v in deltas[4].items()}  # one outlier site
    spooled = [SafetensorsPieces(Payload.from_bytes(state_to_bytes(d))) for d in deltas]
    out = coordinate_aggregate(spooled, deltas[0], method="trimmed_mean", trim=0.2)
    honest = torch.stack([d["big"] for d in deltas[:4]]).sort(dim=0).values
    # ⌊0.2·5⌋ = 1 value cut at each end: the outlier is gone from every coordinate.
    assert float(out["big"].abs().max()) < 100.0
    lo = honest[0:3].double().mean(0).float()
    hi = honest[1:4].double().mean(0).float()
    assert bool(((out["big"] >= lo - 1e-4) & (out["big"] <= hi + 1e-4)).all())


def test_the_aggregation_block_of_a_job_spec() -> None:
    from common.errors import InvalidSpecError
    from common.specs import parse_job_spec

    base = {
        "dataset": "d",
        "model": {"kind": "linear", "input_dim": 3, "num_classes": 2},
        "rounds": 1,
        "batch_size": 4,
        "dp": {"noise_multiplier": 1.0},
    }
    spec = parse_job_spec(base)
    assert spec.aggregation.method == "fedavg" and spec.aggregation.max_site_weight == 0.5
    robust = parse_job_spec({**base, "aggregation": {"method": "trimmed_mean", "trim": 0.25}})
    assert robust.aggregation.trim == 0.25
    for bad, field in [
        ({"method": "mean"}, "aggregation.method"),
        ({"trim": 0.5}, "aggregation.trim"),
        ({"max_site_weight": 0.0}, "aggregation.max_site_weight"),
        ({"weights": "claimed"}, "aggregation.weights"),
    ]:
        with pytest.raises(InvalidSpecError, match=field):
            parse_job_spec({**base, "aggregation": bad})
    site_dp = {"noise_multiplier": 1.0, "clip_norm": 1.0}
    with pytest.raises(InvalidSpecError, match="cannot be combined with site_dp"):
        parse_job_spec({**base, "site_dp": site_dp, "aggregation": {"method": "median"}})


def _round_of(values: dict[str, float], weights: dict[str, float]) -> FedAvgRound:
    r = FedAvgRound({"w": torch.zeros(2)}, weights, 0.5, round=1)
    for sid, v in values.items():
        r.add(sid, {"w": torch.full((2,), v)}, 0.0)
    return r


def test_a_rejected_sites_share_is_spread_over_the_accepted_updates() -> None:
    """A rogue claiming a huge size is capped at dispatch; when its update is rejected the
    round is the weighted mean of the accepted ones (no share left to the current model)."""
    weights = capped_weights({"a": 100.0, "b": 100.0, "c": 100.0, "rogue": 1e9}, 0.5)
    assert weights["rogue"] == pytest.approx(300.0)
    out = _round_of({"a": 1.0, "b": 2.0, "c": 6.0}, weights).finish(["a", "b", "c"])
    assert torch.allclose(out.mean["w"], torch.full((2,), 3.0)) and not out.notes


def test_the_current_model_keeps_a_share_only_when_one_site_would_pass_the_cap() -> None:
    """c did not answer: a (capped at dispatch to half the round) would be 2/3 of what was
    received, so the denominator keeps it at 1/2 and the rest stays with the current model."""
    weights = capped_weights({"a": 300.0, "b": 100.0, "c": 100.0}, 0.5)
    assert weights == {"a": 200.0, "b": 100.0, "c": 100.0}
    out = _round_of({"a": 4.0, "b": 4.0}, weights).finish(["a", "b"])
    assert torch.allclose(out.mean["w"], torch.full((2,), 4.0 * 300.0 / 400.0))
    ((level, note),) = out.notes
    assert level == "warning" and "scaled by 0.75" in note
