"""Site data larger than memory: an encoded row cache on disk and Poisson batches read from it.

A dataset declared ``storage: disk`` in ``site.yaml`` is never loaded whole (issue 19.3). The
agent streams its source (Parquet row groups, CSV chunks; :func:`site_agent.data.loading.
iter_typed_chunks`) through the declared schema twice at most per data version:

1. **Sides** (:class:`DiskDataset`): each record's train/validation side, from the same keyed
   hash of the record as the in-memory path (:func:`site_agent.data.split.record_digests`), one byte
   per kept row in ``sides.u8``, with the row counts the catalog discloses;
2. **Encoded rows** (:meth:`DiskDataset.encoded`), once per job encoding: ``float32`` rows and
   ``int64`` labels of each side, in source order, written to flat files.

Both live in the site's state dir (``rowcache/<dataset>/<version>/``, directories 0700, files
0600), keyed by the source file's identity (device, inode, size, mtime), the declared schema,
the feature order, the validation fraction and a digest of the split key; a stale version is
removed when a new one is built. A build is written under a temporary name and renamed, so a
crash leaves no half cache. Training reads the rows of one Poisson batch at a time
(:class:`PoissonIndexSampler`) with ``pread`` (:class:`EncodedRows`), and the labels are
held in memory in the smallest integer type, so the agent's resident memory is bounded by a
batch, the labels and the model, not by the table; validation metrics read their side
sequentially through a read-only ``mmap`` whose pages are dropped from the process' mapping
afterwards.

Poisson subsampling (each row independently with probability ``q``) is drawn as its exact
equivalent: a size ``K ~ Binomial(N, q)``, then a uniformly random ``K``-subset (first ``K``
distinct values of a stream of uniform indices, or a random permutation when ``K`` is a large
part of ``N``): ``O(q·N)`` work per step instead of the ``O(N)`` Bernoulli mask Opacus draws.
Both come from the site's private generator (:func:`common.dp.noise.private_torch_generator`).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from common.errors import InvalidSpecError
from common.schema.encoding import FeatureEncoding
from site_agent.config import DatasetConfig
from site_agent.data.loading import iter_typed_chunks, read_header_names
from site_agent.data.split import record_digests, split_threshold

CACHE_DIR = "rowcache"
"""Under the site's state dir: ``rowcache/<dataset>/<version>/``."""

RELEASE_EVERY = 16
"""Batches between two drops of the touched pages from the process' mapping."""


def _private_file(path: Path) -> Any:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    return os.fdopen(fd, "wb")


def _fingerprint(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """A file's identity from its metadata alone: ``(device, inode, size, mtime in ns)``.
    Replacing the file (a new inode) or writing to it (size, mtime) changes it; the data
    rows are not read. The engine path (:func:`site_agent.dask_engine.source_version`) uses
    the same identity."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def data_version(cfg: DatasetConfig, feature_names: tuple[str, ...], key: bytes) -> str:
    """The version of a dataset's rows: its source file's identity and the declarations that
    decide each row's typed content and side. Any change gives a new version."""
    assert cfg.path is not None
    label = cfg.label_schema()
    return _fingerprint(
        {
            "path": str(Path(cfg.path).resolve()),
            "file": list(file_identity(Path(cfg.path).stat())),
            "format": cfg.source_format(),
            "name": cfg.name,
            "features": list(feature_names),
            "schema": [vars(c) for c in cfg.feature_schema(feature_names)],
            "label": None if label is None else vars(label),
            "label_name": cfg.label,
            "validation_fraction": cfg.validation_fraction,
            "key": hashlib.sha256(b"dpfed-split-key\x00" + key).hexdigest(),
        }
    )


def encoding_version(encoding: FeatureEncoding) -> str:
    return _fingerprint(encoding.to_dict())[:32]


@dataclass(frozen=True, eq=False)
class EncodedRows:
    """Encoded rows and their labels, read by position (memory-mapped or in memory), with
    optional extra in-memory rows after them (an audit's canaries).

    A cached side reads random rows with ``pread`` on ``fd`` (a file mapping would map the
    file's large folios around every row touched: one Poisson batch of 1,024 rows mapped the
    whole 3.6 GB table); ``x`` maps the same file for sequential reads (validation metrics),
    and its labels are held in memory in the smallest integer type.
    """

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.integer[Any]]
    extra_x: npt.NDArray[np.float32] | None = None
    extra_y: npt.NDArray[np.int64] | None = None
    maps: tuple[mmap.mmap, ...] = ()
    fd: int | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0]) + (0 if self.extra_y is None else int(self.extra_y.shape[0]))

    @property
    def width(self) -> int:
        return int(self.x.shape[1])

    def with_extra(self, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> EncodedRows:
        """These rows followed by ``x, y`` (in memory)."""
        return EncodedRows(
            self.x,
            self.y,
            np.ascontiguousarray(x, dtype=np.float32),
            np.ascontiguousarray(y, dtype=np.int64),
            self.maps,
            self.fd,
        )

    def arrays(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """All rows (the extra ones last) as arrays: for rows that fit in memory."""
        y = self.y.astype(np.int64, copy=False)
        if self.extra_x is None or self.extra_y is None:
            return self.x, y
        return np.concatenate([self.x, self.extra_x]), np.concatenate([y, self.extra_y])

    def _rows_at(self, index: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        if self.fd is None:
            return self.x[index]
        out = np.empty((index.shape[0], self.width), dtype=np.float32)
        size = 4 * self.width
        view = out.data.cast("B")
        for j, i in enumerate(index.tolist()):
            if os.preadv(self.fd, [view[j * size : (j + 1) * size]], i * size) != size:
                raise InvalidSpecError("The row cache ended early; delete it to rebuild.")
        return out

    def take(self, index: npt.NDArray[np.int64]) -> tuple[Tensor, Tensor]:
        """The rows at ``index`` (sorted positions read fastest) as new tensors."""
        index = np.asarray(index, dtype=np.int64)
        n = int(self.x.shape[0])
        if self.extra_y is None or self.extra_x is None:
            xb, yb = self._rows_at(index), self.y[index].astype(np.int64)
        else:
            own = index < n
            xb = np.empty((index.shape[0], self.width), dtype=np.float32)
            yb = np.empty(index.shape[0], dtype=np.int64)
            xb[own], yb[own] = self._rows_at(index[own]), self.y[index[own]]
            xb[~own], yb[~own] = self.extra_x[index[~own] - n], self.extra_y[index[~own] - n]
        return torch.from_numpy(np.ascontiguousarray(xb)), torch.from_numpy(
            np.ascontiguousarray(yb)
        )

    def release_pages(self) -> None:
        """Drop the pages read so far from this process' mapping (they stay in the OS page
        cache): the resident set does not grow with the table."""
        for m in self.maps:
            m.madvise(mmap.MADV_DONTNEED)

    def poisson_loader(self, sample_rate: float, generator: torch.Generator) -> DataLoader[Any]:
        """A loader of Poisson batches at exactly ``sample_rate`` (module docstring), each a
        pair of tensors; one pass is ``ceil(1/q)`` batches, as Opacus' loader."""
        sampler = PoissonIndexSampler(len(self), sample_rate, generator)
        return DataLoader(
            _RowsDataset(self),
            # Batches are arrays of positions, collated by the dataset itself.
            batch_sampler=cast("Sampler[list[Any]]", sampler),
            collate_fn=cast("Callable[[list[Any]], Any]", _as_is),
            num_workers=0,
        )


def _as_is(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return batch


class _RowsDataset(Dataset[tuple[Tensor, Tensor]]):
    def __init__(self, rows: EncodedRows) -> None:
        self.rows = rows
        self._served = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.rows.take(np.array([i], dtype=np.int64))
        return x[0], y[0]

    def __getitems__(self, index: npt.NDArray[np.int64]) -> tuple[Tensor, Tensor]:
        out = self.rows.take(index)
        self._served += 1
        if self._served % RELEASE_EVERY == 0:
            self.rows.release_pages()
        return out


def tensor_poisson_loader(
    x: Tensor, y: Tensor, sample_rate: float, generator: torch.Generator
) -> DataLoader[Any]:
    """Poisson batches of rows held in memory (``x[i]``, ``y[i]``), drawn as for the row
    cache by :class:`PoissonIndexSampler`: each batch is one indexing of the tensors, not
    one Python call per row."""
    sampler = PoissonIndexSampler(int(x.shape[0]), sample_rate, generator)
    return _TensorBatches(
        _TensorRows(x, y),
        batch_sampler=cast("Sampler[list[Any]]", sampler),
        collate_fn=cast("Callable[[list[Any]], Any]", _as_is),
        num_workers=0,
    )


class _TensorBatches(DataLoader[tuple[Tensor, Tensor]]):
    """A loader whose iteration is the sampler's draw and one indexing per batch: the same
    batches as the generic loader, without its per-batch fetch and collate machinery."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:  # type: ignore[override]
        rows = cast("_TensorRows", self.dataset)
        for index in cast("PoissonIndexSampler", self.batch_sampler):
            yield rows.__getitems__(index)


class _TensorRows(Dataset[tuple[Tensor, Tensor]]):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, index: npt.NDArray[np.int64]) -> tuple[Tensor, Tensor]:
        rows = torch.from_numpy(index)  # index_select: cheaper than x[rows]
        return self.x.index_select(0, rows), self.y.index_select(0, rows)


class PoissonIndexSampler(Sampler[npt.NDArray[np.int64]]):
    """Sorted row positions of Poisson samples: every row in each batch independently with
    probability ``q`` (module docstring)."""

    def __init__(self, num_rows: int, sample_rate: float, generator: torch.Generator) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_rows = num_rows
        self.sample_rate = sample_rate
        self.generator = generator
        self._binomial = (
            torch.tensor([float(num_rows)], dtype=torch.float64),
            torch.tensor([sample_rate], dtype=torch.float64),
        )

    def __len__(self) -> int:
        return max(1, int(np.ceil(1.0 / self.sample_rate)))

    def __iter__(self) -> Iterator[npt.NDArray[np.int64]]:
        for _ in range(len(self)):
            yield self.draw()

    def draw(self) -> npt.NDArray[np.int64]:
        n, gen = self.num_rows, self.generator
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        k = int(torch.binomial(*self._binomial, generator=gen).item())
        if 4 * k >= n:
            chosen = torch.randperm(n, generator=gen)[:k].numpy()
        else:
            chosen = np.zeros(0, dtype=np.int64)
            while chosen.shape[0] < k:
                draw = torch.randint(n, (2 * (k - chosen.shape[0]) + 16,), generator=gen)
                stream = np.concatenate([chosen, draw.numpy()])
                _, first = np.unique(stream, return_index=True)
                # The distinct values in order of first appearance: a uniform random sequence
                # without replacement, whose first k make a uniform k-subset.
                chosen = stream[np.sort(first)][:k]
        return np.sort(chosen.astype(np.int64))


def _open_rows(path: Path) -> tuple[npt.NDArray[np.uint8], mmap.mmap | None]:
    """The file's bytes through a read-only mapping (None for an empty file)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8), None
    with path.open("rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(m, dtype=np.uint8), m


def _labels(path: Path, num_classes: int) -> npt.NDArray[np.integer[Any]]:
    """The label file read in blocks into the smallest integer type that holds the classes."""
    dtype = np.int8 if num_classes <= 127 else np.int16 if num_classes <= 32767 else np.int32
    count = path.stat().st_size // 8
    out: npt.NDArray[np.integer[Any]] = np.empty(count, dtype=dtype)
    block = 1 << 20
    with path.open("rb") as f:
        for start in range(0, count, block):
            part = np.fromfile(f, dtype="<i8", count=min(block, count - start))
            out[start : start + part.shape[0]] = part
    return out


def _open_side(folder: Path, prefix: str, width: int, num_classes: int) -> EncodedRows:
    path = folder / f"{prefix}.x.f32"
    xb, xm = _open_rows(path)
    x = xb.view(np.float32).reshape(-1, width) if xm else np.zeros((0, width), np.float32)
    y = _labels(folder / f"{prefix}.y.i64", num_classes)
    if x.shape[0] != y.shape[0]:
        raise InvalidSpecError(f"The row cache in {folder} is damaged; delete it to rebuild.")
    # Kept open as long as the cache is (one descriptor per side and encoding).
    fd = os.open(path, os.O_RDONLY)
    return EncodedRows(x, y, maps=() if xm is None else (xm,), fd=fd)


class DiskDataset:
    """A dataset served from the row cache (module docstring); holds no rows in memory."""

    def __init__(self, cfg: DatasetConfig, state_dir: Path, key: bytes) -> None:
        if cfg.source_format() == "sql":
            raise InvalidSpecError(
                f"The dataset {cfg.name!r} is a SQL query; storage: disk reads CSV or Parquet "
                "files (export the query to Parquet)."
            )
        assert cfg.path is not None
        self.cfg = cfg
        self.key = key
        header = read_header_names(cfg)
        self.feature_names = (
            tuple(cfg.features)
            if cfg.features is not None
            else tuple(c for c in header if c != cfg.label)
        )
        self.version = data_version(cfg, self.feature_names, key)
        self.root = state_dir / CACHE_DIR / cfg.name
        self.folder = self.root / self.version
        self._lock = threading.Lock()
        self._encoded: dict[str, tuple[EncodedRows, EncodedRows]] = {}
        meta = self._sides()
        self.num_train = int(meta["num_train"])
        self.num_validation = int(meta["num_validation"])

    def _sides(self) -> dict[str, Any]:
        meta_path = self.folder / "meta.json"
        if meta_path.exists():
            loaded: dict[str, Any] = json.loads(meta_path.read_text())
            return loaded
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for old in self.root.iterdir():  # a stale version, or a build a crash interrupted
            shutil.rmtree(old, ignore_errors=True)
        tmp = self.root / f".build-{os.getpid()}-{self.version[:16]}"
        tmp.mkdir(mode=0o700)
        threshold = split_threshold(self.cfg.validation_fraction)
        num_train = num_val = 0
        with _private_file(tmp / "sides.u8") as f:
            for chunk in iter_typed_chunks(self.cfg, self.feature_names):
                if self.cfg.validation_fraction > 0:
                    side = (record_digests(chunk, self.key) < threshold).astype(np.uint8)
                else:
                    side = np.zeros(len(chunk), dtype=np.uint8)
                side.tofile(f)
                num_val += int(side.sum())
                num_train += int(side.shape[0] - side.sum())
        meta = {"num_train": num_train, "num_validation": num_val}
        with _private_file(tmp / "meta.json") as f:
            f.write(json.dumps(meta).encode())
        os.replace(tmp, self.folder)
        return meta

    def encoded(self, encoding: FeatureEncoding) -> tuple[EncodedRows, EncodedRows]:
        """(train, validation) rows under ``encoding``, built once per data version and
        encoding (module docstring)."""
        ev = encoding_version(encoding)
        with self._lock:
            if ev not in self._encoded:
                folder = self.folder / f"enc-{ev}"
                if not (folder / "done").exists():
                    self._build(encoding, folder)
                w = encoding.width
                c = encoding.num_classes
                self._encoded[ev] = (
                    _open_side(folder, "train", w, c),
                    _open_side(folder, "val", w, c),
                )
            return self._encoded[ev]

    def _build(self, encoding: FeatureEncoding, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        tmp = self.folder / f".build-{os.getpid()}-{folder.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        sides = np.memmap(self.folder / "sides.u8", dtype=np.uint8, mode="r")
        offset = 0
        names = ("train.x.f32", "train.y.i64", "val.x.f32", "val.y.i64")
        files = [_private_file(tmp / n) for n in names]
        try:
            for chunk in iter_typed_chunks(self.cfg, self.feature_names):
                n = len(chunk)
                to_val = np.asarray(sides[offset : offset + n], dtype=bool)
                if to_val.shape[0] != n:
                    raise InvalidSpecError(
                        f"The dataset {self.cfg.name!r} changed while its row cache was being "
                        "built; restart the agent."
                    )
                offset += n
                x = encoding.encode(chunk.table)
                y = chunk.labels.astype(np.int64)
                for f, part in zip(
                    files, (x[~to_val], y[~to_val], x[to_val], y[to_val]), strict=True
                ):
                    np.ascontiguousarray(part).tofile(f)
            if offset != sides.shape[0]:
                raise InvalidSpecError(
                    f"The dataset {self.cfg.name!r} changed while its row cache was being "
                    "built; restart the agent."
                )
        finally:
            for f in files:
                f.close()
        del sides
        with _private_file(tmp / "done") as f:
            f.write(b"ok\n")
        os.replace(tmp, folder)
