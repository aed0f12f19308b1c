"""Dataset connector: a site's CSV file to arrays the trainer can use.

This code runs inside the site's trust boundary and reads raw records, so it follows one
rule beyond correctness: **no error message ever contains a data value.** Messages name the
file, the column (only names taken from the site config, or positions) and the 1-based
line, which are schema, never a cell's content: errors
are logged, shown to operators and may travel to the orchestrator, and a rejected cell is
often exactly the sensitive one (a name in a numeric column, an account number pasted in
the wrong place). Errors from the CSV parser are therefore never passed on verbatim.

File format: UTF-8 text, a header row of column names, then one record per line. The label
column holds class indices (integers ``0..C-1``); feature columns hold numbers.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from common.errors import InvalidSpecError
from site_agent.config import DatasetConfig

MAX_LABEL = 1_000_000
"""Largest class index accepted (a model's ``num_classes`` is capped at 100,000 anyway)."""


@dataclass(frozen=True, eq=False)
class LocalDataset:
    """A loaded dataset. It never leaves the site.

    ``num_classes_seen`` is ``max(label) + 1``: the smallest ``num_classes`` a model needs
    so that every label present is a valid class index. It stays at the site (it is a
    function of the data) and is used only to refuse a task whose model cannot represent
    the labels.
    """

    name: str
    features: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    feature_names: tuple[str, ...]
    label_name: str
    num_classes_seen: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class DatasetInfo:
    """What the site's catalog says about a dataset: schema and size, no values.

    ``columns`` are the feature columns in the order the model sees them; ``label`` is the
    label column.
    """

    name: str
    num_rows: int
    columns: tuple[str, ...]
    label: str


def _read_header(path: Path) -> list[str]:
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as f:
            row = next(csv.reader(f), None)
    except FileNotFoundError:
        raise InvalidSpecError(f"The dataset file {path} does not exist.") from None
    except IsADirectoryError:
        raise InvalidSpecError(f"The dataset path {path} is a directory, not a CSV file.") from None
    except PermissionError:
        raise InvalidSpecError(
            f"The dataset file {path} cannot be read (permission denied)."
        ) from None
    except UnicodeDecodeError:
        raise InvalidSpecError(f"The dataset file {path} is not UTF-8 text.") from None
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


def _bad_line(mask: npt.NDArray[np.bool_]) -> int:
    """1-based line number of the first flagged record (line 1 is the header).

    Exact unless a quoted field spans lines above it; then it is the record's number + 1.
    """
    return int(np.argmax(mask)) + 2


def _cells(mask: npt.NDArray[np.bool_]) -> str:
    n = int(mask.sum())
    return "1 cell does" if n == 1 else f"{n} cells do"


def _numeric_column(
    frame: pd.DataFrame, column: str, *, path: Path, role: str
) -> npt.NDArray[np.float64]:
    raw = frame[column]
    values: npt.NDArray[np.float64] = pd.to_numeric(raw, errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    blank = raw.isna().to_numpy() | (raw.astype(str).str.strip() == "").to_numpy()
    bad = ~np.isfinite(values)
    if bad.any():
        n = int(bad.sum())
        what = "empty" if bool(blank[bad].all()) else "missing, non-numeric or infinite"
        raise InvalidSpecError(
            f"The {role} column {column!r} of {path} must hold numbers, but {n} "
            f"{'cell is' if n == 1 else 'cells are'} {what} (first at line {_bad_line(bad)})."
        )
    return values


def load_dataset(cfg: DatasetConfig) -> LocalDataset:
    """Read the CSV file ``cfg.path`` into a :class:`LocalDataset`.

    Features are ``cfg.features`` in that order, or every column except the label in file
    order. Every feature cell must be a finite number and every label a whole number in
    ``0..1_000_000``.

    Raises:
        InvalidSpecError: the file is missing, unreadable, not CSV, has no header or no
            rows, lacks a configured column, or holds a value of the wrong kind. The message
            names the file, the column and the line, never a value.
    """
    fmt = cfg.source_format()
    if fmt == "csv":
        assert cfg.path is not None
        path = Path(cfg.path)
        header = _read_header(path)
    else:
        frame, path = _read_typed_source(cfg)
        header = [str(c) for c in frame.columns]
    if cfg.label not in header:
        # Only names from the site config are echoed: if the file lacks a header after all,
        # its "header" is a data row.
        raise InvalidSpecError(
            f"The label column {cfg.label!r} is not in the header of {path} "
            f"({len(header)} columns); check the dataset's `label` setting."
        )
    if cfg.features is None:
        feature_names = tuple(c for c in header if c != cfg.label)
    else:
        feature_names = tuple(cfg.features)
        absent = [c for c in feature_names if c not in header]
        if absent:
            raise InvalidSpecError(
                f"The feature column{'s' if len(absent) > 1 else ''} "
                f"{', '.join(repr(c) for c in absent)} "
                f"{'are' if len(absent) > 1 else 'is'} not in the header of {path}."
            )
        if cfg.label in feature_names:
            raise InvalidSpecError(
                f"The label column {cfg.label!r} of dataset {cfg.name!r} is also listed as a "
                "feature; a model must not see its own target."
            )
        if len(set(feature_names)) != len(feature_names):
            raise InvalidSpecError(f"Dataset {cfg.name!r} lists a feature column twice.")
    if not feature_names:
        raise InvalidSpecError(f"The dataset file {path} has no feature columns besides the label.")

    if fmt == "csv":
        frame = _read_csv_frame(path, header)
    if len(frame) == 0:
        raise InvalidSpecError(f"The dataset {path} has a header but no data rows.")

    features = np.empty((len(frame), len(feature_names)), dtype=np.float32)
    for j, name in enumerate(feature_names):
        spec = cfg.columns.get(name)
        if spec is not None and spec.type == "categorical":
            features[:, j] = _categorical_codes(frame[name], spec.categories or ())
            continue
        column = _numeric_column(frame, name, path=path, role="feature")
        if spec is not None and spec.min is not None and spec.max is not None:
            # Declared bounds are the schema: clip silently, never report the values.
            column = np.clip(column, spec.min, spec.max)
        with np.errstate(over="ignore"):
            features[:, j] = column.astype(np.float32)
        overflow = ~np.isfinite(features[:, j])
        if overflow.any():
            raise InvalidSpecError(
                f"The feature column {name!r} of {path} holds a number too large for float32 "
                f"(first at line {_bad_line(overflow)})."
            )
    return _with_labels(cfg, frame, path, features, feature_names)


def _categorical_codes(raw: pd.Series, categories: tuple[str, ...]) -> npt.NDArray[np.float32]:
    """Index of each value in the declared categories; anything else is the extra code
    ``len(categories)`` ("other"), so an unexpected value is neither an error nor echoed."""
    index = {c: i for i, c in enumerate(categories)}
    other = float(len(categories))
    return np.array([index.get(str(v).strip(), other) for v in raw.tolist()], dtype=np.float32)


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


def _read_csv_frame(path: Path, header: list[str]) -> pd.DataFrame:
    try:
        # Every cell as text: our own checks then decide what is acceptable, and pandas'
        # own conversion errors (which quote the offending value) never happen.
        frame = pd.read_csv(
            path,
            header=0,
            names=header,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            encoding="utf-8-sig",
            skipinitialspace=True,
            engine="c",
        )
    except pd.errors.ParserError as err:
        # The parser's message may quote a line; report only its line number.
        line = _line_from_parser_error(str(err))
        where = f" near line {line}" if line is not None else ""
        raise InvalidSpecError(
            f"The dataset file {path} is not well-formed CSV{where}: a row has more fields "
            "than the header, or a quote is not closed."
        ) from None
    except UnicodeDecodeError:
        raise InvalidSpecError(f"The dataset file {path} is not UTF-8 text.") from None
    except pd.errors.EmptyDataError:
        raise InvalidSpecError(f"The dataset file {path} is empty.") from None
    return frame


def _with_labels(
    cfg: DatasetConfig,
    frame: pd.DataFrame,
    path: Path,
    features: npt.NDArray[np.float32],
    feature_names: tuple[str, ...],
) -> LocalDataset:
    raw_labels = _numeric_column(frame, cfg.label, path=path, role="label")
    not_int = raw_labels != np.floor(raw_labels)
    if not_int.any():
        raise InvalidSpecError(
            f"The label column {cfg.label!r} of {path} must hold whole numbers (class "
            f"indices), but {_cells(not_int)} not (first at line {_bad_line(not_int)})."
        )
    out_of_range = (raw_labels < 0) | (raw_labels > MAX_LABEL)
    if out_of_range.any():
        raise InvalidSpecError(
            f"The label column {cfg.label!r} of {path} must hold class indices from 0 to "
            f"{MAX_LABEL}, but {_cells(out_of_range)} not "
            f"(first at line {_bad_line(out_of_range)})."
        )
    labels = raw_labels.astype(np.int64)
    return LocalDataset(
        name=cfg.name,
        features=features,
        labels=labels,
        feature_names=feature_names,
        label_name=cfg.label,
        num_classes_seen=int(labels.max()) + 1,
    )


def _line_from_parser_error(message: str) -> int | None:
    # pandas' C parser says "... Expected 3 fields in line 7, saw 4"; keep the number only.
    marker = " in line "
    at = message.find(marker)
    if at < 0:
        return None
    digits = ""
    for ch in message[at + len(marker) :]:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def split_train_validation(
    ds: LocalDataset, fraction: float, seed: int
) -> tuple[LocalDataset, LocalDataset]:
    """Split rows into (train, validation) by a seeded permutation.

    Deterministic in ``(dataset, fraction, seed)``: every job on a dataset sees the same
    validation rows, so DP-SGD never trains on rows that an earlier job's metrics were
    computed on, and vice versa. The validation part has ``round(fraction · N)`` rows, at
    least one when ``fraction > 0`` and at most ``N - 1`` so training always keeps a row.
    Both parts keep the whole dataset's ``num_classes_seen``.

    Raises:
        InvalidSpecError: ``fraction`` is outside ``[0, 1)``.
    """
    if not (0.0 <= fraction < 1.0) or math.isnan(fraction):
        raise InvalidSpecError(f"The validation fraction must be in [0, 1), got {fraction}.")
    n = len(ds)
    n_val = round(fraction * n)
    if fraction > 0.0:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n - 1, 0))
    order = np.random.default_rng(seed).permutation(n)
    val_idx = np.sort(order[:n_val])
    train_idx = np.sort(order[n_val:])

    def part(idx: npt.NDArray[np.int64]) -> LocalDataset:
        return LocalDataset(
            name=ds.name,
            features=ds.features[idx],
            labels=ds.labels[idx],
            feature_names=ds.feature_names,
            label_name=ds.label_name,
            num_classes_seen=ds.num_classes_seen,
        )

    return part(train_idx), part(val_idx)


def describe(ds: LocalDataset) -> DatasetInfo:
    """The catalog entry for a dataset: its name, row count and column names."""
    return DatasetInfo(
        name=ds.name, num_rows=len(ds), columns=ds.feature_names, label=ds.label_name
    )
