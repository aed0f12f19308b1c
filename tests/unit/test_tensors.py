"""Tensor serde round-trips exactly, and check_update rejects every kind of bad update."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from common.errors import InvalidUpdateError
from common.tensors import (
    DEFAULT_CHUNK_SIZE,
    check_update,
    iter_chunks,
    l2_norm,
    state_from_bytes,
    state_to_bytes,
)


def _reference() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc0.weight": torch.randn(4, 3, generator=g),
        "fc0.bias": torch.randn(4, generator=g),
        "logits.weight": torch.randn(2, 4, generator=g, dtype=torch.float64),
        "step": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 5),
    }


def test_round_trip_is_exact_for_every_dtype_and_shape() -> None:
    state = _reference()
    back = state_from_bytes(state_to_bytes(state))
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype
        assert back[k].shape == v.shape
        assert torch.equal(back[k], v)


def test_views_non_contiguous_and_shared_tensors_serialise() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"a": base, "a_t": base.t(), "row": base[1], "col": base[:, 2]}
    back = state_from_bytes(state_to_bytes(state))
    for k, v in state.items():
        assert torch.equal(back[k], v)


def test_garbage_bytes_are_an_invalid_update() -> None:
    with pytest.raises(InvalidUpdateError, match="not a valid safetensors buffer"):
        state_from_bytes(b"\x00\x01garbage")
    blob = state_to_bytes(_reference())
    with pytest.raises(InvalidUpdateError):
        state_from_bytes(blob[: len(blob) // 2])


def test_chunks_cover_the_data_in_order() -> None:
    data = bytes(range(256)) * 41
    chunks = list(iter_chunks(data, 1000))
    assert b"".join(chunks) == data
    assert all(len(c) == 1000 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 1000
    assert list(iter_chunks(b"")) == [b""]
    assert DEFAULT_CHUNK_SIZE < 4 * 1024 * 1024
    with pytest.raises(ValueError, match="chunk_size"):
        list(iter_chunks(data, 0))


@given(st.binary(max_size=5000), st.integers(min_value=1, max_value=700))
def test_chunking_property(data: bytes, size: int) -> None:
    chunks = list(iter_chunks(data, size))
    assert b"".join(chunks) == data
    assert all(1 <= len(c) <= size for c in chunks) or data == b""
    assert len(chunks) == max(1, math.ceil(len(data) / size))


def test_a_matching_update_passes() -> None:
    ref = _reference()
    check_update({k: torch.zeros_like(v) for k, v in ref.items()}, ref)
    check_update(state_from_bytes(state_to_bytes(ref)), ref)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda u: u.pop("fc0.bias"), r"lacks tensor 'fc0.bias'"),
        (lambda u: u.update({"extra": torch.zeros(1)}), r"unexpected tensor 'extra'"),
        (lambda u: u.update({"fc0.weight": torch.zeros(3, 4)}), r"'fc0.weight' has shape"),
        (
            lambda u: u.update({"fc0.bias": torch.zeros(4, dtype=torch.float64)}),
            r"'fc0.bias' has dtype torch.float64",
        ),
        (
            lambda u: u["logits.weight"].__setitem__((1, 2), float("nan")),
            r"'logits.weight' holds NaN or infinite",
        ),
        (
            lambda u: u["fc0.bias"].__setitem__(0, float("inf")),
            r"'fc0.bias' holds NaN or infinite",
        ),
        (
            lambda u: u["fc0.weight"].__setitem__((0, 0), float("-inf")),
            r"'fc0.weight' holds NaN or infinite",
        ),
        (lambda u: u.update({"step": 3}), r"'step' is not a tensor"),
    ],
)
def test_each_kind_of_bad_update_is_rejected_by_name(mutate: object, message: str) -> None:
    ref = _reference()
    update: dict[str, torch.Tensor] = {k: v.clone() for k, v in ref.items()}
    mutate(update)  # type: ignore[operator]
    with pytest.raises(InvalidUpdateError, match=message):
        check_update(update, ref)


def test_l2_norm_is_the_norm_of_the_flattened_state() -> None:
    ref = _reference()
    flat = torch.cat([v.reshape(-1).to(torch.float64) for v in ref.values()])
    assert l2_norm(ref) == pytest.approx(float(flat.norm()), rel=1e-12)
    assert l2_norm({}) == 0.0
    assert l2_norm({"a": torch.tensor([3.0, 4.0])}) == pytest.approx(5.0)
