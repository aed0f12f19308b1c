"""Where an upload's bytes wait between the network and the round's fold: in memory when small,
otherwise in an anonymous file on the orchestrator's disk.

Why a file: a round reads up to ``max_uploads`` uploads at once and queues them for its fold
(``orchestrator.core.broker``). Held in memory, each is a whole model, so the orchestrator's peak
memory would be about ten times the model (``bench/RESULTS.md`` §2) and grow with the number
of uploads in flight. Spooled, an upload costs one chunk of Python memory while it arrives (and
gRPC's receive buffers, at most one flow-control window, when this thread falls behind the
network), and the round reads it back a piece at a time (``common.training.tensors.SafetensorsPieces``)
to check it and fold it; the page cache, which the kernel can drop, holds the rest.

The file is created with ``tempfile.TemporaryFile`` (``O_TMPFILE`` on Linux): it has no name,
so nothing else can open it, and it disappears when it is closed or when the process dies. It
lives in the orchestrator's state directory (``<state>/spool``) rather than ``/tmp``, which is
often a RAM-backed tmpfs in containers.

The sha256 of the bytes is computed as they arrive, so checking it costs no second read.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from common.errors import NotFoundError, UnavailableError

SPOOL_MIN_BYTES = 1 << 20
"""Uploads smaller than this (1 MiB) stay in memory: a file would cost more than it saves."""


def max_update_size(model_size: int) -> int:
    """The most bytes an upload may announce for a task that sent ``model_size`` bytes.

    A training update holds the model's tensors, so it is the model's size; other tasks
    answer with no bytes. The margin (an eighth, at least 1 MiB) only spares an honest
    agent a header that serialises a little longer; without a bound, a site could fill the
    orchestrator's disk (up to ``common.rpc.serde.MAX_BLOB_SIZE`` per upload place).
    """
    return model_size + max(SPOOL_MIN_BYTES, model_size // 8)


class Payload:
    """An upload's bytes, read at any offset (``common.training.tensors.RandomAccess``), whether they lie
    in memory or in a spool file. Close it when done with it (the file's space comes back)."""

    def __init__(
        self,
        size: int,
        sha256: str | None,
        *,
        data: bytes | None = None,
        file: BinaryIO | None = None,
    ) -> None:
        if (data is None) == (file is None):
            raise ValueError("a payload lies either in memory or in a file")
        self._size = size
        self._sha256 = sha256
        self._data = data
        self._file = file
        self.spooled = file is not None
        self._lock = threading.Lock()

    @classmethod
    def from_bytes(cls, data: bytes) -> Payload:
        """Bytes already in memory (their sha256 is computed if asked for)."""
        return cls(len(data), None, data=data)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.read_all()).hexdigest()
        return self._sha256

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, size: int) -> bytearray:
        self._check_range(offset, size)
        if self._data is not None:
            return bytearray(memoryview(self._data)[offset : offset + size])
        buf = bytearray(size)
        view, done = memoryview(buf), 0
        with self._lock:  # a close() cannot hand the descriptor's number to another file meanwhile
            fd = self._fd()
            while done < size:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise OSError(f"the spool file ended {size - done} bytes early")
                done += n
        return buf

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` as ``bytes`` (what a protobuf message takes)."""
        self._check_range(offset, size)
        if self._data is not None:
            return self._data[offset : offset + size]
        with self._lock:
            fd = self._fd()
            out = os.pread(fd, size, offset)
            while len(out) < size:  # a regular file reads short only at its end
                more = os.pread(fd, size - len(out), offset + len(out))
                if not more:
                    raise OSError(f"the spool file ended {size - len(out)} bytes early")
                out += more
        return out

    def _check_range(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self._size:
            raise ValueError(f"bytes [{offset}, {offset + size}) lie outside 0..{self._size}")

    def _fd(self) -> int:
        if self._file is None:
            raise NotFoundError("these bytes were released: the round they belong to is over")
        return self._file.fileno()

    def read_all(self) -> bytes:
        return self._data if self._data is not None else self.read(0, self._size)

    def close(self) -> None:
        with self._lock:
            file, self._file = self._file, None
        if file is not None:
            file.close()

    def __enter__(self) -> Payload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def receive(pieces: Iterable[bytes], *, size: int, spool_dir: Path | None) -> Payload:
    """Take an upload's bytes (checked pieces, ``common.rpc.serde.chunk_data``) of announced
    ``size``: in memory below :data:`SPOOL_MIN_BYTES` or without a ``spool_dir``, else in an
    anonymous file there. A stream that breaks leaves nothing behind (the file is closed).

    Raises:
        UnavailableError: the spool file could not be written (disk full, for one); the agent
            keeps its update and may push it again.
    """
    digest = hashlib.sha256()
    if spool_dir is None or size < SPOOL_MIN_BYTES:
        buf = bytearray()
        for data in pieces:
            digest.update(data)
            buf += data
        return Payload(len(buf), digest.hexdigest(), data=bytes(buf))
    try:
        spool_dir.mkdir(parents=True, exist_ok=True)
        file = tempfile.TemporaryFile(dir=spool_dir)
    except OSError as err:
        raise UnavailableError(f"the orchestrator cannot spool updates: {err}") from None
    try:
        written = 0
        for data in pieces:
            digest.update(data)
            file.write(data)
            written += len(data)
        file.flush()
    except OSError as err:
        file.close()
        raise UnavailableError(f"the orchestrator could not spool the update: {err}") from None
    except BaseException:
        file.close()
        raise
    return Payload(written, digest.hexdigest(), file=file)
