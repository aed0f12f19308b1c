"""Uploads wait for their fold in an anonymous spool file, read back a piece at a time."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from common.errors import InvalidSpecError, InvalidUpdateError, NotFoundError, UnavailableError
from common.rpc.serde import chunk_data
from common.training.tensors import FLAT_PART, SafetensorsPieces, check_update, state_to_bytes
from orchestrator.core.spool import SPOOL_MIN_BYTES, Payload, receive
from orchestrator.training.aggregation import RunningWeightedMean
from orchestrator.training.site_dp import SiteDPRound
from protos.dpfed.v1.dpfed_pb2 import Chunk


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _pieces(data: bytes, size: int = 100_000) -> Iterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


def test_a_large_upload_is_spooled_to_an_anonymous_file_and_read_back_exactly(
    tmp_path: Path,
) -> None:
    data = os.urandom(SPOOL_MIN_BYTES + 12_345)
    payload = receive(_pieces(data), size=len(data), spool_dir=tmp_path / "spool")
    assert payload.spooled and payload.size == len(data)
    assert payload.sha256 == hashlib.sha256(data).hexdigest()
    assert list((tmp_path / "spool").iterdir()) == []  # no name: nothing else can open it
    assert payload.read_at(0, 10) == data[:10]
    assert payload.read_at(len(data) - 7, 7) == data[-7:]
    assert payload.read_at(5, 0) == b""
    assert payload.read_all() == data
    for bad in ((-1, 2), (len(data) - 1, 2), (0, -1)):
        with pytest.raises(ValueError, match="outside"):
            payload.read_at(*bad)
    before = _open_fds()
    payload.close()
    assert _open_fds() == before - 1
    payload.close()  # twice is harmless
    with pytest.raises(NotFoundError, match="released"):
        payload.read_at(0, 1)


def test_a_small_upload_or_no_spool_dir_stays_in_memory(tmp_path: Path) -> None:
    small = b"x" * 1000
    payload = receive(_pieces(small, 300), size=len(small), spool_dir=tmp_path)
    assert not payload.spooled and payload.read_all() == small
    assert payload.sha256 == hashlib.sha256(small).hexdigest()
    big = os.urandom(SPOOL_MIN_BYTES)
    assert not receive(_pieces(big), size=len(big), spool_dir=None).spooled
    assert Payload.from_bytes(small).read_at(10, 3) == b"xxx"


def test_a_stream_that_breaks_leaves_no_file_open(tmp_path: Path) -> None:
    data = os.urandom(SPOOL_MIN_BYTES * 2)
    chunks = [
        Chunk(data=data[i : i + 65536], offset=i, total_size=len(data))
        for i in range(0, len(data), 65536)
    ]
    del chunks[5]  # a gap
    before = _open_fds()
    with pytest.raises(InvalidSpecError, match="arrived after"):
        receive(chunk_data(chunks, expected_size=len(data)), size=len(data), spool_dir=tmp_path)
    with pytest.raises(InvalidSpecError, match="ended after"):
        receive(chunk_data(chunks[:3], expected_size=len(data)), size=len(data), spool_dir=tmp_path)
    assert _open_fds() == before
    assert list(tmp_path.iterdir()) == []


def test_a_spool_that_cannot_be_written_is_unavailable_not_internal(tmp_path: Path) -> None:
    blocker = tmp_path / "spool"
    blocker.write_text("a file where the spool directory should be")
    data = os.urandom(SPOOL_MIN_BYTES)
    with pytest.raises(UnavailableError, match="cannot spool"):
        receive(_pieces(data), size=len(data), spool_dir=blocker)


def _update(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(2 * FLAT_PART + 3, generator=g) * 0.01,
        "b": torch.randn(4, 5, generator=g),
    }


def test_spooled_updates_fold_exactly_as_updates_in_memory(tmp_path: Path) -> None:
    ref = {k: torch.zeros_like(v) for k, v in _update(0).items()}
    deltas = [_update(i) for i in range(3)]
    in_memory, spooled = RunningWeightedMean(ref), RunningWeightedMean(ref)
    clipped_mem = SiteDPRound(1.0, 1.0, 1.0, None, 3)
    clipped_spool = SiteDPRound(1.0, 1.0, 1.0, None, 3)
    for i, d in enumerate(deltas):
        blob = state_to_bytes(d)
        with receive(_pieces(blob), size=len(blob), spool_dir=tmp_path) as payload:
            assert payload.spooled
            pieces = SafetensorsPieces(payload)
            norm = check_update(pieces, ref)
            spooled.add(pieces, 1.0 + i)
            assert clipped_spool.add(pieces, norm) == pytest.approx(clipped_mem.add(d), rel=1e-12)
        in_memory.add(d, 1.0 + i)
    for k, v in in_memory.mean().items():
        assert torch.equal(spooled.mean()[k], v)
    gen = [torch.Generator().manual_seed(5) for _ in range(2)]
    spec_mean = [
        r.finish(_FixedSpec(), generator=g)[0]
        for r, g in zip((clipped_mem, clipped_spool), gen, strict=True)
    ]
    for k in ref:
        assert torch.equal(spec_mean[0][k], spec_mean[1][k])


class _FixedSpec:
    adaptive = False


def test_a_truncated_spooled_update_is_an_invalid_update(tmp_path: Path) -> None:
    blob = state_to_bytes(_update(1))
    cut = blob[: len(blob) - 4]
    with receive(_pieces(cut), size=len(cut), spool_dir=tmp_path) as payload:
        with pytest.raises(InvalidUpdateError, match="not a valid safetensors"):
            SafetensorsPieces(payload)
