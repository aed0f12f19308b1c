"""Dataset connectors: CSV, Parquet and SQL (SQLAlchemy, tested on SQLite); declared bounds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.errors import InvalidSpecError
from site_agent.boundary.ledger import Ledger
from site_agent.config import DatasetConfig, Policy
from site_agent.data.catalog import CatalogCounts, schema_of
from site_agent.data.loading import load_dataset

FRAME = pd.DataFrame(
    {
        "age": [25, 130, -3, 40],
        "income": [1000.5, 2000.0, 3000.0, 999999.0],
        "segment": ["retail", "private", "SECRET-VALUE-42", "retail"],
        "default": [0, 1, 0, 1],
    }
)
COLUMNS = {
    "age": {"type": "numeric", "min": 18, "max": 100},
    "income": {"type": "numeric", "min": 0, "max": 100000},
    "segment": {"type": "categorical", "categories": ["retail", "private"]},
    "default": {"type": "categorical", "categories": ["0", "1"]},
}


def _check(ds_features: np.ndarray) -> None:
    # clipped to the declared bounds; unknown category → the extra "other" code (2)
    np.testing.assert_allclose(ds_features[:, 0], [25, 100, 18, 40])
    np.testing.assert_allclose(ds_features[:, 1], [1000.5, 2000.0, 3000.0, 100000.0])
    np.testing.assert_allclose(ds_features[:, 2], [0, 1, 2, 0])


def test_csv_with_declared_bounds_and_categories(tmp_path: Path) -> None:
    FRAME.to_csv(tmp_path / "d.csv", index=False)
    cfg = DatasetConfig(name="d", path=tmp_path / "d.csv", label="default", columns=COLUMNS)
    ds = load_dataset(cfg)
    assert ds.feature_names == ("age", "income", "segment")
    _check(ds.features)
    assert cfg.source_format() == "csv"


def test_parquet(tmp_path: Path) -> None:
    FRAME.to_parquet(tmp_path / "d.parquet")
    cfg = DatasetConfig(name="d", path=tmp_path / "d.parquet", label="default", columns=COLUMNS)
    assert cfg.source_format() == "parquet"
    ds = load_dataset(cfg)
    _check(ds.features)
    assert ds.labels.tolist() == [0, 1, 0, 1]


def test_sql_query_over_sqlalchemy(tmp_path: Path) -> None:
    db = tmp_path / "bank.db"
    with sqlite3.connect(db) as conn:
        FRAME.to_sql("customers", conn, index=False)
    cfg = DatasetConfig(
        name="d",
        url=f"sqlite:///{db}",
        query='SELECT age, income, segment, "default" FROM customers ORDER BY rowid',
        label="default",
        columns=COLUMNS,
    )
    assert cfg.source_format() == "sql"
    _check(load_dataset(cfg).features)


def test_sql_failure_names_the_dataset_not_the_data(tmp_path: Path) -> None:
    db = tmp_path / "bank.db"
    with sqlite3.connect(db) as conn:
        FRAME.to_sql("customers", conn, index=False)
    cfg = DatasetConfig(
        name="d",
        url=f"sqlite:///{db}",
        query="SELECT * FROM customers WHERE segment = 'SECRET-VALUE-42' AND nope = 1",
        label="default",
    )
    with pytest.raises(InvalidSpecError) as info:
        load_dataset(cfg)
    assert "SECRET-VALUE-42" not in str(info.value) and "dataset 'd'" in str(info.value)


def test_text_in_an_undeclared_column_is_missing_not_an_error(tmp_path: Path) -> None:
    FRAME.to_parquet(tmp_path / "d.parquet")
    cfg = DatasetConfig(name="d", path=tmp_path / "d.parquet", label="default", num_classes=2)
    ds = load_dataset(cfg)  # segment undeclared: read as a number, so every cell is missing
    assert np.isnan(ds.table.columns["segment"]).all()
    assert ds.labels.tolist() == [0, 1, 0, 1]


def test_source_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="url and query"):
        DatasetConfig(name="d", format="sql", label="y")
    with pytest.raises(ValueError, match="needs path"):
        DatasetConfig(name="d", label="y")
    with pytest.raises(ValueError, match="categories"):
        DatasetConfig(
            name="d", path=Path("x.csv"), label="y", columns={"a": {"type": "categorical"}}
        )
    with pytest.raises(ValueError, match="below max"):
        DatasetConfig(name="d", path=Path("x.csv"), label="y", columns={"a": {"min": 2, "max": 1}})


def test_catalog_count_is_noised_charged_once_and_cached(tmp_path: Path) -> None:
    policy = Policy(max_epsilon=10, delta=1e-5, catalog_noise_multiplier=5.0)
    with Ledger(tmp_path / "ledger.sqlite") as led:
        counts = CatalogCounts(tmp_path, led, policy)
        first = counts.noisy_count("d", 1000)
        assert abs(first - 1000) < 5 * 8  # 8 standard deviations
        assert counts.noisy_count("d", 1000) == first
        # a restarted agent reads the cache: still one charge
        assert CatalogCounts(tmp_path, led, policy).noisy_count("d", 1000) == first
        assert len(led.entries(dataset="d")) == 1
        (entry,) = led.entries(dataset="d")
        assert (entry.kind, entry.event.noise_multiplier, entry.event.sample_rate) == (
            "catalog",
            5.0,
            1.0,
        )
        # the data changed: the first count stays, nothing is charged again (issue 16.3)
        assert counts.noisy_count("d", 1200) == first
        assert len(led.entries(dataset="d")) == 1


def test_catalog_noise_has_the_stated_spread(tmp_path: Path) -> None:
    policy = Policy(max_epsilon=1e3, delta=1e-5, catalog_noise_multiplier=10.0)
    with Ledger(tmp_path / "ledger.sqlite") as led:
        counts = CatalogCounts(tmp_path, led, policy)
        draws = np.array([counts.noisy_count(f"d{i}", 10_000) for i in range(300)]) - 10_000
    assert abs(draws.std() - 10.0) < 1.5 and abs(draws.mean()) < 2.5


def test_schema_comes_from_the_config_only() -> None:
    cfg = DatasetConfig(name="d", path=Path("x.csv"), label="default", columns=COLUMNS)
    schema = schema_of(cfg, ("age", "segment", "other"))
    assert [(c.name, c.type, c.min, c.max) for c in schema] == [
        ("age", "numeric", 18, 100),
        ("segment", "categorical", None, None),
        ("other", "numeric", None, None),
    ]
    assert schema[1].categories == ("retail", "private")
    label = cfg.label_schema()
    assert label is not None and label.categories == ("0", "1")
    bounded = cfg.model_copy(update={"feature_bounds": (0.0, 1.0)})
    assert schema_of(bounded, ("other",))[0].max == 1.0
