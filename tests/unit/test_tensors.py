"""Tensor serde round-trips exactly, and check_update rejects every kind of bad update."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidUpdateError
from common.training.tensors import (
    DEFAULT_CHUNK_SIZE,
    FLAT_PART,
    SafetensorsPieces,
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


# Updates that break the reference's layout or hold non-finite values, each with the message
# that names what is wrong; shared by the whole-state and the piece-by-piece checks.
_BAD_UPDATES: list[tuple[Callable[[dict[str, torch.Tensor]], object], str]] = [
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
]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        *_BAD_UPDATES,
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


# ------------------------------------------------------------------ safetensors, piece by piece


class _Bytes:
    """A RandomAccess over bytes that records the largest read."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.largest_read = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def read_at(self, offset: int, size: int) -> bytearray:
        assert 0 <= offset and offset + size <= len(self.data)
        self.largest_read = max(self.largest_read, size)
        return bytearray(self.data[offset : offset + size])


def _whole(pieces: SafetensorsPieces) -> dict[str, torch.Tensor]:
    return {
        k: torch.cat(
            [p.clone() for p in pieces.pieces(k)] or [torch.zeros(0, dtype=pieces.dtype(k))]
        ).reshape(pieces.shape(k))
        for k in pieces.names()
    }


def test_pieces_read_back_every_dtype_and_shape_exactly() -> None:
    state = {
        **_reference(),
        "half": torch.randn(3, 3).half(),
        "bf": torch.randn(5).bfloat16(),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(7, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
    }
    pieces = SafetensorsPieces(_Bytes(state_to_bytes(state)))
    assert set(pieces.names()) == set(state)
    back = _whole(pieces)
    for k, v in state.items():
        assert pieces.dtype(k) == v.dtype and pieces.shape(k) == tuple(v.shape)
        assert torch.equal(back[k], v), k


def test_pieces_never_read_more_than_one_piece_and_check_like_the_whole_state() -> None:
    g = torch.Generator().manual_seed(1)
    ref = {"w": torch.randn(3 * FLAT_PART + 11, generator=g), "b": torch.randn(9, generator=g)}
    source = _Bytes(state_to_bytes(ref))
    pieces = SafetensorsPieces(source)
    assert [p.numel() for p in pieces.pieces("w")] == [FLAT_PART] * 3 + [11]
    norm = check_update(pieces, ref)
    assert source.largest_read == FLAT_PART * 4  # one piece of float32, never the whole update
    assert norm == pytest.approx(l2_norm(ref), rel=1e-12)
    assert check_update(ref, ref) == pytest.approx(norm, rel=1e-12)
    assert l2_norm(pieces) == pytest.approx(norm, rel=1e-12)


@pytest.mark.parametrize(("mutate", "message"), _BAD_UPDATES)
def test_a_bad_update_read_piece_by_piece_is_rejected_by_name(mutate: object, message: str) -> None:
    ref = _reference()
    update: dict[str, torch.Tensor] = {k: v.clone() for k, v in ref.items()}
    mutate(update)  # type: ignore[operator]
    with pytest.raises(InvalidUpdateError, match=message):
        check_update(SafetensorsPieces(_Bytes(state_to_bytes(update))), ref)


def _raw(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(h) if length is None else length).to_bytes(8, "little") + h + data


_F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x01\x02", "shorter than its 8-byte header length"),
        (_raw({"a": _F32}, bytes(8), length=10**9), "header length"),
        (_raw(b"{not json", bytes(8)), "not JSON"),
        (_raw(b"\xff\xfe", b""), "not JSON"),
        (_raw([1, 2]), "not a JSON object"),
        (
            _raw(
                b'{"a": '
                + json.dumps(_F32).encode()
                + b', "a": '
                + json.dumps(_F32).encode()
                + b"}",
                bytes(8),
            ),
            "names 'a' twice",
        ),
        (_raw({"a": {**_F32, "dtype": "F8_E4M3"}}, bytes(8)), "unsupported dtype"),
        (_raw({"a": {**_F32, "dtype": 4}}, bytes(8)), "unsupported dtype"),
        (_raw({"a": {**_F32, "shape": [-2]}}, bytes(8)), "has shape"),
        (_raw({"a": {**_F32, "shape": [True, 2]}}, bytes(8)), "has shape"),
        (_raw({"a": {**_F32, "shape": "2"}}, bytes(8)), "has shape"),
        (_raw({"a": {**_F32, "data_offsets": [0, 16]}}, bytes(8)), "data_offsets"),
        (_raw({"a": {**_F32, "data_offsets": [8, 0]}}, bytes(8)), "data_offsets"),
        (_raw({"a": {**_F32, "data_offsets": [0]}}, bytes(8)), "data_offsets"),
        (_raw({"a": {**_F32, "data_offsets": [0, 4]}}, bytes(4)), "4 bytes for shape"),
        (_raw({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "entry 'a' is malformed"),
        (_raw({"a": {**_F32, "extra": 1}}, bytes(8)), "entry 'a' is malformed"),
        (_raw({"a": 3}, bytes(8)), "entry 'a' is malformed"),
        (_raw({"a": _F32}, bytes(12)), "4 bytes after the last tensor"),
        (
            _raw({"a": _F32, "b": {**_F32, "data_offsets": [12, 20]}}, bytes(20)),
            "gap or overlap",
        ),
        (
            _raw({"a": _F32, "b": {**_F32, "data_offsets": [4, 12]}}, bytes(12)),
            "gap or overlap",
        ),
        (_raw({"__metadata__": {"k": 1}, "a": _F32}, bytes(8)), "__metadata__"),
    ],
)
def test_malformed_safetensors_headers_are_invalid_updates(blob: bytes, message: str) -> None:
    with pytest.raises(InvalidUpdateError, match=message):
        SafetensorsPieces(_Bytes(blob))


def test_metadata_is_accepted_and_ignored() -> None:
    blob = _raw({"__metadata__": {"format": "pt"}, "a": _F32}, np.float32([1, 2]).tobytes())
    pieces = SafetensorsPieces(_Bytes(blob))
    assert pieces.names() == ["a"] and _whole(pieces)["a"].tolist() == [1.0, 2.0]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_mangled_buffer_is_rejected_or_read_exactly_as_safetensors_reads_it(
    data: st.DataObject,
) -> None:
    """Differential check against the safetensors library: whatever bytes arrive, the reader
    raises InvalidUpdateError and nothing else, and what it accepts the library accepts, with
    the same tensors."""
    blob = bytearray(state_to_bytes({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    blob = blob[:cut] if data.draw(st.booleans()) else blob
    try:
        pieces = SafetensorsPieces(_Bytes(bytes(blob)))
    except InvalidUpdateError:
        return
    theirs = safetensors.torch.load(bytes(blob))
    ours = _whole(pieces)
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape
        assert torch.equal(ours[k].nan_to_num(), v.nan_to_num())
