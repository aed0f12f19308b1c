"""Each record's train/validation side, decided by that record alone.

A record goes to validation when a keyed hash of its typed content (HMAC-SHA256 with the
site's secret split key, RFC 2104) falls below the dataset's ``validation_fraction``: adding
or removing one record moves no other record between training and validation, as DP-SGD's
neighbouring-dataset assumption needs, and every job on a dataset sees the same split.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from common.errors import InvalidSpecError
from site_agent.data.loading import LocalDataset

SPLIT_KEY_FILE = "split.key"
"""The site's secret key for the per-record train/validation hash (in the state dir, 0600)."""


def split_key(state_dir: Path) -> bytes:
    """The site's secret split key: created once (32 bytes from the OS, mode 0600) in
    ``state_dir``, then read back, so every job sees the same split."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / SPLIT_KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 16:
            raise InvalidSpecError(
                f"The split key {path} is damaged; restore it from a backup (deleting it "
                "moves records between training and validation)."
            ) from None
        return key
    key = os.urandom(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


def record_digests(ds: LocalDataset, key: bytes) -> npt.NDArray[np.uint64]:
    """HMAC-SHA256 (RFC 2104) of each record's canonical content, as a 64-bit number.

    The content is the dataset's name, then each typed feature and the label in the
    dataset's column order, as float64 (``-0.0`` as ``0.0``, every NaN the same bits): a
    function of the record alone.
    """
    n = len(ds)
    cols = [np.asarray(ds.table.columns[c], dtype=np.float64) for c in ds.feature_names]
    cols.append(ds.labels.astype(np.float64))
    matrix = np.stack(cols, axis=1) + 0.0  # -0.0 + 0.0 == 0.0
    matrix[np.isnan(matrix)] = np.nan
    prefix = f"{ds.name}\x1f{','.join(ds.feature_names)}\x1f{ds.label_name}\x1f".encode()
    rows = np.ascontiguousarray(matrix.astype("<f8")).tobytes()
    width = 8 * matrix.shape[1]
    # HMAC = H((K ⊕ opad) ‖ H((K ⊕ ipad) ‖ m)) (RFC 2104 §2), the keyed states and the shared
    # prefix hashed once and copied per record: the value of hmac.new(key, m, sha256), in
    # about half the time.
    block = hashlib.sha256(key).digest() if len(key) > 64 else key
    block = block.ljust(64, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))
    inner.update(prefix)
    heads = []
    for i in range(n):
        h = inner.copy()
        h.update(rows[i * width : (i + 1) * width])
        o = outer.copy()
        o.update(h.digest())
        heads.append(o.digest()[:8])
    return np.frombuffer(b"".join(heads), dtype=">u8").astype(np.uint64)


def split_threshold(fraction: float) -> np.uint64:
    """The digest below which a record goes to validation (:func:`split_train_validation`).

    Raises:
        InvalidSpecError: ``fraction`` is outside ``[0, 1)``.
    """
    if not (0.0 <= fraction < 1.0) or math.isnan(fraction):
        raise InvalidSpecError(f"The validation fraction must be in [0, 1), got {fraction}.")
    return np.uint64(min(int(fraction * 2**64), 2**64 - 1))


def split_train_validation(
    ds: LocalDataset, fraction: float, key: bytes
) -> tuple[LocalDataset, LocalDataset]:
    """Split rows into (train, validation), each record's side decided by that record alone.

    A record goes to validation when its keyed digest (:func:`record_digests`), read as a
    number in ``[0, 1)``, is below ``fraction``: adding or removing one record changes no
    other record's side (``split(D ∪ {x})`` restricted to ``D`` is ``split(D)``), as DP-SGD's
    neighbouring-dataset assumption needs; a secret key keeps the side unpredictable to
    anyone who knows the record. Every job on the dataset sees the same split, so DP-SGD never
    trains on rows an earlier job's metrics were computed on. Row order is kept on each side.

    Raises:
        InvalidSpecError: ``fraction`` is outside ``[0, 1)``.
    """
    to_validation = record_digests(ds, key) < split_threshold(fraction)
    return ds.take(np.flatnonzero(~to_validation)), ds.take(np.flatnonzero(to_validation))
