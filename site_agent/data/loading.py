"""The one reader of a site's CSV, Parquet or SQL table, under its declared schema.

This code runs inside the site's trust boundary and reads raw records. Two rules beyond
correctness (issue 15; held by ``tests/unit/test_neighbouring.py``):

- **The declared schema is the contract.** Every cell is typed by
  :func:`common.schema.table.apply_schema` against the dataset's declaration
  (``DatasetConfig.feature_schema`` / ``label_schema``): numbers clipped to their bounds,
  unknown categories "other", empty / ``NA`` / ``NaN`` cells missing, and rows whose label is
  missing or not a declared class dropped, silently and identically for every row.
- **Nothing but configuration raises.** Errors are for a missing or unreadable source, a
  header without the configured columns, a label listed as a feature; their messages name
  files and columns (taken from the site config, or positions), never a cell's content. No
  message, error or log line that can leave the site depends on a value; the local log
  counts dropped rows. A CSV row with more fields than the header is dropped like a row
  without a label, and bytes that are not UTF-8 are replaced, so that no single record can
  stop the site from loading its data.

Each record's train/validation side is decided by that record alone
(:mod:`site_agent.data.split`).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow.parquet as pq

from common.domain import ColumnInfo
from common.errors import InvalidSpecError
from common.schema.table import TypedTable, apply_schema
from site_agent.config import DatasetConfig

log = logging.getLogger("dpfed.site_agent")


@dataclass(frozen=True, eq=False)
class LocalDataset:
    """A loaded dataset under its declared schema. It never leaves the site.

    ``table`` holds the typed feature columns and, when the label is declared, the label's
    codes. ``labels`` are class indices ``0..C-1`` in the declared order of
    ``label_schema.categories`` (every row has one: rows without a declared class were
    dropped); when the label is not declared they are ``-1`` and no model can train on it.
    """

    name: str
    table: TypedTable
    feature_names: tuple[str, ...]
    feature_schema: tuple[ColumnInfo, ...]
    label_name: str
    label_schema: ColumnInfo | None
    labels: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def features(self) -> npt.NDArray[np.float32]:
        """The typed feature columns side by side (numbers, NaN when missing; categorical
        codes), for inspection and statistics; models train on a job's encoding instead."""
        cols = [self.table.columns[n].astype(np.float32) for n in self.feature_names]
        if not cols:
            return np.zeros((len(self), 0), dtype=np.float32)
        return np.stack(cols, axis=1)

    def take(self, index: npt.NDArray[np.int64]) -> LocalDataset:
        """The rows at ``index``, in that order."""
        return LocalDataset(
            name=self.name,
            table=self.table.take(index),
            feature_names=self.feature_names,
            feature_schema=self.feature_schema,
            label_name=self.label_name,
            label_schema=self.label_schema,
            labels=self.labels[index],
        )


def load_dataset(cfg: DatasetConfig) -> LocalDataset:
    """Read the dataset ``cfg`` names and apply its declared schema (module docstring).

    Features are ``cfg.features`` in that order, or every column except the label in source
    order.

    Raises:
        InvalidSpecError: the source is missing or unreadable, the CSV has no header, the
            label or a configured feature is not in it, or the label is listed as a feature.
            The message names the source and the columns, never a value.
    """
    frame, where = read_frame(cfg)
    header = [str(c) for c in frame.columns]
    names = feature_names(cfg, header, where)
    return typed_dataset(cfg, frame, names)


def typed_dataset(
    cfg: DatasetConfig, frame: pd.DataFrame, feature_names: Sequence[str]
) -> LocalDataset:
    """``frame`` under the declared schema of ``cfg``: typed columns, rows without a
    declared label dropped (counted in the local log only)."""
    names = tuple(feature_names)
    feature_schema = cfg.feature_schema(names)
    label_schema = cfg.label_schema()
    schema = [*feature_schema, *([label_schema] if label_schema is not None else [])]
    table = apply_schema(frame, schema)
    if label_schema is None:
        labels = np.full(table.num_rows, -1, dtype=np.int64)
    else:
        codes = np.asarray(table.columns[cfg.label], dtype=np.int64)
        keep = (codes >= 0) & (codes < len(label_schema.categories))
        dropped = int(table.num_rows - np.count_nonzero(keep))
        if dropped:
            # Local log only (never sent): how many rows had no declared class.
            log.info("dataset %s: %d rows without a declared label dropped", cfg.name, dropped)
        table = table.take(keep)
        labels = np.asarray(table.columns[cfg.label], dtype=np.int64)
    return LocalDataset(
        name=cfg.name,
        table=table,
        feature_names=names,
        feature_schema=feature_schema,
        label_name=cfg.label,
        label_schema=label_schema,
        labels=labels,
    )


def read_frame(cfg: DatasetConfig) -> tuple[pd.DataFrame, Path]:
    """The dataset's raw rows (CSV: every cell as text) and a name for its source."""
    fmt = cfg.source_format()
    if fmt != "csv":
        return _read_typed_source(cfg)
    assert cfg.path is not None
    path = Path(cfg.path)
    header = _read_header(path)
    _check_label_in(cfg, header, path)
    return next(_csv_frames(path, header, None)), path


def iter_typed_chunks(cfg: DatasetConfig, columns: Sequence[str]) -> Iterator[LocalDataset]:
    """The dataset in chunks of ``cfg.chunk_rows`` rows, each under the declared schema of
    ``columns`` (as features) and the label, with the same row filter as
    :func:`load_dataset`: memory holds one chunk. CSV and Parquet (by row groups) are
    streamed from the file; a SQL query is read whole first."""
    names = tuple(columns)
    if cfg.source_format() == "parquet":
        yield from _iter_parquet_chunks(cfg, names)
        return
    if cfg.source_format() != "csv":
        frame, where = read_frame(cfg)
        feature_names(cfg, [str(c) for c in frame.columns], where, names)
        for start in range(0, max(len(frame), 1), cfg.chunk_rows):
            yield typed_dataset(cfg, frame.iloc[start : start + cfg.chunk_rows], names)
        return
    assert cfg.path is not None
    path = Path(cfg.path)
    header = _read_header(path)
    _check_label_in(cfg, header, path)
    feature_names(cfg, header, path, names)
    for chunk in _csv_frames(path, header, cfg.chunk_rows):
        yield typed_dataset(cfg, chunk, names)


def read_header_names(cfg: DatasetConfig) -> list[str]:
    """The column names of a CSV or Parquet source, without reading its rows; the label and
    the declared columns are checked to be among them."""
    assert cfg.path is not None
    path = Path(cfg.path)
    header = (
        _parquet_file(path).schema_arrow.names
        if cfg.source_format() == "parquet"
        else (_read_header(path))
    )
    header = [str(c) for c in header]
    _check_label_in(cfg, header, path)
    return header


def _parquet_file(path: Path) -> pq.ParquetFile:
    if not path.exists():
        raise InvalidSpecError(f"The dataset file {path} does not exist.")
    try:
        # pre_buffer=False: with it, iter_batches keeps what it read (memory grew with the
        # file, ~300 MB per 2M rows x 50 columns in pyarrow 26).
        return pq.ParquetFile(path, pre_buffer=False)
    except Exception as err:
        raise InvalidSpecError(
            f"The dataset file {path} is not a readable Parquet file ({type(err).__name__})."
        ) from None


def _iter_parquet_chunks(cfg: DatasetConfig, names: tuple[str, ...]) -> Iterator[LocalDataset]:
    """A Parquet file's rows in batches of ``cfg.chunk_rows``, read by row groups (only the
    features and the label), each under the declared schema."""
    assert cfg.path is not None
    path = Path(cfg.path)
    header = read_header_names(cfg)
    feature_names(cfg, header, path, names)
    wanted = [*names, cfg.label]
    source = _parquet_file(path)
    try:
        batches = source.iter_batches(batch_size=cfg.chunk_rows, columns=wanted)
        for batch in batches:
            yield typed_dataset(cfg, batch.to_pandas(), names)
    except InvalidSpecError:
        raise
    except Exception as err:
        raise InvalidSpecError(
            f"The dataset file {path} could not be read to the end ({type(err).__name__})."
        ) from None


def _check_label_in(cfg: DatasetConfig, header: Sequence[str], where: Path) -> None:
    """The label and every column declared under ``columns`` are in the header."""
    if cfg.label not in header:
        # Only names from the site config are echoed: if the file lacks a header after all,
        # its "header" is a data row.
        raise InvalidSpecError(
            f"The label column {cfg.label!r} is not in the header of {where} "
            f"({len(header)} columns); check the dataset's `label` setting."
        )
    absent = [c for c in cfg.columns if c not in header]
    if absent:
        raise InvalidSpecError(
            f"The declared column{'s' if len(absent) > 1 else ''} "
            f"{', '.join(repr(c) for c in absent)} of dataset {cfg.name!r} "
            f"{'are' if len(absent) > 1 else 'is'} not in the header of {where}."
        )


def feature_names(
    cfg: DatasetConfig,
    header: Sequence[str],
    where: Path,
    requested: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """The feature columns (``requested``, ``cfg.features`` or all but the label), checked
    against the header. Errors name configured columns only."""
    _check_label_in(cfg, header, where)
    if requested is None and cfg.features is None:
        names = tuple(c for c in header if c != cfg.label)
    else:
        names = tuple(requested if requested is not None else cfg.features or ())
        absent = [c for c in names if c not in header]
        if absent:
            raise InvalidSpecError(
                f"The feature column{'s' if len(absent) > 1 else ''} "
                f"{', '.join(repr(c) for c in absent)} "
                f"{'are' if len(absent) > 1 else 'is'} not in the header of {where}."
            )
        if cfg.label in names:
            raise InvalidSpecError(
                f"The label column {cfg.label!r} of dataset {cfg.name!r} is also listed as a "
                "feature; a model must not see its own target."
            )
        if len(set(names)) != len(names):
            raise InvalidSpecError(f"Dataset {cfg.name!r} lists a feature column twice.")
    if not names:
        raise InvalidSpecError(f"The dataset {where} has no feature columns besides the label.")
    return names


def _read_header(path: Path) -> list[str]:
    try:
        with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as f:
            row = next(csv.reader(f), None)
    except FileNotFoundError:
        raise InvalidSpecError(f"The dataset file {path} does not exist.") from None
    except IsADirectoryError:
        raise InvalidSpecError(f"The dataset path {path} is a directory, not a CSV file.") from None
    except PermissionError:
        raise InvalidSpecError(
            f"The dataset file {path} cannot be read (permission denied)."
        ) from None
    except csv.Error:
        raise InvalidSpecError(f"The header row of dataset file {path} is not valid CSV.") from None
    if row is None or not any(cell.strip() for cell in row):
        raise InvalidSpecError(
            f"The dataset file {path} is empty; it needs a header row of column names."
        )
    names = [cell.strip() for cell in row]
    for i, name in enumerate(names, start=1):
        if not name:
            raise InvalidSpecError(f"Column {i} of the header row of {path} has no name.")
    # A header of numbers is almost surely a first data row: refuse rather than silently
    # train on a shifted table. The message says where, never what.
    numeric = [i for i, name in enumerate(names, start=1) if _is_number(name)]
    if numeric and len(numeric) == len(names):
        raise InvalidSpecError(
            f"The first row of {path} looks like data, not a header of column names; "
            "add a header row."
        )
    first: dict[str, int] = {}
    for i, name in enumerate(names, start=1):
        if name in first:
            raise InvalidSpecError(
                f"Columns {first[name]} and {i} of the header row of {path} have the same name."
            )
        first[name] = i
    return names


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_typed_source(cfg: DatasetConfig) -> tuple[pd.DataFrame, Path]:
    """Parquet (pyarrow) or a SQL query (SQLAlchemy). Errors name the source, never values."""
    fmt = cfg.source_format()
    if fmt == "parquet":
        assert cfg.path is not None
        path = Path(cfg.path)
        if not path.exists():
            raise InvalidSpecError(f"The dataset file {path} does not exist.")
        try:
            return pd.read_parquet(path), path
        except Exception as err:
            raise InvalidSpecError(
                f"The dataset file {path} is not a readable Parquet file ({type(err).__name__})."
            ) from None
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    assert cfg.url is not None and cfg.query is not None
    try:
        url = make_url(cfg.url)
    except Exception:
        raise InvalidSpecError(f"The dataset {cfg.name!r} has an invalid database URL.") from None
    where = Path(f"<{url.get_backend_name()} query of dataset {cfg.name}>")
    try:
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                frame = pd.read_sql_query(text(cfg.query), conn)
        finally:
            engine.dispose()
    except Exception as err:
        # Database errors can quote rows or parameters: report the kind of failure only.
        raise InvalidSpecError(
            f"The query of dataset {cfg.name!r} failed on {url.render_as_string(hide_password=True)} "
            f"({type(err).__name__})."
        ) from None
    return frame, where


_CSV_OPTIONS: dict[str, object] = {
    "header": 0,
    "dtype": str,
    "keep_default_na": False,
    "na_filter": False,
    "encoding": "utf-8-sig",
    "encoding_errors": "replace",
    "skipinitialspace": True,
    "on_bad_lines": "skip",
    "engine": "c",
}
"""Every cell as text; rows with more fields than the header skipped (silently, like any row
the schema drops) and bytes that are not UTF-8 replaced, so that no record can make the load
fail. pandas' own conversion errors, which quote values, cannot happen."""


def _csv_frames(path: Path, header: list[str], chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    """The one CSV reader: the file's rows under ``header``, every cell as text
    (:data:`_CSV_OPTIONS`), whole (``chunk_rows`` None) or in chunks of ``chunk_rows``."""
    try:
        if chunk_rows is None:
            yield pd.read_csv(path, names=header, **_CSV_OPTIONS)
            return
        with pd.read_csv(path, names=header, chunksize=chunk_rows, **_CSV_OPTIONS) as reader:
            yield from reader
    except pd.errors.ParserError:
        # Reachable only for damage no row-level rule covers (the parser's message may quote
        # a line, so it is not passed on).
        raise InvalidSpecError(f"The dataset file {path} is not well-formed CSV.") from None
    except pd.errors.EmptyDataError:
        raise InvalidSpecError(f"The dataset file {path} is empty.") from None
