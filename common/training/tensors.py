"""Tensor serde for the wire: state dicts to bytes and back, chunking, and update checks.

Tensors travel as safetensors buffers: a JSON header plus raw little-endian data, which
cannot carry code (unlike pickle, which ``torch.save`` uses), so a malicious peer can at most
send wrong numbers, and :func:`check_update` catches wrong names, shapes, dtypes and
non-finite values before an update is aggregated. A single NaN or inf from one site would
otherwise poison the average of every site.

The orchestrator never holds a site's update whole: :class:`SafetensorsPieces` reads one from
wherever its bytes lie (the orchestrator spools uploads to disk, ``orchestrator.core.spool``),
checks the header strictly against the format, and hands out the values in pieces of
:data:`FLAT_PART` elements. :func:`check_update`, :func:`l2_norm` and the aggregation work on
any :class:`Pieces`: a safetensors payload, or a state dict in memory (:class:`StatePieces`).

This module knows nothing of gRPC: the transport cuts the bytes into messages with
:func:`iter_chunks` so that no message comes near gRPC's 4 MiB default limit.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import safetensors.torch
import torch
from torch import Tensor

from common.errors import InvalidUpdateError

DEFAULT_CHUNK_SIZE = 1 << 20
"""1 MiB: well under gRPC's 4 MiB default message limit, leaving room for the envelope."""


def _unshared(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors; copies any that share storage with another.

    safetensors refuses tensors that alias each other's memory (it could not restore the
    aliasing), so an aliased tensor is cloned rather than rejected.
    """
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise TypeError("a state must map tensor names (str) to torch.Tensor values")
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() > 0 and ptr in seen:
            t = t.clone()
        elif t.numel() > 0:
            seen.add(ptr)
        out[name] = t
    return out


def state_to_bytes(state: Mapping[str, Tensor]) -> bytes:
    """Serialise a state dict (name → tensor) to a safetensors buffer."""
    return safetensors.torch.save(_unshared(state))


def state_from_bytes(data: bytes) -> dict[str, Tensor]:
    """Parse a safetensors buffer back into a state dict of CPU tensors.

    Raises:
        InvalidUpdateError: ``data`` is not a well-formed safetensors buffer.
    """
    try:
        return dict(safetensors.torch.load(bytes(data)))
    except Exception as err:  # safetensors raises its own (Rust-side) error types
        raise InvalidUpdateError(
            f"the tensor payload is not a valid safetensors buffer ({type(err).__name__})."
        ) from None


def iter_chunks(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """Cut ``data`` into consecutive pieces of at most ``chunk_size`` bytes.

    Always yields at least one chunk (an empty one for empty ``data``), so a stream built
    from it always carries a first message to hang metadata on.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if not data:
        yield b""
        return
    view = memoryview(data)
    for start in range(0, len(view), chunk_size):
        yield bytes(view[start : start + chunk_size])


FLAT_PART = 1 << 18
"""Elements per piece when a whole-model computation is done piece by piece (2 MiB of float64):
the orchestrator's temporaries stay this size instead of a multiple of the largest tensor."""


def flat_parts(tensor: Tensor, size: int = FLAT_PART) -> Iterator[Tensor]:
    """Consecutive pieces of at most ``size`` elements of ``tensor`` seen as one flat vector
    (views of it, when it is contiguous)."""
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), size):
        yield flat[start : start + size]


class Pieces(Protocol):
    """A state dict seen piece by piece: names, shapes and dtypes up front, then each tensor's
    values as consecutive flat pieces of at most :data:`FLAT_PART` elements, in row-major
    order (the order of ``tensor.reshape(-1)``)."""

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def pieces(self, name: str) -> Iterator[Tensor]: ...


class StatePieces:
    """:class:`Pieces` over a state dict in memory (pieces are views where it is contiguous)."""

    def __init__(self, state: Mapping[str, Tensor]) -> None:
        self._state = state

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._state[name].dtype

    def pieces(self, name: str) -> Iterator[Tensor]:
        return flat_parts(self._state[name])


StateLike = Mapping[str, Tensor] | Pieces


def as_pieces(state: StateLike) -> Pieces:
    return StatePieces(state) if isinstance(state, Mapping) else state


def check_update(update: StateLike, reference: Mapping[str, Tensor]) -> float:
    """Check that ``update`` has exactly the tensors of ``reference`` and only finite values;
    return its global L2 norm (:func:`l2_norm`), computed in the same pass over the values.

    Names, shapes and dtypes must match ``reference`` (the global model's state) one for
    one. Checking runs to completion before anything is used: an update is accepted whole
    or not at all.

    Raises:
        InvalidUpdateError: naming the first offending tensor.
    """
    upd = as_pieces(update)
    names = upd.names()
    for what, odd in (
        ("lacks tensor", sorted(set(reference) - set(names))),
        ("has unexpected tensor", sorted(set(names) - set(reference))),
    ):
        if odd:
            more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
            raise InvalidUpdateError(f"the update {what} {odd[0]!r}{more}.")
    for name, ref in reference.items():
        if isinstance(update, Mapping) and not isinstance(update[name], Tensor):
            raise InvalidUpdateError(f"update entry {name!r} is not a tensor.")
        if upd.shape(name) != tuple(ref.shape):
            raise InvalidUpdateError(
                f"tensor {name!r} has shape {upd.shape(name)}, expected {tuple(ref.shape)}."
            )
        if upd.dtype(name) != ref.dtype:
            raise InvalidUpdateError(
                f"tensor {name!r} has dtype {upd.dtype(name)}, expected {ref.dtype}."
            )
    total = 0.0
    for name in reference:
        floating = upd.dtype(name).is_floating_point or upd.dtype(name).is_complex
        for part in upd.pieces(name):
            if floating and not bool(torch.isfinite(part).all()):
                raise InvalidUpdateError(f"tensor {name!r} holds NaN or infinite values.")
            total += _squares(part)
    return math.sqrt(total)


def _squares(part: Tensor) -> float:
    p64 = part.to(torch.float64)
    return float(torch.dot(p64, p64))


def l2_norm(state: StateLike) -> float:
    """Global L2 norm over every value of every tensor (as if all were one flat vector).

    Accumulates in float64, so the norm of a large float32 update is not rounded away.
    """
    pieces = as_pieces(state)
    return math.sqrt(sum(_squares(part) for name in pieces.names() for part in pieces.pieces(name)))


# ------------------------------------------------------------------ safetensors, piece by piece

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""The safetensors dtype names this reader accepts (the dtypes a model state holds)."""

MAX_HEADER_SIZE = 100_000_000
"""The header size limit of the safetensors format itself (its ``MAX_HEADER_SIZE``)."""


class RandomAccess(Protocol):
    """Bytes that can be read at any offset: an upload in memory or in a spool file."""

    @property
    def size(self) -> int: ...

    def read_at(self, offset: int, size: int) -> bytearray:
        """Exactly ``size`` bytes from ``offset`` (a fresh, writable buffer)."""
        ...


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's values lie in a safetensors payload (absolute byte offsets)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidUpdateError(f"the safetensors header names {key!r} twice.")
        out[key] = value
    return out


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_safetensors_layout(source: RandomAccess) -> dict[str, TensorSpan]:
    """Parse and check a safetensors header without reading the values.

    The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian
    header length N, N bytes of JSON mapping each tensor name to ``dtype``, ``shape`` and
    ``data_offsets`` [begin, end) relative to the end of the header (plus an optional
    ``__metadata__`` map of strings), then the values. As the library's own loader does, this
    requires the tensors to tile the data exactly: no gap, no overlap, nothing after the last.

    Raises:
        InvalidUpdateError: anything else, including a name given twice.
    """
    bad = "the tensor payload is not a valid safetensors buffer"
    if source.size < 8:
        raise InvalidUpdateError(f"{bad} (shorter than its 8-byte header length).")
    n = int.from_bytes(source.read_at(0, 8), "little")
    if n > MAX_HEADER_SIZE or 8 + n > source.size:
        raise InvalidUpdateError(f"{bad} (header length {n} for {source.size} bytes).")
    try:
        header = json.loads(
            bytes(source.read_at(8, n)).decode("utf-8"), object_pairs_hook=_no_duplicate_keys
        )
    except (UnicodeDecodeError, ValueError) as err:
        if isinstance(err, InvalidUpdateError):
            raise
        raise InvalidUpdateError(f"{bad} (its header is not JSON).") from None
    if not isinstance(header, dict):
        raise InvalidUpdateError(f"{bad} (its header is not a JSON object).")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InvalidUpdateError(f"{bad} (__metadata__ is not a map of strings).")
    data_start, data_size = 8 + n, source.size - 8 - n
    spans: dict[str, TensorSpan] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise InvalidUpdateError(f"{bad} (entry {name!r} is malformed).")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        shape, offsets = info["shape"], info["data_offsets"]
        if dtype is None:
            raise InvalidUpdateError(f"tensor {name!r} has unsupported dtype {info['dtype']!r}.")
        if not (isinstance(shape, list) and all(_int(d) and d >= 0 for d in shape)):
            raise InvalidUpdateError(f"{bad} (tensor {name!r} has shape {shape!r}).")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise InvalidUpdateError(f"{bad} (tensor {name!r} has data_offsets {offsets!r}).")
        span = TensorSpan(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
        if span.end - span.begin != span.numel * dtype.itemsize:
            raise InvalidUpdateError(
                f"{bad} (tensor {name!r}: {span.end - span.begin} bytes for shape {span.shape})."
            )
        spans[name] = span
    at = data_start
    for span in sorted(spans.values(), key=lambda s: (s.begin, s.end)):
        if span.begin != at:
            raise InvalidUpdateError(f"{bad} (its tensors leave a gap or overlap).")
        at = span.end
    if at != source.size:
        raise InvalidUpdateError(f"{bad} ({source.size - at} bytes after the last tensor).")
    return spans


class SafetensorsPieces:
    """:class:`Pieces` over a safetensors payload that is never loaded whole.

    The header is checked when this is built (:func:`read_safetensors_layout`); each piece is
    read from ``source`` when it is drawn, into a buffer of its own (at most
    :data:`FLAT_PART` elements).
    """

    def __init__(self, source: RandomAccess) -> None:
        if sys.byteorder != "little":  # safetensors is little-endian; torch.frombuffer is native
            raise RuntimeError("reading safetensors piece by piece needs a little-endian host")
        self._source = source
        self.layout = read_safetensors_layout(source)

    def names(self) -> list[str]:
        return list(self.layout)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.layout[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.layout[name].dtype

    def pieces(self, name: str) -> Iterator[Tensor]:
        span = self.layout[name]
        item = span.dtype.itemsize
        for start in range(0, span.numel, FLAT_PART):
            count = min(FLAT_PART, span.numel - start)
            buf = self._source.read_at(span.begin + start * item, count * item)
            yield torch.frombuffer(buf, dtype=span.dtype, count=count)
