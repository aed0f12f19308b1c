"""Site data larger than memory (issue 19.3): the streamed, memory-mapped row cache gives the
same rows, sides and labels as the in-memory path, is private and rebuilt only when the data
or the declarations change, and Poisson batches drawn from it are Poisson samples."""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from common.domain import TaskAssignment
from common.schema.encoding import FeatureEncoding, derive_encoding
from common.specs import OptimizerSpec
from common.training.models import build_model, parse_model_spec
from common.training.tensors import state_to_bytes
from site_agent.boundary.ledger import Ledger
from site_agent.boundary.pipeline import SitePipeline
from site_agent.config import SiteConfig, load_site_config
from site_agent.data import row_store
from site_agent.data.loading import load_dataset
from site_agent.data.row_store import DiskDataset, PoissonIndexSampler
from site_agent.data.split import SPLIT_KEY_FILE, record_digests, split_train_validation
from site_agent.trainer import TrainParams, train_local

KEY = bytes(range(32))
COLUMNS: dict[str, Any] = {
    "amount": {"type": "numeric", "min": 0, "max": 1000},
    "age": {"type": "numeric", "min": 18, "max": 100, "nullable": False},
    "home": {"type": "categorical", "categories": ["owner", "rent"]},
    "status": {"type": "categorical", "categories": ["good", "bad"]},
}


def _frame(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    amount = rng.uniform(-50, 1200, rows)
    amount[rng.random(rows) < 0.1] = np.nan
    home = rng.choice(np.array(["owner", "rent", "castle", None], dtype=object), rows)
    status = rng.choice(np.array(["good", "bad", "bad", "maybe", None], dtype=object), rows)
    return pd.DataFrame(
        {"amount": amount, "age": rng.integers(10, 110, rows), "home": home, "status": status}
    )


def _site(root: Path, frame: pd.DataFrame, **dataset: Any) -> SiteConfig:
    root.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(root / "loans.parquet", row_group_size=97)
    cfg = {
        "site_id": "bank-a",
        "orchestrator": "127.0.0.1:1",
        "state_dir": "state",
        "insecure": True,
        "datasets": [
            {
                "name": "loans",
                "path": "loans.parquet",
                "label": "status",
                "columns": COLUMNS,
                "validation_fraction": 0.25,
                "chunk_rows": 100,
                **dataset,
            }
        ],
        "policy": {"max_epsilon": 200.0, "delta": 1e-5, "min_noise_multiplier": 0.5},
    }
    (root / "site.yaml").write_text(yaml.safe_dump(cfg))
    (root / "state").mkdir(exist_ok=True)
    (root / "state" / SPLIT_KEY_FILE).write_bytes(KEY)
    return load_site_config(root / "site.yaml")


def _encoding(cfg: SiteConfig) -> FeatureEncoding:
    ds = cfg.datasets[0]
    label = ds.label_schema()
    assert label is not None
    return derive_encoding(ds.feature_schema(("amount", "age", "home")), label)


def test_streamed_cache_equals_the_in_memory_split_and_encoding(tmp_path: Path) -> None:
    cfg = _site(tmp_path, _frame(1000))
    ds_cfg = cfg.datasets[0]
    enc = _encoding(cfg)
    train, val = split_train_validation(load_dataset(ds_cfg), 0.25, KEY)

    disk = DiskDataset(ds_cfg, cfg.state_dir, KEY)
    assert (disk.num_train, disk.num_validation) == (len(train), len(val))
    disk_train, disk_val = disk.encoded(enc)
    np.testing.assert_array_equal(disk_train.x, enc.encode(train.table))
    np.testing.assert_array_equal(disk_train.y, train.labels)
    np.testing.assert_array_equal(disk_val.x, enc.encode(val.table))
    np.testing.assert_array_equal(disk_val.y, val.labels)
    assert disk_train.maps and disk_val.maps  # memory-mapped, not loaded


def test_cache_is_private_built_once_and_rebuilt_when_the_data_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _site(tmp_path, _frame(400))
    ds_cfg, enc = cfg.datasets[0], _encoding(cfg)
    first = DiskDataset(ds_cfg, cfg.state_dir, KEY)
    first.encoded(enc)
    root = cfg.state_dir / row_store.CACHE_DIR
    for p in root.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), p

    passes: list[int] = []
    real = row_store.iter_typed_chunks

    def counting(*a: Any, **k: Any) -> Any:
        passes.append(1)
        return real(*a, **k)

    monkeypatch.setattr(row_store, "iter_typed_chunks", counting)
    again = DiskDataset(ds_cfg, cfg.state_dir, KEY)
    again.encoded(enc)
    assert passes == [] and again.version == first.version

    _site(tmp_path, _frame(300, seed=1))  # new data: a new version, the old one removed
    changed = DiskDataset(ds_cfg, cfg.state_dir, KEY)
    assert changed.version != first.version and len(passes) == 1
    assert [p.name for p in (root / "loans").iterdir()] == [changed.version]
    assert changed.num_train + changed.num_validation == len(load_dataset(ds_cfg))


@pytest.mark.parametrize(("n", "q"), [(40, 0.1), (40, 0.5)])
def test_poisson_index_sampler_includes_each_row_independently_with_probability_q(
    n: int, q: float
) -> None:
    sampler = PoissonIndexSampler(n, q, torch.Generator().manual_seed(1))
    draws = 2000
    hits = np.zeros((draws, n), dtype=bool)
    for i in range(draws):
        idx = sampler.draw()
        assert np.all(np.diff(idx) > 0)  # sorted, distinct
        hits[i, idx] = True
    se = np.sqrt(q * (1 - q) / draws)
    assert np.all(np.abs(hits.mean(0) - q) < 5 * se)
    sizes = hits.sum(1)
    assert abs(sizes.var() - n * q * (1 - q)) < 0.15 * n * q * (1 - q)
    # Pairs of rows independent: P(i and j) = q².
    pair = (hits[:, 0] & hits[:, 1]).mean()
    assert abs(pair - q * q) < 5 * np.sqrt(q * q / draws)


def test_train_local_reads_memory_mapped_rows(tmp_path: Path) -> None:
    cfg = _site(tmp_path, _frame(600))
    enc = _encoding(cfg)
    train, _ = DiskDataset(cfg.datasets[0], cfg.state_dir, KEY).encoded(enc)
    spec = parse_model_spec(
        {"kind": "mlp", "hidden": [8], "input_dim": enc.width, "num_classes": 2}
    )
    params = TrainParams(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        batch_size=32,
        local_epochs=None,
        local_steps=7,
        optimizer=OptimizerSpec(lr=0.1),
    )
    state = build_model(spec, seed=0).state_dict()
    result = train_local(
        model_spec=spec, global_state=state, features=train, labels=None, params=params
    )
    assert result.steps == 7 and result.num_examples == len(train)
    assert all(bool(torch.isfinite(v).all()) for v in result.delta.values())
    assert any(float(v.abs().sum()) > 0 for v in result.delta.values())


def test_a_train_task_on_a_disk_dataset_runs_and_releases_metrics(tmp_path: Path) -> None:
    cfg = _site(tmp_path, _frame(500), storage="disk")
    enc = _encoding(cfg)
    spec_model: dict[str, Any] = {"kind": "mlp", "hidden": [8]}
    d = enc.to_dict()
    spec = {
        "dataset": "loans",
        "model": spec_model,
        "rounds": 1,
        "batch_size": 16,
        "local_steps": 3,
        "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
        "encoding": {"features": d["features"], "label": d["label"]},
        "seed": 3,
    }
    model = parse_model_spec({**spec_model, "input_dim": enc.width, "num_classes": 2})
    blob = state_to_bytes(build_model(model, seed=0).state_dict())
    task = TaskAssignment(
        task_id=f"t-{uuid.uuid4()}",
        job_id="job-1",
        round=1,
        rounds=1,
        job_spec_json=json.dumps(spec),
        dataset="loans",
        noise_multiplier=1.0,
        model_size=len(blob),
        model_sha256=hashlib.sha256(blob).hexdigest(),
        deadline_unix=4e9,
        kind="train",
    )
    in_memory = split_train_validation(load_dataset(cfg.datasets[0]), 0.25, KEY)
    with Ledger(cfg.state_dir / "ledger.sqlite") as ledger:
        ex = SitePipeline(cfg, ledger)
        (info,) = ex.dataset_infos()
        assert info.num_rows == len(in_memory[0])
        assert info.num_validation_rows == len(in_memory[1])
        ex.precheck(task)
        meta, _ = ex.execute(task, blob)
        assert meta.metrics is not None
        with pytest.raises(Exception, match="storage: disk"):
            ex.datasets.split("loans")


@pytest.mark.parametrize("key", [KEY, bytes(range(100))])
def test_record_digests_are_hmac_sha256_of_each_record(tmp_path: Path, key: bytes) -> None:
    """Against the standard library's HMAC (RFC 2104), keys shorter and longer than a block."""
    cfg = _site(tmp_path, _frame(50))
    ds = load_dataset(cfg.datasets[0])
    prefix = f"{ds.name}\x1f{','.join(ds.feature_names)}\x1f{ds.label_name}\x1f".encode()
    expected = []
    for i in range(len(ds)):
        values = [float(ds.table.columns[c][i]) for c in ds.feature_names] + [float(ds.labels[i])]
        record = np.array([0.0 if v == 0 else v for v in values], dtype="<f8")
        record[np.isnan(record)] = np.nan
        digest = hmac.new(key, prefix + record.tobytes(), hashlib.sha256).digest()
        expected.append(int.from_bytes(digest[:8], "big"))
    np.testing.assert_array_equal(record_digests(ds, key), np.array(expected, dtype=np.uint64))
