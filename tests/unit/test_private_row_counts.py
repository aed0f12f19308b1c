"""``policy.disclose_row_counts: false`` (issue 16.9): only the catalog's DP count leaves.

On neighbouring tables D and D ∪ {x}, with the catalog's Gaussian noise coupled so that both
release the same DP count (z on D, z - 1 on D ∪ {x}: the coupling under which the Gaussian
mechanism's guarantee is stated), everything else that leaves the site, before and after the
charges, is the same: the registration, every decision, every charge (σ, q, steps), every
answer's example count and DP report. The sample rate the Poisson sampler runs at is the one
charged, ``batch_size / registered rows``, and DP-SGD averages over ``batch_size``, never over
the true count. With the default policy the registration differs (the documented assumption).
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.domain import DatasetInfo
from common.dp import noise
from common.errors import DpfedError
from site_agent import trainer
from site_agent.boundary.ledger import Ledger
from site_agent.boundary.pipeline import SitePipeline
from site_agent.config import Policy, SiteConfig, load_site_config
from site_agent.data import catalog, row_store
from site_agent.data.catalog import CatalogCounts
from tests.unit.test_neighbouring import EXTREMES, _base_rows, _site, _task, _tasks

QUANTILES = _task(
    "quantiles",
    b"",
    round=0,
    rounds=1,
    request_json=json.dumps(
        {
            "columns": [{"name": "amount", "min": 0.0, "max": 300_000.0}],
            "grid": 8,
            "noise_multiplier": 1.0,
            "delta": 1e-5,
        }
    ),
)
DP_COUNT = 70.0
"""The DP count both neighbours release under the coupling."""


@dataclass
class Seen:
    """What left the site, in order, and the sampler's own rate and normaliser."""

    registered: list[list[DatasetInfo]]
    decisions: list[tuple[str, str, str]]
    charges: list[tuple[str, float, float, int]]
    answers: list[tuple[Any, ...]]
    sampled_q: list[float]
    normalisers: list[float]


@pytest.fixture
def coupled(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The catalog's noise draws ``DP_COUNT - exact``: the same release on both neighbours."""
    fake = types.SimpleNamespace(private_numpy_rng=noise.private_numpy_rng, offset=0.0)
    fake.gaussian_np = lambda _rng, _sigma: fake.offset
    original = CatalogCounts.noisy_count

    def noisy_count(self: CatalogCounts, dataset: str, exact: int) -> float:
        fake.offset = DP_COUNT - exact
        return original(self, dataset, exact)

    monkeypatch.setattr(catalog, "noise", fake)
    monkeypatch.setattr(CatalogCounts, "noisy_count", noisy_count)
    yield


def _private(root: Path, rows: list[list[str]], **policy: Any) -> SiteConfig:
    _site(root, rows)
    raw = yaml.safe_load((root / "site.yaml").read_text())
    raw["policy"].update({"disclose_row_counts": False, **policy})
    (root / "site.yaml").write_text(yaml.safe_dump(raw))
    return load_site_config(root / "site.yaml")


def _run(cfg: SiteConfig, monkeypatch: pytest.MonkeyPatch) -> Seen:
    sampled: list[float] = []
    normalisers: list[float] = []
    loader = row_store.tensor_poisson_loader

    def recording_loader(x: Any, y: Any, sample_rate: float, generator: Any) -> Any:
        sampled.append(sample_rate)
        return loader(x, y, sample_rate, generator)

    def recording(run: Any) -> Any:
        def wrapped(*args: Any, expected: float, **kwargs: Any) -> Any:
            normalisers.append(expected)
            return run(*args, expected=expected, **kwargs)

        return wrapped

    seen = Seen([], [], [], [], sampled, normalisers)
    with monkeypatch.context() as mp, Ledger(cfg.state_dir / "ledger.sqlite") as ledger:
        mp.setattr(trainer, "tensor_poisson_loader", recording_loader)
        mp.setattr(trainer, "_run_bookkeeping", recording(trainer._run_bookkeeping))
        mp.setattr(trainer, "run_opacus", recording(trainer.run_opacus))
        ex = SitePipeline(cfg, ledger)
        seen.registered.append(ex.dataset_infos())
        for what, task, blob in [*_tasks(cfg), ("quantiles", QUANTILES, b"")]:
            try:
                ex.precheck(task)
                meta, _ = ex.execute(task, blob)
            except DpfedError as err:
                seen.decisions.append((what, type(err).__name__, str(err)))
                continue
            seen.decisions.append((what, "ok", ""))
            body = json.loads(meta.result_json) if meta.result_json else {}
            seen.answers.append(
                (
                    what,
                    meta.num_examples,
                    meta.dp_report,
                    None if meta.metrics is None else meta.metrics.num_examples,
                    body.get("rows") if isinstance(body, dict) else None,
                )
            )
            seen.registered.append(ex.dataset_infos())
        seen.charges = [
            (e.kind, e.event.noise_multiplier, e.event.sample_rate, e.event.steps)
            for e in ledger.entries(dataset="loans")
        ]
    return seen


@pytest.mark.parametrize("extra", ["ordinary", "huge"])
def test_nothing_leaving_depends_on_the_exact_count_but_through_the_dp_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coupled: None, extra: str
) -> None:
    rows = _base_rows()
    record = rows[0] if extra == "ordinary" else EXTREMES[extra]
    d = _run(_private(tmp_path / "D", rows), monkeypatch)
    d1 = _run(_private(tmp_path / "D1", [*rows, record]), monkeypatch)
    assert d.registered == d1.registered
    assert d.decisions == d1.decisions
    assert d.charges == d1.charges
    assert d.answers == d1.answers
    assert d.sampled_q == d1.sampled_q and d.normalisers == d1.normalisers
    # The suite trained, and ran every other kind, under the switch.
    ok = [w for w, verdict, _ in d.decisions if verdict == "ok"]
    assert {"train", "evaluate", "synth", "gmm", "gmm_local", "quantiles"} <= set(ok)

    info = d.registered[0][0]
    assert info.dp_num_rows == DP_COUNT
    assert info.num_validation_rows == round(DP_COUNT * 0.2)  # validation_fraction 0.2
    assert info.num_rows + info.num_validation_rows == DP_COUNT
    # The accountant's q is the sampler's q, from the registered (public) count; the noised
    # sum is averaged over the public expected batch size (batch_size 16), never q·N_true.
    train_q = [q for kind, _, q, _ in d.charges if kind == "train"]
    assert train_q == d.sampled_q == [16 / info.num_rows]
    assert d.normalisers == [pytest.approx(16.0)]
    counts = {what: n for what, n, *_ in d.answers}
    assert counts["train"] == info.num_rows
    # Each of these read every row; the evaluate answer's count was the exact one before.
    for kind in ("evaluate", "synth", "gmm", "gmm_local", "quantiles"):
        assert counts[kind] == DP_COUNT, kind
    assert [m for what, _, _, m, _ in d.answers if what == "evaluate"] == [0]  # noised metrics
    assert [rows_ for what, *_, rows_ in d.answers if what == "gmm_local"] == [DP_COUNT]


def test_by_default_the_exact_count_is_registered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coupled: None
) -> None:
    """The documented assumption the switch removes: the exact sizes leave by default."""
    rows = _base_rows()
    with Ledger(tmp_path / "l0.sqlite") as l0, Ledger(tmp_path / "l1.sqlite") as l1:
        d = SitePipeline(_site(tmp_path / "D", rows), l0).dataset_infos()[0]
        d1 = SitePipeline(_site(tmp_path / "D1", [*rows, rows[0]]), l1).dataset_infos()[0]
    assert d.dp_num_rows == d1.dp_num_rows == DP_COUNT
    assert (d.num_rows + d.num_validation_rows) + 1 == d1.num_rows + d1.num_validation_rows


def test_without_a_released_count_the_dataset_serves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DP count withheld (σ below the policy's floor): the site registers no size and
    refuses every task with the policy's reason, before anything is charged."""
    cfg = _private(tmp_path / "D", _base_rows(), catalog_noise_multiplier=0.1)
    seen = _run(cfg, monkeypatch)
    info = seen.registered[0][0]
    assert (info.num_rows, info.num_validation_rows, info.dp_num_rows) == (0, 0, -1.0)
    assert seen.charges == [] and seen.answers == []
    assert {v for _, v, _ in seen.decisions} == {"PolicyRefusal"}
    assert all("disclose_row_counts" in msg for _, _, msg in seen.decisions)


def test_exact_metrics_contradict_private_sizes() -> None:
    with pytest.raises(ValueError, match="disclose_row_counts"):
        Policy(max_epsilon=1.0, delta=1e-5, disclose_row_counts=False, allow_exact_metrics=True)
    assert Policy(max_epsilon=1.0, delta=1e-5).disclose_row_counts
