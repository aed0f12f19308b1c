"""The CSV connector loads good files and refuses bad ones without ever quoting a value."""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import numpy as np
import pytest

from common.errors import InvalidSpecError
from site_agent.config import DatasetConfig
from site_agent.data import DatasetInfo, describe, load_dataset, split_train_validation

SECRET = "SSN-078-05-1120"
"""A value that must never appear in an error message or its traceback."""


def _cfg(path: Path, **kw: object) -> DatasetConfig:
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
    assert ds.features.dtype == np.float32 and ds.features.shape == (3, 2)
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.labels, [1, 0, 2])
    expected = np.array([[30, 2.5], [41, 3.25], [52, -1000]], dtype=np.float32)
    np.testing.assert_array_equal(ds.features, expected)
    assert ds.num_classes_seen == 3
    assert len(ds) == 3


def test_configured_features_set_the_order(tmp_path: Path) -> None:
    p = _write(tmp_path, "a,b,c,label\n1,2,3,0\n4,5,6,1\n")
    ds = load_dataset(_cfg(p, features=["c", "a"]))
    assert ds.feature_names == ("c", "a")
    np.testing.assert_array_equal(ds.features, [[3, 1], [6, 4]])
    assert describe(ds) == DatasetInfo(name="loans", num_rows=2, columns=("c", "a"), label="label")


def test_labels_may_be_written_as_whole_floats_and_a_bom_is_fine(tmp_path: Path) -> None:
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffx,label\n1,1.0\n2,0\n".encode())
    np.testing.assert_array_equal(load_dataset(_cfg(p)).labels, [1, 0])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"x,label\n1,0\n{SECRET},1\n", r"feature column 'x'.*1 cell is missing, non-numeric"),
        (f"x,label\n1,0\n2,{SECRET}\n", r"label column 'label'.*must hold numbers"),
        ("x,label\n1,0\n2,0.5\n", r"whole numbers.*line 3"),
        ("x,label\n1,0\n2,-3\n", r"class indices from 0.*line 3"),
        ("x,label\n1,0\n2,7e9\n", r"class indices from 0"),
        ("x,label\n1,0\n,1\n", r"feature column 'x'.*1 cell is empty \(first at line 3\)"),
        ("x,label\n1,0\n2\n", r"label column 'label'.*empty"),
        ("x,label\ninf,0\n", r"feature column 'x'.*infinite"),
        ("x,label\n1e39,0\n", r"too large for float32 \(first at line 2\)"),
        (f"x,label\n1,0\n2,1,{SECRET}\n", r"not well-formed CSV near line 3"),
        (f'x,label\n1,0\n"{SECRET},1\n', r"not well-formed CSV|must hold numbers|empty"),
    ],
)
def test_bad_cells_are_refused_without_quoting_them(
    tmp_path: Path, text: str, expected: str
) -> None:
    msg = _error(_cfg(_write(tmp_path, text)))
    assert "data.csv" in msg
    assert re.search(expected, msg), msg


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
    assert "no feature columns" in _error(_cfg(_write(tmp_path, "label\n1\n", "only.csv")))
    assert "Columns 1 and 3" in _error(_cfg(_write(tmp_path, "a,label,a\n1,0,2\n", "dup.csv")))
    assert "Column 2" in _error(_cfg(_write(tmp_path, "a,,label\n1,2,0\n", "blank.csv")))


def test_file_level_errors(tmp_path: Path) -> None:
    assert "does not exist" in _error(_cfg(tmp_path / "absent.csv"))
    assert "is a directory" in _error(_cfg(tmp_path))
    assert "is empty" in _error(_cfg(_write(tmp_path, "", "empty.csv")))
    assert "no data rows" in _error(_cfg(_write(tmp_path, "x,label\n", "header.csv")))
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"x,label\n1,0\n" + "caf\xe9,1\n".encode("latin-1"))
    assert "not UTF-8" in _error(_cfg(latin1))


def test_split_is_deterministic_disjoint_and_complete(tmp_path: Path) -> None:
    rows = "\n".join(f"{i},{i % 3}" for i in range(50))
    ds = load_dataset(_cfg(_write(tmp_path, f"x,label\n{rows}\n")))
    train, val = split_train_validation(ds, 0.2, seed=11)
    again_train, again_val = split_train_validation(ds, 0.2, seed=11)
    np.testing.assert_array_equal(train.features, again_train.features)
    np.testing.assert_array_equal(val.labels, again_val.labels)
    assert (len(train), len(val)) == (40, 10)
    seen = np.concatenate([train.features[:, 0], val.features[:, 0]])
    assert sorted(seen.tolist()) == list(range(50))
    np.testing.assert_array_equal(train.labels, train.features[:, 0].astype(np.int64) % 3)
    assert train.num_classes_seen == val.num_classes_seen == 3
    other_train, _ = split_train_validation(ds, 0.2, seed=12)
    assert not np.array_equal(other_train.features, train.features)

    train0, val0 = split_train_validation(ds, 0.0, seed=1)
    assert (len(train0), len(val0)) == (50, 0)
    assert val0.features.shape == (0, 1)
    _, tiny = split_train_validation(ds, 0.001, seed=1)
    assert len(tiny) == 1
    with pytest.raises(InvalidSpecError, match=r"\[0, 1\)"):
        split_train_validation(ds, 1.0, seed=1)
