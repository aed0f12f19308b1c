"""Byte streams on the wire: a blob as ``Chunk`` messages and back, with every offset and size
checked, so that a malformed stream becomes an ``InvalidSpecError`` instead of a wrong blob."""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Iterable, Iterator

from common.errors import InvalidSpecError
from protos.dpfed.v1.dpfed_pb2 import Chunk as ProtoChunk

# 128 KiB. Every chunk in flight is copied at each stage of gRPC's Python path (slice, protobuf
# message, serialization, C-core buffer), once per concurrent transfer: small chunks keep that
# far below the model's size, and under the orchestrator's malloc mmap threshold (256 KiB,
# orchestrator.server), so they are recycled from the heap instead of being mmapped and
# page-faulted each time. On loopback a download moves at ~0.7x the speed of 1 MiB chunks.
CHUNK_SIZE = 128 << 10
MAX_BLOB_SIZE = 4 << 30  # refuse to assemble more than 4 GiB from a stream


# ------------------------------------------------------------------ chunks


def blob_to_chunks(
    data: bytes | Callable[[int, int], bytes],
    total: int | None = None,
    *,
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[ProtoChunk]:
    """Chunk messages of ``data``: bytes, or a function reading ``(offset, size)`` from
    bytes of length ``total`` that lie elsewhere (a file), read one chunk at a time."""
    read: Callable[[int, int], bytes]
    if isinstance(data, bytes):
        view = memoryview(data)
        total = len(data)

        def read(off: int, size: int) -> bytes:
            return bytes(view[off : off + size])

    else:
        if total is None:
            raise ValueError("a reader needs the total size")
        read = data
    if total == 0:
        yield ProtoChunk(data=b"", offset=0, total_size=0)
        return
    for off in range(0, total, chunk_size):
        yield ProtoChunk(data=read(off, min(chunk_size, total - off)), offset=off, total_size=total)


def chunk_data(
    chunks: Iterable[ProtoChunk], *, expected_size: int | None = None
) -> Iterator[bytes]:
    """The data of a chunk stream, piece by piece, checking that offsets are contiguous and that
    the size is what was announced (``expected_size``, else the first chunk's ``total_size``).

    Raises InvalidSpecError at the first chunk that breaks the stream, or at its end when it
    stops short; a consumer that writes the pieces somewhere has therefore seen them all
    only when the iteration ends without error.
    """
    total: int | None = expected_size
    received = 0
    for ch in chunks:
        if total is None:
            total = ch.total_size
        if ch.total_size != total:
            raise InvalidSpecError("chunk stream announces two different total sizes")
        if ch.offset != received:
            raise InvalidSpecError(f"chunk at offset {ch.offset} arrived after {received} bytes")
        data = ch.data
        if total < 0 or total > MAX_BLOB_SIZE or received + len(data) > total:
            raise InvalidSpecError("chunk stream is larger than its announced size")
        received += len(data)
        yield data
        del data
    if total is not None and received != total:
        raise InvalidSpecError(f"chunk stream ended after {received} of {total} bytes")


def blob_from_chunks(chunks: Iterable[ProtoChunk], *, expected_size: int | None = None) -> bytes:
    """Reassemble a blob (:func:`chunk_data`'s checks).

    The result is built in place, without a second full copy: the buffer is one ``bytes`` of
    the announced size, allocated zero-filled (``calloc``: pages the stream never fills are
    not even touched) when the first chunk arrives, written chunk by chunk through a
    ``BytesIO`` that owns it, and handed out by ``getvalue()``, which returns that very object
    when it is exactly full. Peak memory is the blob plus one chunk, not twice the blob.
    """
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        it, total = iter(()), expected_size or 0
    else:
        it, total = itertools.chain((first,), it), first.total_size
    out: io.BytesIO | None = None
    for data in chunk_data(it, expected_size=expected_size):
        if out is None:  # the sizes are checked: allocate the announced size
            # The only reference to the new bytes is the BytesIO's: it writes into it in
            # place (a shared buffer would be copied on the first write).
            out = io.BytesIO(bytes(total if expected_size is None else expected_size))
        out.write(data)
    if out is None:
        return b""
    return out.getvalue()
