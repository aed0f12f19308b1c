"""Neighbouring datasets D and D ∪ {x}, x extreme, for every task kind the site executes.

The site's privacy invariants on raw data (issue 15): whatever one record holds (numbers at ±1e38,
±inf, beyond float32, empty cells, text in a numeric column, an undeclared label, an
undeclared category), every decision and message before the charge is the same on D and on
D ∪ {x} (the same refusals with the same words, the same charges in the ledger), every output
is finite, and with σ = 0 one DP-SGD step's clipped sum moves by at most C, i.e. the update
by at most C/(q·N) at a fixed normalisation.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from common.clustering.federated_em import FederatedEM
from common.domain import TaskAssignment, UpdateMeta
from common.errors import DpfedError
from common.schema.encoding import FeatureEncoding, derive_encoding
from common.specs import OptimizerSpec
from common.training.models import build_model, parse_model_spec
from common.training.tensors import state_from_bytes, state_to_bytes
from site_agent import trainer
from site_agent.boundary.ledger import Ledger
from site_agent.boundary.pipeline import SitePipeline
from site_agent.config import SiteConfig, load_site_config
from site_agent.data.loading import load_dataset
from site_agent.data.split import SPLIT_KEY_FILE, split_train_validation
from site_agent.trainer import TrainParams, train_local

HEADER = ["amount", "age", "home", "status"]
COLUMNS: dict[str, Any] = {
    "amount": {"type": "numeric", "min": 0, "max": 300_000},
    "age": {"type": "numeric", "min": 18, "max": 100, "nullable": False},
    "home": {"type": "categorical", "categories": ["owner", "rent", "parents"]},
    "status": {"type": "categorical", "categories": ["good", "bad"]},
}
EXTREMES: dict[str, list[str]] = {
    "huge": ["1e38", "-1e38", "owner", "good"],
    "infinite": ["inf", "-inf", "rent", "bad"],
    "beyond float32": ["-1e39", "1e400", "parents", "bad"],
    "empty cells": ["", "", "", "good"],
    "missing tokens": ["NaN", "NA", "null", "bad"],
    "text in numbers": ["SECRET-078-05", "x", "rent", " good "],
    "undeclared label": ["5", "30", "owner", "maybe"],
    "empty label": ["5", "30", "owner", ""],
    "undeclared category": ["1000", "40", "castle", "bad"],
}
KEY = bytes(range(32))
ROWS = 60


def _base_rows() -> list[list[str]]:
    rng = np.random.default_rng(7)
    homes = ["owner", "rent", "parents"]
    return [
        [
            f"{rng.uniform(0, 200_000):.2f}",
            str(int(rng.integers(18, 90))),
            homes[int(rng.integers(0, 3))],
            "good" if rng.random() < 0.6 else "bad",
        ]
        for _ in range(ROWS)
    ]


def _site(root: Path, rows: list[list[str]], **dataset: Any) -> SiteConfig:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "loans.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)
    cfg = {
        "site_id": "bank-a",
        "orchestrator": "127.0.0.1:1",
        "state_dir": "state",
        "insecure": True,
        "datasets": [
            {
                "name": "loans",
                "path": "loans.csv",
                "label": "status",
                "columns": COLUMNS,
                "validation_fraction": 0.2,
                **dataset,
            }
        ],
        "policy": {"max_epsilon": 200.0, "delta": 1e-5, "min_noise_multiplier": 0.5},
    }
    (root / "site.yaml").write_text(yaml.safe_dump(cfg))
    (root / "state").mkdir()
    (root / "state" / SPLIT_KEY_FILE).write_bytes(KEY)  # the same split key on D and D ∪ {x}
    return load_site_config(root / "site.yaml")


def _encoding(cfg: SiteConfig) -> FeatureEncoding:
    ds = cfg.datasets[0]
    label = ds.label_schema()
    assert label is not None
    return derive_encoding(ds.feature_schema(("amount", "age", "home")), label)


MODEL: dict[str, Any] = {"kind": "mlp", "hidden": [8]}


def _job_spec(enc: FeatureEncoding, **over: Any) -> dict[str, Any]:
    d = enc.to_dict()
    return {
        "dataset": "loans",
        "model": MODEL,
        "rounds": 3,
        "batch_size": 16,
        "local_steps": 3,
        "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
        "encoding": {"features": d["features"], "label": d["label"]},
        "seed": 3,
        **over,
    }


def _blob(enc: FeatureEncoding) -> bytes:
    spec = parse_model_spec({**MODEL, "input_dim": enc.width, "num_classes": enc.num_classes})
    return state_to_bytes(build_model(spec, seed=0).state_dict())


def _task(
    kind: str, blob: bytes, *, spec: dict[str, Any] | None = None, **over: Any
) -> TaskAssignment:
    fields: dict[str, Any] = {
        "task_id": f"t-{kind}-{uuid.uuid5(uuid.NAMESPACE_OID, json.dumps([kind, spec, over], sort_keys=True))}",
        "job_id": f"job-{kind}",
        "round": 3,  # the last round: it releases validation metrics too
        "rounds": 3,
        "job_spec_json": json.dumps(spec) if spec is not None else "",
        "dataset": "loans",
        "noise_multiplier": 1.0,
        "model_size": len(blob),
        "model_sha256": hashlib.sha256(blob).hexdigest(),
        "deadline_unix": 4e9,
        "kind": kind,
        **over,
    }
    return TaskAssignment(**fields)


def _tasks(cfg: SiteConfig) -> list[tuple[str, TaskAssignment, bytes]]:
    """Accepted and refused tasks of every kind, run in this order on a fresh site."""
    enc = _encoding(cfg)
    blob = _blob(enc)
    spec = _job_spec(enc)
    other_bounds = json.loads(json.dumps(spec))
    other_bounds["encoding"]["features"][1]["max"] = 99.0  # "age" declared differently
    em = FederatedEM(
        K=2,
        covariance_type="diag",
        bounds=[[0, 300_000], [18, 100]],
        max_rounds=2,
        tol=1e-3,
        noise_multiplier=5.0,
        seed=0,
    )
    evaluate = {
        "model_job_id": "job-train",
        "model": {**MODEL, "input_dim": enc.width, "num_classes": enc.num_classes},
        "dataset": "loans",
        "noise_multiplier": 5.0,
        "encoding": enc.to_dict(),
    }
    return [
        ("train", _task("train", blob, spec=spec), blob),
        ("train σ below policy", _task("train", blob, spec=spec, noise_multiplier=0.1), blob),
        ("train, schema disagrees", _task("train", blob, spec=other_bounds), blob),
        (
            "train, too big",
            _task("train", blob, spec={**spec, "model": {**MODEL, "hidden": [60_000] * 3}}),
            blob,
        ),
        ("evaluate", _task("evaluate", blob, request_json=json.dumps(evaluate)), blob),
        (
            "synth",
            _task(
                "synth",
                b"",
                request_json=json.dumps(
                    {"target_epsilon": 2.0, "columns": ["amount", "age", "home", "status"]}
                ),
            ),
            b"",
        ),
        (
            "gmm",
            _task(
                "gmm",
                b"",
                request_json=json.dumps(
                    {"columns": ["amount", "age"], "request": em.initial_request()}
                ),
            ),
            b"",
        ),
        (
            "gmm_local",
            _task(
                "gmm_local",
                b"",
                request_json=json.dumps(
                    {
                        "columns": ["amount", "age"],
                        "K": 2,
                        "covariance_type": "diag",
                        "bounds": [[0, 300_000], [18, 100]],
                        "max_rounds": 2,
                        "tol": 1e-3,
                        "noise_multiplier": 5.0,
                        "seed": 0,
                    }
                ),
            ),
            b"",
        ),
    ]


@dataclass
class Transcript:
    """What a site decided and said, task by task, and what it charged."""

    decisions: list[tuple[str, str, str]]
    charges: list[tuple[str, float, float, int]]
    catalog: list[tuple[Any, ...]]
    outputs: list[tuple[UpdateMeta, bytes]]


def _run(cfg: SiteConfig) -> Transcript:
    decisions, outputs = [], []
    with Ledger(cfg.state_dir / "ledger.sqlite") as ledger:
        ex = SitePipeline(cfg, ledger)
        catalog = [
            (i.name, i.columns, i.label, i.schema, i.label_schema, i.max_epsilon)
            for i in ex.dataset_infos()
        ]
        for what, task, blob in _tasks(cfg):
            try:
                ex.precheck(task)
                meta, out = ex.execute(task, blob)
            except DpfedError as err:
                decisions.append((what, type(err).__name__, str(err)))
                continue
            decisions.append((what, "ok", ""))
            outputs.append((meta, out))
        charges = [
            (e.kind, e.event.noise_multiplier, e.event.sample_rate, e.event.steps)
            for e in ledger.entries(dataset="loans")
        ]
    return Transcript(decisions, charges, catalog, outputs)


def _numbers(value: Any) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _numbers(v)


def _check_finite(t: Transcript) -> None:
    for meta, blob in t.outputs:
        if blob:
            for name, tensor in state_from_bytes(blob).items():
                assert torch.isfinite(tensor).all(), name
        if meta.metrics is not None:
            assert math.isfinite(meta.metrics.loss) and math.isfinite(meta.metrics.accuracy)
        if meta.result_json:
            assert all(math.isfinite(v) for v in _numbers(json.loads(meta.result_json)))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Transcript:
    t = _run(_site(tmp_path_factory.mktemp("D"), _base_rows()))
    _check_finite(t)
    return t


def test_the_suite_exercises_accepted_and_refused_tasks(base: Transcript) -> None:
    got = {what: kind for what, kind, _ in base.decisions}
    assert got == {
        "train": "ok",
        "train σ below policy": "PolicyRefusal",
        "train, schema disagrees": "InvalidSpecError",
        "train, too big": "PolicyRefusal",
        "evaluate": "ok",
        "synth": "ok",
        "gmm": "ok",
        "gmm_local": "ok",
    }, base.decisions
    messages = {what: msg for what, _, msg in base.decisions}
    assert "'age'" in messages["train, schema disagrees"]
    assert "parameters" in messages["train, too big"]
    kinds = {c[0] for c in base.charges}
    assert {"catalog", "train", "metrics", "evaluate", "synth", "gmm"} <= kinds


@pytest.mark.parametrize("extreme", list(EXTREMES))
def test_one_extreme_record_changes_nothing_before_the_charge(
    base: Transcript, tmp_path: Path, extreme: str
) -> None:
    rows = _base_rows()
    at = len(rows) // 2
    more = _run(_site(tmp_path, [*rows[:at], EXTREMES[extreme], *rows[at:]]))
    assert more.decisions == base.decisions
    # The same releases at the same σ and steps. (A train charge's sample rate is
    # batch_size / N of the site's disclosed row count, which one record moves by design.)
    assert [(k, s, n) for k, s, _, n in more.charges] == [(k, s, n) for k, s, _, n in base.charges]
    assert more.catalog == base.catalog
    _check_finite(more)
    for _, _, message in more.decisions:
        assert "SECRET" not in message and "castle" not in message and "maybe" not in message


cell = st.one_of(
    st.sampled_from(["", "NA", "nan", "inf", "-inf", "1e38", "-1e38", "1e400", "owner", "good"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=6),
)


@settings(max_examples=30, deadline=None)
@given(x=st.lists(cell, min_size=4, max_size=4))
def test_any_record_encodes_to_bounded_finite_features(
    tmp_path_factory: pytest.TempPathFactory, x: list[str]
) -> None:
    """Whatever one row holds, the other rows' encoded features and the split stay the same,
    and every encoded value is finite, in [0, 1]."""
    rows = _base_rows()
    cfg_d = _site(tmp_path_factory.mktemp("d"), rows)
    cfg_x = _site(tmp_path_factory.mktemp("dx"), [*rows, x])
    enc = _encoding(cfg_d)
    d = load_dataset(cfg_d.datasets[0])
    dx = load_dataset(cfg_x.datasets[0])
    fd, fx = enc.encode(d.table), enc.encode(dx.table)
    assert np.isfinite(fx).all() and fx.min() >= 0.0 and fx.max() <= 1.0
    assert len(dx) in (len(d), len(d) + 1)
    np.testing.assert_array_equal(fx[: len(d)], fd)
    (td, vd), (tx, vx) = (split_train_validation(s, 0.2, KEY) for s in (d, dx))
    np.testing.assert_array_equal(enc.encode(tx.table)[: len(td)], enc.encode(td.table))
    np.testing.assert_array_equal(enc.encode(vx.table)[: len(vd)], enc.encode(vd.table))


def _first_step_sum(cfg: SiteConfig, monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, float]:
    """One DP-SGD step with σ = 0 and q = 1 on the site's encoded training rows: the clipped
    gradient sum it applied (update × q·N / lr, flattened) and q·N."""
    monkeypatch.setattr(
        trainer, "_private_generator", lambda *_a, **_k: torch.Generator().manual_seed(0)
    )
    enc = _encoding(cfg)
    train = load_dataset(cfg.datasets[0])  # validation_fraction 0: every row trains
    x = enc.encode(train.table)
    spec = parse_model_spec({"kind": "linear", "input_dim": enc.width, "num_classes": 2})
    state = build_model(spec, seed=0).state_dict()
    lr, clip = 1.0, 0.5
    result = train_local(
        model_spec=spec,
        global_state=state,
        features=x,
        labels=train.labels,
        params=TrainParams(
            noise_multiplier=0.0,
            max_grad_norm=clip,
            batch_size=10_000,  # q = 1: every row in the one step, on D and on D ∪ {x}
            local_epochs=None,
            local_steps=1,
            optimizer=OptimizerSpec(name="sgd", lr=lr),
            seed=0,
        ),
    )
    assert result.steps == 1 and result.sample_rate == 1.0
    qn = result.sample_rate * len(train)
    flat = np.concatenate([v.numpy().ravel() for v in result.delta.values()])
    return -flat * qn / lr, qn


@pytest.mark.parametrize(
    "extreme", ["huge", "infinite", "beyond float32", "empty cells", "undeclared category"]
)
def test_one_record_moves_the_clipped_sum_by_at_most_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extreme: str
) -> None:
    """σ = 0: the step's clipped sum on D ∪ {x} differs from D's by at most C = 0.5, so the
    update differs by at most C/(q·N) at a fixed normalisation q·N."""
    rows = _base_rows()
    s_d, _ = _first_step_sum(_site(tmp_path / "d", rows, validation_fraction=0.0), monkeypatch)
    s_x, _ = _first_step_sum(
        _site(tmp_path / "dx", [*rows, EXTREMES[extreme]], validation_fraction=0.0), monkeypatch
    )
    assert np.isfinite(s_x).all()
    assert 0.0 < float(np.linalg.norm(s_x - s_d)) <= 0.5 + 1e-4
