"""Tensor serde for the wire: state dicts to bytes and back, chunking, and update checks.

Tensors travel as safetensors buffers: a JSON header plus raw little-endian data, which
cannot carry code (unlike pickle, which ``torch.save`` uses), so a malicious peer can at most
send wrong numbers, and :func:`check_update` catches wrong names, shapes, dtypes and
non-finite values before an update is aggregated. A single NaN or inf from one site would
otherwise poison the average of every site.

This module knows nothing of gRPC: the transport cuts the bytes into messages with
:func:`iter_chunks` so that no message comes near gRPC's 4 MiB default limit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

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


def check_update(update: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> None:
    """Check that ``update`` has exactly the tensors of ``reference`` and only finite values.

    Names, shapes and dtypes must match ``reference`` (the global model's state) one for
    one. Checking runs to completion before anything is used: an update is accepted whole
    or not at all.

    Raises:
        InvalidUpdateError: naming the first offending tensor.
    """
    missing = sorted(set(reference) - set(update))
    if missing:
        raise InvalidUpdateError(
            f"the update lacks tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "."
        )
    unexpected = sorted(set(update) - set(reference))
    if unexpected:
        raise InvalidUpdateError(
            f"the update has unexpected tensor {unexpected[0]!r}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + "."
        )
    for name, ref in reference.items():
        got = update[name]
        if not isinstance(got, Tensor):
            raise InvalidUpdateError(f"update entry {name!r} is not a tensor.")
        if tuple(got.shape) != tuple(ref.shape):
            raise InvalidUpdateError(
                f"tensor {name!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}."
            )
        if got.dtype != ref.dtype:
            raise InvalidUpdateError(
                f"tensor {name!r} has dtype {got.dtype}, expected {ref.dtype}."
            )
        if (got.is_floating_point() or got.is_complex()) and not all(
            bool(torch.isfinite(part).all()) for part in flat_parts(got)
        ):
            raise InvalidUpdateError(f"tensor {name!r} holds NaN or infinite values.")


FLAT_PART = 1 << 18
"""Elements per piece when a whole-model computation is done piece by piece (2 MiB of float64):
the orchestrator's temporaries stay this size instead of a multiple of the largest tensor."""


def flat_parts(tensor: Tensor, size: int = FLAT_PART) -> Iterator[Tensor]:
    """Consecutive pieces of at most ``size`` elements of ``tensor`` seen as one flat vector
    (views of it, when it is contiguous)."""
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), size):
        yield flat[start : start + size]


def l2_norm(state: Mapping[str, Tensor]) -> float:
    """Global L2 norm over every value of every tensor (as if all were one flat vector).

    Accumulates in float64, so the norm of a large float32 update is not rounded away.
    """
    total = 0.0
    for tensor in state.values():
        for part in flat_parts(tensor):
            p64 = part.to(torch.float64)
            total += float(torch.dot(p64, p64))
    return math.sqrt(total)
