"""A site's datasets as its task handlers reach them: read when first needed, then cached.

What each dataset's start-up reads is what the catalog needs (its columns and the size of each
side of the per-record split, :mod:`site_agent.data.split`):

* ``storage: memory`` with ``engine: local``: the table itself, typed and split, and kept:
  every task on it reads these rows;
* ``storage: disk``: the side of each record, streamed into the row cache
  (:class:`~site_agent.data.row_store.DiskDataset`); rows are read one batch at a time;
* ``engine: dask``: the sides counted over the Parquet row groups one at a time; nothing is
  kept, and the table is loaded only if a handler reads rows in the agent after its charge.

A table loaded later must have the sides counted at start-up (otherwise the data changed
under the running agent, and the task is refused).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from common.errors import InvalidSpecError, NotFoundError
from common.schema.encoding import FeatureEncoding
from site_agent.config import DatasetConfig, SiteConfig
from site_agent.dask_engine import (
    SYNCHRONOUS,
    SourceVersion,
    StatsEngine,
    engine_client,
    local_partials,
    partitions,
    row_count,
    source_version,
)
from site_agent.data.loading import LocalDataset, feature_names, load_dataset
from site_agent.data.row_store import DiskDataset, EncodedRows
from site_agent.data.split import (
    record_digests,
    split_key,
    split_threshold,
    split_train_validation,
)


@dataclass(frozen=True)
class Shape:
    """What is public about a dataset's two sides: row counts and columns."""

    num_train: int
    num_validation: int | None
    """None exactly when the dataset's ``validation_fraction`` is 0 (configuration)."""
    feature_names: tuple[str, ...]
    label: str


@dataclass(frozen=True)
class Split:
    """A dataset's rows on its two sides; ``validation`` is None exactly when its
    ``validation_fraction`` is 0 (it may hold no rows otherwise)."""

    train: LocalDataset
    validation: LocalDataset | None


class SiteDatasets:
    """The site's datasets (module docstring); thread-safe."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._splits: dict[str, Split] = {}
        self._shapes: dict[str, Shape] = {}
        self._disk: dict[str, DiskDataset] = {}
        self._versions: dict[str, SourceVersion] = {}
        """The files each Parquet dataset was counted or loaded from (start-up)."""
        self.dask_client: Any | None = None
        self.loads = 0
        """How many tables were read whole so far (tests check when data is read)."""

    def config_of(self, name: str) -> DatasetConfig:
        cfg = self.config.dataset(name)
        if cfg is None:
            raise NotFoundError(f"site {self.config.site_id} has no dataset named {name!r}")
        return cfg

    def shape(self, name: str) -> Shape:
        """The dataset's public shape, computed once (module docstring)."""
        cfg = self.config_of(name)
        with self._lock:
            hit = self._shapes.get(name)
        if hit is not None:
            return hit
        if cfg.storage == "disk":
            d = self.disk(name)
            shape = Shape(
                d.num_train,
                d.num_validation if cfg.validation_fraction > 0 else None,
                d.feature_names,
                cfg.label,
            )
        elif cfg.engine == "dask":
            shape = self._counted_shape(cfg)
        else:
            shape = _shape_of(self.split(name))
        with self._lock:
            return self._shapes.setdefault(name, shape)

    def _counted_shape(self, cfg: DatasetConfig) -> Shape:
        """The sides of a Parquet dataset counted one row group at a time (no table kept)."""
        partitions(cfg)  # a Parquet file, or a folder holding some: refused otherwise
        assert cfg.path is not None
        path = Path(cfg.path)
        first = min(path.glob("*.parquet")) if path.is_dir() else path
        try:
            header = [str(c) for c in pq.ParquetFile(first).schema_arrow.names]
        except Exception as err:
            raise InvalidSpecError(
                f"The dataset file {first} is not a readable Parquet file ({type(err).__name__})."
            ) from None
        names = feature_names(cfg, header, path)
        fraction = cfg.validation_fraction
        key = split_key(self.config.state_dir)
        threshold = split_threshold(fraction)

        def sides(ds: LocalDataset) -> tuple[int, int]:
            val = int(np.count_nonzero(record_digests(ds, key) < threshold)) if fraction else 0
            return len(ds) - val, val

        version = source_version(cfg)
        counted = [value for _, value in local_partials(cfg, names, sides)]
        if source_version(cfg) != version:
            raise InvalidSpecError(
                f"The dataset {cfg.name!r} changed while the site agent counted it; restart "
                "the agent."
            )
        with self._lock:
            self._versions.setdefault(cfg.name, version)
        n_train = sum(t for t, _ in counted)
        n_val = sum(v for _, v in counted)
        return Shape(n_train, n_val if fraction > 0 else None, names, cfg.label)

    def split(self, name: str) -> Split:
        """The dataset's rows on both sides, loaded on first use and kept.

        Raises:
            InvalidSpecError: a ``storage: disk`` dataset (its rows are never loaded whole),
                or the data changed since the agent counted it.
        """
        cfg = self.require_in_memory(name)
        with self._lock:
            if name not in self._splits:
                parquet = cfg.source_format() == "parquet"
                version = source_version(cfg) if parquet else None
                full = load_dataset(cfg)
                self.loads += 1
                if version is not None:
                    if source_version(cfg) != version:
                        raise InvalidSpecError(
                            f"The dataset {name!r} changed while the site agent loaded it; "
                            "restart the agent."
                        )
                    self._versions.setdefault(name, version)
                if cfg.validation_fraction > 0:
                    # Each record's side comes from a keyed hash of that record alone.
                    key = split_key(self.config.state_dir)
                    train, val = split_train_validation(full, cfg.validation_fraction, key)
                    split = Split(train, val)
                else:
                    split = Split(full, None)
                counted = self._shapes.get(name)
                if counted is not None and counted != _shape_of(split):
                    raise InvalidSpecError(
                        f"The dataset {name!r} changed since the site agent started; restart "
                        "the agent."
                    )
                self._splits[name] = split
            return self._splits[name]

    def require_in_memory(self, name: str) -> DatasetConfig:
        """The dataset's config, if its table may be loaded whole (configuration only).

        Raises:
            InvalidSpecError: it is stored on disk (``storage: disk``).
        """
        cfg = self.config_of(name)
        if cfg.storage == "disk":
            raise InvalidSpecError(
                f"The dataset {name!r} is stored on disk (storage: disk) and serves training "
                "tasks only; this task reads the table in memory."
            )
        return cfg

    def disk(self, name: str) -> DiskDataset:
        """A ``storage: disk`` dataset: its sides computed once (streamed), no rows loaded."""
        cfg = self.config_of(name)
        with self._lock:
            if name not in self._disk:
                self._disk[name] = DiskDataset(
                    cfg, self.config.state_dir, split_key(self.config.state_dir)
                )
            return self._disk[name]

    def encoded(
        self, name: str, encoding: FeatureEncoding
    ) -> tuple[EncodedRows, EncodedRows | None]:
        """The (train, validation) rows of a dataset under ``encoding``: encoded in memory, or
        from the row cache of a ``storage: disk`` dataset (memory-mapped)."""
        if self.config_of(name).storage == "disk":
            train, val = self.disk(name).encoded(encoding)
            return train, (val if self.shape(name).num_validation is not None else None)
        split = self.split(name)
        rows = EncodedRows(encoding.encode(split.train.table), split.train.labels)
        if split.validation is None:
            return rows, None
        return rows, EncodedRows(encoding.encode(split.validation.table), split.validation.labels)

    def engine(self, name: str) -> StatsEngine | None:
        """The dataset's statistics engine: None for ``engine: local`` (the handler computes
        in-process); for ``engine: dask`` the site's cluster, connected on first use (before
        the charge, so that an unreachable scheduler costs no ε)."""
        cfg = self.config_of(name)
        if cfg.engine != "dask":
            return None
        assert self.config.dask_scheduler is not None  # SiteConfig requires it
        names = self.shape(name).feature_names
        with self._lock:
            if self.dask_client is None and self.config.dask_scheduler != SYNCHRONOUS:
                self.dask_client = engine_client(self.config.dask_scheduler)
            client, version = self.dask_client, self._versions[name]
        # Refuses (before the charge) a source that changed since it was counted.
        return StatsEngine(cfg, names, client, version=version)

    def parquet_engine(self, name: str) -> StatsEngine:
        """The in-process map over a Parquet dataset's partitions (``engine: local``), held
        like the cluster's (:meth:`engine`) to the files the agent counted or loaded at
        start-up: it refuses a source that changed since."""
        cfg = self.config_of(name)
        names = self.shape(name).feature_names  # loads or counts the files first
        with self._lock:
            version = self._versions.get(name)
        return StatsEngine(cfg, names, None, version=version)

    def exact_rows(self, name: str) -> int | Callable[[], int]:
        """The catalog's exact count: the shape's, or (``engine: dask``) a function the
        catalog calls after its charge, folding the count on the site's cluster."""
        engine = self.engine(name)
        if engine is None:
            shape = self.shape(name)
            return shape.num_train + (shape.num_validation or 0)
        return lambda: int(engine.fold(row_count, 0))


def _shape_of(split: Split) -> Shape:
    return Shape(
        len(split.train.labels),
        None if split.validation is None else len(split.validation.labels),
        split.train.feature_names,
        split.train.label_name,
    )
