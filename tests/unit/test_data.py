"""The connector applies the declared schema silently to every row; only configuration
errors raise, and they never quote a value. The split is stable per record."""

from __future__ import annotations

import stat
import traceback
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidSpecError
from site_agent.config import DatasetConfig
from site_agent.data.loading import LocalDataset, load_dataset
from site_agent.data.split import split_key, split_train_validation

SECRET = "SSN-078-05-1120"
"""A value that must never appear in an error message or its traceback."""

KEY = b"k" * 32


def _cfg(path: Path, **kw: object) -> DatasetConfig:
    kw.setdefault("num_classes", 3)
    return DatasetConfig.model_validate({"name": "loans", "path": path, "label": "label", **kw})


def _write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _error(cfg: DatasetConfig) -> str:
    with pytest.raises(InvalidSpecError) as info:
        load_dataset(cfg)
    rendered = "".join(traceback.format_exception(info.value))
    assert SECRET not in rendered
    assert "078" not in str(info.value)
    return str(info.value)


def test_loads_features_and_labels(tmp_path: Path) -> None:
    p = _write(tmp_path, "age,label,income\n30,1,2.5\n41,0, 3.25\n 52,2,-1e3\n")
    ds = load_dataset(_cfg(p))
    assert ds.name == "loans"
    assert ds.feature_names == ("age", "income")
    assert ds.label_name == "label"
    assert ds.label_schema is not None and ds.label_schema.categories == ("0", "1", "2")
    assert ds.features.dtype == np.float32 and ds.features.shape == (3, 2)
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.labels, [1, 0, 2])
    expected = np.array([[30, 2.5], [41, 3.25], [52, -1000]], dtype=np.float32)
    np.testing.assert_array_equal(ds.features, expected)
    assert len(ds) == 3
    assert not hasattr(ds, "num_classes_seen")


def test_string_labels_declared_as_categories(tmp_path: Path) -> None:
    p = _write(tmp_path, "x,status\n1,good\n2, bad\n3,unknown\n4,\n5,NA\n6,good\n")
    cfg = DatasetConfig.model_validate(
        {
            "name": "credit",
            "path": p,
            "label": "status",
            "columns": {"status": {"type": "categorical", "categories": ["good", "bad"]}},
        }
    )
    ds = load_dataset(cfg)
    # Rows whose label is missing or not a declared class are dropped, silently.
    np.testing.assert_array_equal(ds.labels, [0, 1, 0])
    np.testing.assert_array_equal(ds.table.columns["x"], [1, 2, 6])


def test_configured_features_set_the_order(tmp_path: Path) -> None:
    p = _write(tmp_path, "a,b,c,label\n1,2,3,0\n4,5,6,1\n")
    ds = load_dataset(_cfg(p, features=["c", "a"]))
    assert ds.feature_names == ("c", "a")
    np.testing.assert_array_equal(ds.features, [[3, 1], [6, 4]])


def test_labels_may_be_written_as_whole_floats_and_a_bom_is_fine(tmp_path: Path) -> None:
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffx,label\n1,1.0\n2,0\n".encode())
    np.testing.assert_array_equal(load_dataset(_cfg(p)).labels, [1, 0])


def test_an_undeclared_label_keeps_every_row_and_no_class(tmp_path: Path) -> None:
    p = _write(tmp_path, "x,label\n1,0\n2,zzz\n")
    ds = load_dataset(_cfg(p, num_classes=None))
    assert ds.label_schema is None
    np.testing.assert_array_equal(ds.labels, [-1, -1])


BAD_CELLS = [
    f"{SECRET},1",  # text in a numeric column: missing
    f"2,{SECRET}",  # an undeclared label: dropped
    "3,0.5",
    "4,-3",
    "5,7e9",
    ",1",  # an empty cell: missing
    "6",  # a short row: its label is empty, dropped
    "inf,0",
    "-inf,0",
    "1e39,1",
    "-1e400,2",
    f"7,1,{SECRET}",  # a row with more fields than the header: skipped
    "NaN,2",
]


def test_bad_cells_are_handled_silently_by_the_schema(tmp_path: Path) -> None:
    text = "x,label\n" + "\n".join(["1,0", *BAD_CELLS, "8,1"]) + "\n"
    ds = load_dataset(_cfg(_write(tmp_path, text), feature_bounds=[0, 10]))
    x = ds.table.columns["x"]
    np.testing.assert_array_equal(ds.labels, [0, 1, 1, 0, 0, 1, 2, 2, 1])
    np.testing.assert_array_equal(x[[0, 3, 4, 5, 6, 8]], [1, 10, 0, 10, 0, 8])
    assert np.isnan(x[[1, 2, 7]]).all()


def test_unbounded_features_stay_within_float32(tmp_path: Path) -> None:
    ds = load_dataset(_cfg(_write(tmp_path, "x,label\n1e39,0\n-inf,1\n")))
    assert np.isfinite(ds.features).all()


def test_bytes_that_are_not_utf8_are_replaced(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"x,label\n1,0\n" + "caf\xe9,1\n".encode("latin-1"))
    ds = load_dataset(_cfg(latin1))
    np.testing.assert_array_equal(ds.labels, [0, 1])
    assert np.isnan(ds.table.columns["x"][1])


def test_a_file_without_a_header_is_refused_without_quoting_its_first_row(
    tmp_path: Path,
) -> None:
    msg = _error(_cfg(_write(tmp_path, "1,2,0\n3,4,1\n")))
    assert "looks like data" in msg
    # A headerless first row with text in it is taken as a header: the label is then
    # missing, and the message must still not echo the "column names" (they are data).
    msg = _error(_cfg(_write(tmp_path, f"{SECRET},2,0\n3,4,1\n")))
    assert "label column 'label' is not in the header" in msg


def test_schema_errors_name_the_file_and_column(tmp_path: Path) -> None:
    p = _write(tmp_path, "a,b,label\n1,2,0\n")
    assert "'missing'" in _error(_cfg(p, features=["a", "missing"]))
    assert "also listed as a feature" in _error(_cfg(p, features=["a", "label"]))
    assert "twice" in _error(_cfg(p, features=["a", "a"]))
    assert "'target' is not in the header" in _error(
        DatasetConfig(name="loans", path=p, label="target")
    )
    assert "declared column 'zz' of dataset 'loans' is not in the header" in _error(
        _cfg(p, columns={"zz": {"min": 0, "max": 1}})
    )
    assert "no feature columns" in _error(_cfg(_write(tmp_path, "label\n1\n", "only.csv")))
    assert "Columns 1 and 3" in _error(_cfg(_write(tmp_path, "a,label,a\n1,0,2\n", "dup.csv")))
    assert "Column 2" in _error(_cfg(_write(tmp_path, "a,,label\n1,2,0\n", "blank.csv")))


def test_file_level_errors(tmp_path: Path) -> None:
    assert "does not exist" in _error(_cfg(tmp_path / "absent.csv"))
    assert "is a directory" in _error(_cfg(tmp_path))
    assert "is empty" in _error(_cfg(_write(tmp_path, "", "empty.csv")))
    # A header without rows is a dataset of no rows, not an error.
    assert len(load_dataset(_cfg(_write(tmp_path, "x,label\n", "header.csv")))) == 0


def test_declarations_are_validated() -> None:
    base = {"name": "d", "path": "x.csv", "label": "y"}
    with pytest.raises(ValueError, match="must be declared categorical"):
        DatasetConfig.model_validate({**base, "columns": {"y": {"min": 0, "max": 1}}})
    with pytest.raises(ValueError, match="drop num_classes"):
        DatasetConfig.model_validate(
            {
                **base,
                "num_classes": 2,
                "columns": {"y": {"type": "categorical", "categories": ["a", "b"]}},
            }
        )
    with pytest.raises(ValueError, match="float32"):
        DatasetConfig.model_validate({**base, "feature_bounds": [0, 1e39]})
    with pytest.raises(ValueError, match="below max"):
        DatasetConfig.model_validate({**base, "feature_bounds": [1, 1]})
    cfg = DatasetConfig.model_validate(
        {
            **base,
            "feature_bounds": [0, 16],
            "num_classes": 10,
            "columns": {"c": {"min": 1, "max": 2}},
        }
    )
    a, c = cfg.feature_schema(["a", "c"])
    assert (a.min, a.max, a.nullable) == (0, 16, False)
    assert (c.min, c.max, c.nullable) == (1, 2, True)
    assert cfg.undeclared(["a", "c"]) == []
    bare = DatasetConfig.model_validate(base)
    assert bare.undeclared(["a"]) == ["a", "y"]


def _dataset(tmp_path: Path, rows: list[tuple[float, int]], name: str = "d.csv") -> LocalDataset:
    text = "x,label\n" + "".join(f"{x!r},{y}\n" for x, y in rows)
    return load_dataset(_cfg(_write(tmp_path, text, name)))


def test_split_is_keyed_deterministic_disjoint_and_complete(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, [(float(i), i % 3) for i in range(400)])
    train, val = split_train_validation(ds, 0.2, KEY)
    again_train, again_val = split_train_validation(ds, 0.2, KEY)
    np.testing.assert_array_equal(train.features, again_train.features)
    np.testing.assert_array_equal(val.labels, again_val.labels)
    assert 40 < len(val) < 120  # Binomial(400, 0.2): mean 80, sd 8
    seen = np.concatenate([train.features[:, 0], val.features[:, 0]])
    assert sorted(seen.tolist()) == list(range(400))
    np.testing.assert_array_equal(train.labels, train.features[:, 0].astype(np.int64) % 3)
    other_train, _ = split_train_validation(ds, 0.2, b"another key, another split.......")
    assert not np.array_equal(other_train.features, train.features)

    train0, val0 = split_train_validation(ds, 0.0, KEY)
    assert (len(train0), len(val0)) == (400, 0)
    assert val0.features.shape == (0, 1)
    with pytest.raises(InvalidSpecError, match=r"\[0, 1\)"):
        split_train_validation(ds, 1.0, KEY)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(-5, 5).map(float), st.integers(0, 2)), min_size=1, max_size=40
    ),
    extra=st.tuples(st.floats(allow_nan=True, allow_infinity=True), st.integers(0, 2)),
    at=st.integers(0, 40),
)
def test_one_record_moves_no_other_record(
    tmp_path_factory: pytest.TempPathFactory,
    rows: list[tuple[float, int]],
    extra: tuple[float, int],
    at: int,
) -> None:
    """split(D ∪ {x}) restricted to D equals split(D), wherever x sits in the file."""
    tmp = tmp_path_factory.mktemp("split")
    rows = [(x + i / 100, y) for i, (x, y) in enumerate(rows)]  # distinct records
    with_x = [*rows[:at], extra, *rows[at:]]
    base_train, base_val = split_train_validation(_dataset(tmp, rows), 0.3, KEY)
    more_train, more_val = split_train_validation(_dataset(tmp, with_x, "more.csv"), 0.3, KEY)

    def records(ds: LocalDataset) -> set[tuple[float, int]]:
        return set(zip(ds.table.columns["x"].tolist(), ds.labels.tolist(), strict=True))

    base = records(base_train) | records(base_val)
    assert records(more_train) & base == records(base_train)
    assert records(more_val) & base == records(base_val)


def test_split_key_is_created_once_and_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = split_key(state)
    assert len(key) == 32 and split_key(state) == key
    mode = stat.S_IMODE((state / "split.key").stat().st_mode)
    assert mode == 0o600
