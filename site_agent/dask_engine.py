"""Site statistics on the site's Dask cluster: exact sums over Parquet partitions (issue 19.4).

A dataset declared ``engine: dask`` (with ``dask_scheduler`` in ``site.yaml``) has the
*exact* statistics a site releases computed where its data lives: every Parquet row group
(or file, for a folder of Parquet files) is one partition; a worker reads it, applies the
declared schema exactly as the agent does (:func:`site_agent.data.loading.typed_dataset`: clipping,
"other", missing, rows without a declared label dropped) and returns its partial sums; the
agent folds the partials in partition order. Only those sums come back: no row, and no
secret (the statistics are over all kept rows, so the split key stays in the agent). **The
noise and the charge stay in the agent**: the caller admits and charges the release, then
adds the noise to the folded total once (per-partition noise would add more noise for the
same guarantee), as in :mod:`site_agent.gmm_stats`' map-reduce note.

Both paths cut the rows into the same blocks, each row group into ``chunk_rows`` chunks,
and sum the blocks' statistics in the same order, so the result equals the in-process
path's bit for bit (:func:`local_partials` runs the same map in the agent's process: the
mixture statistics of a Parquet dataset with ``engine: local`` are computed so). Statistics: the row
count (catalog), the quantile histograms of the feature encoding
(:func:`site_agent.handlers.quantiles.histogram_counts`), the marginals of the
synthetic-data release (counts over the ``common.synth`` schema's bins) and the mixture
requests' statistics (:func:`site_agent.gmm_stats.exact_partials`: ``gmm`` and
``gmm_local``'s init, E-step and evaluation requests; the bootstrap's row weights are drawn
in the agent). Counts are sums of integers, exact in any order; the mixture sums are floats,
hence the fixed blocks and order.

The workers read the Parquet files when a release is computed, so the engine checks first
that they are still the files the agent counted (:class:`SourceVersion`: each file's identity
and Parquet footer, no row read) and refuses the release otherwise, as the in-agent path
refuses a table that changed since start-up.

The same map-reduce on Spark: ``docs/distributed-statistics.md``.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow.parquet as pq

from common.errors import InvalidSpecError
from site_agent.config import DatasetConfig
from site_agent.data.loading import LocalDataset, typed_dataset

Partial = Callable[[LocalDataset], Any]


@dataclass(frozen=True)
class Partition:
    """One Parquet file's row group: what one worker task reads."""

    path: str
    row_group: int


def source_files(cfg: DatasetConfig) -> list[Path]:
    """The dataset's Parquet files in a fixed order: the file, or each ``*.parquet`` file of
    a folder, sorted by name."""
    if cfg.source_format() != "parquet" or cfg.path is None:
        raise InvalidSpecError(
            f"The dataset {cfg.name!r} has engine: dask, which reads Parquet; its source is "
            f"{cfg.source_format()}."
        )
    path = Path(cfg.path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.exists() for f in files):
        raise InvalidSpecError(f"The dataset path {path} holds no Parquet file.")
    return files


def partitions(cfg: DatasetConfig) -> list[Partition]:
    """The dataset's partitions in a fixed order: every row group of each of its
    :func:`source_files`."""
    out: list[Partition] = []
    for f in source_files(cfg):
        try:
            groups = pq.ParquetFile(f).metadata.num_row_groups
        except Exception as err:
            raise InvalidSpecError(
                f"The dataset file {f} is not a readable Parquet file ({type(err).__name__})."
            ) from None
        out.extend(Partition(str(f), g) for g in range(groups))
    return out


PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class SourceVersion:
    """Which bytes a Parquet dataset's partitions are read from, from metadata alone: for
    each of its :func:`source_files`, the path, the file's identity (device, inode, size,
    mtime in ns: :func:`site_agent.data.row_store.file_identity`, the row cache's key) and
    the SHA-256 of its Parquet footer (the schema, the row groups' sizes and offsets and the
    column chunks' statistics, so that a same-size rewrite within one mtime tick still
    differs). Files added to or removed from a folder change it too. Equal versions mean the
    same files unless someone rewrote a file in place to the same size, footer and mtime."""

    files: tuple[tuple[str, tuple[int, int, int, int], str], ...]


def _file_version(path: Path) -> tuple[str, tuple[int, int, int, int], str]:
    """One file's entry of a :class:`SourceVersion`: the identity and the footer are read
    from the same open file, so a replacement in between cannot pair one file's identity
    with another's footer."""
    from site_agent.data.row_store import file_identity  # agent only: row_store needs torch

    try:
        with path.open("rb") as f:
            identity = file_identity(os.fstat(f.fileno()))
            size = identity[2]
            if size < 12:
                raise ValueError("shorter than a Parquet header and footer")
            f.seek(size - 8)
            tail = f.read(8)
            footer_len = int.from_bytes(tail[:4], "little")
            if tail[4:] != PARQUET_MAGIC or footer_len > size - 12:
                raise ValueError("no Parquet footer")
            f.seek(size - 8 - footer_len)
            footer = f.read(footer_len)
    except (OSError, ValueError) as err:
        raise InvalidSpecError(
            f"The dataset file {path} is not a readable Parquet file ({err})."
        ) from None
    return str(path), identity, hashlib.sha256(footer).hexdigest()


def source_version(cfg: DatasetConfig) -> SourceVersion:
    """The dataset's :class:`SourceVersion` now (reads each file's metadata and footer)."""
    return SourceVersion(tuple(_file_version(f) for f in source_files(cfg)))


def load_partition(cfg: DatasetConfig, names: tuple[str, ...], part: Partition) -> LocalDataset:
    """One partition's rows under the declared schema (runs on a worker)."""
    try:
        frame = (
            pq.ParquetFile(part.path)
            .read_row_group(part.row_group, columns=[*names, cfg.label])
            .to_pandas()
        )
    except Exception as err:
        raise InvalidSpecError(
            f"A row group of {part.path} could not be read ({type(err).__name__})."
        ) from None
    return typed_dataset(cfg, frame, names)


def _map_one(
    cfg: DatasetConfig, names: tuple[str, ...], part: Partition, fn: Partial
) -> tuple[int, Any]:
    ds = load_partition(cfg, names, part)
    return len(ds), fn(ds)


def local_partials(cfg: DatasetConfig, names: Sequence[str], fn: Partial) -> list[tuple[int, Any]]:
    """``(rows, fn(rows))`` of every partition, in partition order, computed in-process."""
    return [_map_one(cfg, tuple(names), p, fn) for p in partitions(cfg)]


def dask_partials(
    client: Any, cfg: DatasetConfig, names: Sequence[str], fn: Partial
) -> list[tuple[int, Any]]:
    """The same as :func:`local_partials`, each partition a task on the Dask ``client``'s
    cluster (``distributed.Client``); gathered in partition order."""
    futures = [
        client.submit(_map_one, cfg, tuple(names), p, fn, pure=False) for p in partitions(cfg)
    ]
    return list(client.gather(futures))


def fold(
    partials: Sequence[tuple[int, Any]], zero: Any, add: Callable[[Any, Any], Any] = operator.add
) -> Any:
    """The partials of the partitions that hold rows, summed left to right with ``add``
    (``zero`` when none does): the order an in-process stream over the same chunks sums in."""
    parts = [value for rows, value in partials if rows > 0]
    return functools.reduce(add, parts) if parts else zero


# ------------------------------------------------------------------ the statistics' maps


def row_count(ds: LocalDataset) -> int:
    """Kept rows (the catalog's count, before its noise)."""
    return len(ds)


@dataclass(frozen=True)
class QuantileCounts:
    """Map for :func:`site_agent.handlers.quantiles.histogram_counts` of ``columns`` on ``grid``."""

    columns: tuple[Any, ...]  # site_agent.handlers.quantiles.QuantileColumn
    grid: int

    def __call__(self, ds: LocalDataset) -> npt.NDArray[np.float64]:
        from site_agent.handlers.quantiles import histogram_counts

        return histogram_counts(ds.table, self.columns, self.grid)


@dataclass(frozen=True)
class MarginalCounts:
    """Map for the exact counts of the synthetic-data marginals ``marginals`` (each a tuple
    of column names) over the site's ``common.synth`` schema: flat in C order over the
    columns' bins, as ``common.synth.measure_site`` releases them (before its noise)."""

    schema: Any  # the site's synthetic-data Schema (site_agent.handlers.synth.site_schema)
    marginals: tuple[tuple[str, ...], ...]

    def __call__(self, ds: LocalDataset) -> list[npt.NDArray[np.int64]]:
        from site_agent.handlers.synth import _frame

        codes = np.asarray(self.schema.encode(_frame(ds, self.schema)), dtype=np.int64)
        index = {c.name: i for i, c in enumerate(self.schema.columns)}
        out = []
        for cols in self.marginals:
            shape = tuple(self.schema.column(c).bins for c in cols)
            flat = (
                np.ravel_multi_index(tuple(codes[:, index[c]] for c in cols), shape)
                if codes.shape[0]
                else np.zeros(0, dtype=np.int64)
            )
            out.append(np.bincount(flat, minlength=int(np.prod(shape))).astype(np.int64))
        return out


def add_marginals(
    a: list[npt.NDArray[np.int64]], b: list[npt.NDArray[np.int64]]
) -> list[npt.NDArray[np.int64]]:
    return [x + y for x, y in zip(a, b, strict=True)]


@dataclass(frozen=True)
class MixtureStats:
    """Map for the mixture E-step's sufficient statistics of ``columns`` under ``params``
    (:func:`site_agent.gmm_stats.compute_stats`, unit coordinates of ``bounds``)."""

    columns: tuple[str, ...]
    params: Any  # common.gmm.GaussianMixtureParams
    bounds: tuple[tuple[float, float], ...]
    covariance_type: str | None = None

    def __call__(self, ds: LocalDataset) -> Any:
        from site_agent.gmm_stats import compute_stats
        from site_agent.handlers.clustering import _rows

        rows = _rows(ds, self.columns)  # the rows run_gmm streams, treated the same way
        return compute_stats(
            [rows], self.params, bounds=self.bounds, covariance_type=self.covariance_type
        )


@dataclass(frozen=True)
class MixtureRequestStats:
    """Map for a mixture request's exact statistics (``gmm.init``, ``gmm.em``, ``gmm.eval``)
    of ``columns``: ``(rows used, one partial per chunk)``, the partition's rows cut into
    ``chunk_rows`` chunks and each chunk's statistics computed by
    :func:`site_agent.gmm_stats.exact_partials`. :func:`add_mixture` keeps the partials in
    partition order; the agent sums them in that order (``answer_request(partials=...)``)."""

    columns: tuple[str, ...]
    chunk_rows: int
    request: dict[str, Any]

    def __call__(self, ds: LocalDataset) -> tuple[int, list[Any]]:
        from site_agent.gmm_stats import exact_partials
        from site_agent.handlers.clustering import _rows

        x = _rows(ds, self.columns)
        chunks = [x[i : i + self.chunk_rows] for i in range(0, len(x), self.chunk_rows)]
        return len(x), list(exact_partials(self.request, chunks))


def add_mixture(a: tuple[int, list[Any]], b: tuple[int, list[Any]]) -> tuple[int, list[Any]]:
    """Rows added, partials concatenated (partition order)."""
    return a[0] + b[0], a[1] + b[1]


def connect(address: str) -> Any:
    """A ``distributed.Client`` for the site's scheduler (``dask_scheduler`` in site.yaml)."""
    try:
        from distributed import Client
    except ImportError:
        raise InvalidSpecError(
            "engine: dask needs the dask extra: pip install 'dpfed[dask]'."
        ) from None
    try:
        return Client(address, timeout="10s")  # type: ignore[no-untyped-call]
    except Exception as err:
        raise InvalidSpecError(
            f"The Dask scheduler {address} cannot be reached ({type(err).__name__})."
        ) from None


SYNCHRONOUS = "synchronous"
"""``dask_scheduler: synchronous``: the same map, run partition by partition in the agent's
own process (tests, debugging); any other value is a scheduler address."""


class StatsEngine:
    """A dataset's exact statistics computed by the engine (``engine: dask``): the agent's
    handlers call :meth:`fold` **after** they admitted and charged the release, add the
    noise to its result, and release it. ``client`` is a ``distributed.Client`` or None
    (:data:`SYNCHRONOUS`: in-process).

    ``version`` is the :class:`SourceVersion` of the files the agent counted at start-up (its
    catalog's counts and split sizes are of those files); the engine refuses, with
    :class:`~common.errors.InvalidSpecError`, to compute on other files: when it is built
    (before the handler's charge) and in :meth:`fold`, before any statistic is computed and
    again after, so that a file replaced while the workers read it is refused too. Without
    ``version`` the files are those present when the engine is built.

    Raises:
        InvalidSpecError: ``version`` is given and the files differ from it now.
    """

    def __init__(
        self,
        cfg: DatasetConfig,
        names: Sequence[str],
        client: Any | None,
        *,
        version: SourceVersion | None = None,
    ) -> None:
        self.cfg = cfg
        self.names = tuple(names)
        self.client = client
        self._since = "the site agent started" if version is not None else "this task started"
        self.version = version if version is not None else source_version(cfg)
        if version is not None:
            self.check_source()

    def check_source(self) -> None:
        """Refuse unless the dataset's files are still those of :attr:`version` (metadata and
        footers only; no row is read).

        Raises:
            InvalidSpecError: a file was replaced, written, added or removed.
        """
        try:
            now = source_version(self.cfg)
        except InvalidSpecError as err:
            raise self._changed(f" ({err})") from None
        if now != self.version:
            raise self._changed("")

    def _changed(self, detail: str) -> InvalidSpecError:
        return InvalidSpecError(
            f"The dataset {self.cfg.name!r} changed since {self._since}{detail}; restart the agent."
        )

    def fold(self, fn: Partial, zero: Any, add: Callable[[Any, Any], Any] = operator.add) -> Any:
        """``fn`` mapped over the dataset's partitions (on the cluster), folded in order, if
        the files are those of :attr:`version` before and after (:meth:`check_source`)."""
        self.check_source()
        try:
            if self.client is None:
                parts = local_partials(self.cfg, self.names, fn)
            else:
                parts = dask_partials(self.client, self.cfg, self.names, fn)
        except Exception:
            self.check_source()  # a file replaced under a worker: say so, not its read error
            raise
        self.check_source()
        return fold(parts, zero, add)


def engine_client(address: str) -> Any | None:
    """The client for ``dask_scheduler``: None for :data:`SYNCHRONOUS`, else :func:`connect`."""
    return None if address == SYNCHRONOUS else connect(address)
