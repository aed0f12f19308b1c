"""``engine: dask`` wired into the site's handlers (issue 19.4): the catalog's DP row count,
the quantile histograms, the synthetic-data marginals and the mixture E-step statistics a
site releases are computed by ``site_agent.dask_engine`` after the release is charged, and
equal the in-process path's exactly (the same chunks' statistics summed in the same order;
the noise is zeroed to compare the values it is added to)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from common.domain import TaskAssignment
from common.dp import noise
from site_agent import dask_engine
from site_agent.boundary.ledger import Ledger
from site_agent.boundary.pipeline import SitePipeline
from site_agent.config import load_site_config
from tests.unit.dask_sites import COLUMNS, write_loans


def _write_data(root: Path, rows: int = 600) -> None:
    """``root/loans.parquet``: ``rows`` loans in row groups of 110 rows."""
    write_loans(root / "loans.parquet", rows=rows, seed=5, row_group=110)


def _executor(root: Path, data: Path, engine: str, scheduler: str) -> SitePipeline:
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "site_id": "bank-a",
        "orchestrator": "127.0.0.1:1",
        "state_dir": str(root / "state"),
        "insecure": True,
        "dask_scheduler": scheduler,
        "datasets": [
            {
                "name": "loans",
                "path": str(data / "loans.parquet"),
                "label": "status",
                "columns": COLUMNS,
                "engine": engine,
                "validation_fraction": 0.25,
            }
        ],
        "policy": {"max_epsilon": 50.0, "delta": 1e-5, "catalog_noise_multiplier": 5.0},
    }
    (root / "site.yaml").write_text(yaml.safe_dump(cfg))
    config = load_site_config(root / "site.yaml")
    return SitePipeline(config, Ledger(config.state_dir / "ledger.sqlite"))


def _task(kind: str, request: dict[str, Any], task_id: str) -> TaskAssignment:
    return TaskAssignment(
        task_id=task_id,
        job_id=f"job-{task_id}",
        round=0,
        rounds=1,
        job_spec_json="",
        dataset="loans",
        noise_multiplier=0.0,
        model_size=0,
        model_sha256="",
        deadline_unix=0.0,
        kind=kind,
        request_json=json.dumps(request),
    )


QUANTILES = {
    "columns": [
        {"name": "amount", "min": 0.0, "max": 1000.0},
        {"name": "age", "min": 18.0, "max": 100.0},
    ],
    "grid": 16,
    "noise_multiplier": 1.0,
    "delta": 1e-5,
}
SYNTH = {"target_epsilon": 3.0, "delta": 1e-5, "bins": 4}


def _zero_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    def zeros(rng: Any, std: float, size: Any = None) -> Any:
        return np.zeros(() if size is None else size, dtype=np.float64)

    monkeypatch.setattr(noise, "gaussian_np", zeros)


def _released(ex: SitePipeline) -> dict[str, Any]:
    """The values the site releases (noise zeroed): catalog count, histograms, marginals."""
    q_meta, _ = ex.execute(_task("quantiles", QUANTILES, "q"), b"")
    s_meta, _ = ex.execute(_task("synth", SYNTH, "s"), b"")
    synth = json.loads(s_meta.result_json)["measurement"]
    return {
        "count": ex.dataset_infos()[0].dp_num_rows,
        "quantiles": json.loads(q_meta.result_json)["histograms"],
        "q_rows": q_meta.num_examples,
        "marginals": [(m["columns"], m["counts"]) for m in synth["marginals"]],
        "s_rows": s_meta.num_examples,
    }


def _engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    fold = dask_engine.StatsEngine.fold

    def spy(self: dask_engine.StatsEngine, fn: Any, *args: Any) -> Any:
        calls.append(getattr(fn, "__name__", type(fn).__name__))
        return fold(self, fn, *args)

    monkeypatch.setattr(dask_engine.StatsEngine, "fold", spy)
    return calls


def test_engine_dask_releases_what_the_in_process_path_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _zero_noise(monkeypatch)
    calls = _engine_calls(monkeypatch)
    _write_data(tmp_path / "data")
    local = _released(_executor(tmp_path / "local", tmp_path / "data", "local", "synchronous"))
    assert calls == []  # engine: local never calls the engine
    dask = _released(_executor(tmp_path / "dask", tmp_path / "data", "dask", "synchronous"))
    assert calls == ["row_count", "QuantileCounts", "MarginalCounts"]
    assert dask == local
    assert local["count"] > 0 and sum(local["quantiles"]["amount"]) > 0


def test_each_release_is_charged_before_the_engine_computes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_data(tmp_path / "data")
    seen: list[tuple[str, list[str]]] = []
    fold = dask_engine.StatsEngine.fold
    ledgers: list[Ledger] = []

    def spy(self: dask_engine.StatsEngine, fn: Any, *args: Any) -> Any:
        kinds = [e.kind for e in ledgers[0].entries(dataset="loans")]
        seen.append((getattr(fn, "__name__", type(fn).__name__), kinds))
        return fold(self, fn, *args)

    monkeypatch.setattr(dask_engine.StatsEngine, "fold", spy)
    root = tmp_path / "dask"
    root.mkdir()
    # The ledger the executor will open, read by the spy in the same process.
    ex_ledger = Ledger(root / "state" / "ledger.sqlite")
    ledgers.append(ex_ledger)
    ex = _executor(root, tmp_path / "data", "dask", "synchronous")
    ex.execute(_task("quantiles", QUANTILES, "q"), b"")
    ex.execute(_task("synth", SYNTH, "s"), b"")
    ex.execute(_task("gmm", _GMM, "g"), b"")
    assert [name for name, _ in seen] == [
        "row_count",
        "QuantileCounts",
        "MarginalCounts",
        "MixtureRequestStats",
    ]
    assert [kinds for _, kinds in seen] == [
        ["catalog"],
        ["catalog", "quantiles"],
        ["catalog", "quantiles", "synth"],
        ["catalog", "quantiles", "synth", "gmm"],
    ]


def test_a_refused_release_never_runs_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.errors import InvalidSpecError

    calls = _engine_calls(monkeypatch)
    _write_data(tmp_path / "data")
    ex = _executor(tmp_path / "dask", tmp_path / "data", "dask", "synchronous")
    undeclared = {**QUANTILES, "columns": [{"name": "amount", "min": 0.0, "max": 5.0}]}
    with pytest.raises(InvalidSpecError, match="not declared"):
        ex.execute(_task("quantiles", undeclared, "q"), b"")
    assert calls == ["row_count"]  # the catalog's count only
    assert [e.kind for e in ex.ledger.entries(dataset="loans")] == ["catalog"]


@pytest.mark.slow  # 3 worker processes; test_engine_dask_releases_what_the_in_process_path_does
def test_a_local_cluster_of_worker_processes_releases_the_same_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributed = pytest.importorskip("distributed")
    _zero_noise(monkeypatch)
    _write_data(tmp_path / "data")
    local_ex = _executor(tmp_path / "local", tmp_path / "data", "local", "synchronous")
    local = _released(local_ex)
    with distributed.LocalCluster(
        n_workers=3,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        worker_dashboard_address=None,
    ) as cluster:
        ex = _executor(tmp_path / "dask", tmp_path / "data", "dask", cluster.scheduler_address)
        try:
            on_cluster = _released(ex)
            g_meta = {k: ex.execute(_task("gmm", r, f"g{k}"), b"")[0] for k, r in _REQUESTS.items()}
            client = ex.datasets.dask_client
            assert client is not None and len(client.scheduler_info()["workers"]) == 3
        finally:
            if ex.datasets.dask_client is not None:
                ex.datasets.dask_client.close()
    assert on_cluster == local
    for kind, request in _REQUESTS.items():
        l_meta, _ = local_ex.execute(_task("gmm", request, f"l{kind}"), b"")
        assert g_meta[kind].num_examples == l_meta.num_examples > 0
        got, want = (json.loads(m.result_json) for m in (g_meta[kind], l_meta))
        assert _values(got) == _values(want), kind  # every released number, bit for bit


def _em_request() -> dict[str, Any]:
    """A mixture E-step request (gmm.em): the machine's first, after an init answer."""
    from common.clustering.federated_em import FederatedEM
    from site_agent.gmm_stats import answer_request

    em = FederatedEM(
        K=2,
        covariance_type="diag",
        bounds=[[0, 1000], [18, 100]],
        max_rounds=2,
        tol=1e-3,
        noise_multiplier=5.0,
        seed=0,
    )
    rows = np.random.default_rng(0).uniform([0, 18], [1000, 100], size=(200, 2))
    answer, _ = answer_request(em.initial_request(), [rows], rng=np.random.default_rng(1))
    nxt = em.absorb([answer])
    assert nxt is not None and nxt["kind"] == "gmm.em"
    return nxt


def _values(result: dict[str, Any]) -> dict[str, Any]:
    """A mixture answer without its bookkeeping fields: the released numbers."""
    return {k: v for k, v in result.items() if k in ("stats", "logliks")}


def _agent_stream(data: Path, request: dict[str, Any]) -> dict[str, Any]:
    """The answer computed without the engine: the agent's own stream over the file's row
    groups, each cut into chunk_rows chunks (the default, 10,000: one chunk per group)."""
    from site_agent.gmm_stats import answer_request
    from site_agent.handlers.clustering import _rows

    cfg = _executor(data.parent / "stream", data, "dask", "synchronous").config.datasets[0]
    names = ("amount", "age", "home")
    parts = dask_engine.partitions(cfg)
    chunks = [
        _rows(dask_engine.load_partition(cfg, names, part), ("amount", "age")) for part in parts
    ]
    assert len(chunks) == 6 and all(len(c) <= cfg.chunk_rows for c in chunks)
    return answer_request(request, chunks, rng=np.random.default_rng(0))[0]


def test_mixture_statistics_on_the_engine_equal_the_in_process_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Init, E-step and evaluation answers: engine: local (the engine's map in the agent's
    process), engine: dask and the agent's plain stream over the same chunks release the
    same numbers bit for bit, the rows too; each charged before."""
    _zero_noise(monkeypatch)
    calls = _engine_calls(monkeypatch)
    _write_data(tmp_path / "data")
    for kind, request in _REQUESTS.items():
        out = {}
        for engine in ("local", "dask"):
            ex = _executor(tmp_path / kind / engine, tmp_path / "data", engine, "synchronous")
            meta, _ = ex.execute(_task("gmm", request, "g"), b"")
            assert [e.kind for e in ex.ledger.entries(dataset="loans")] == ["catalog", "gmm"]
            out[engine] = (meta.num_examples, _values(json.loads(meta.result_json)))
        assert out["dask"][0] == out["local"][0] > 0
        assert out["dask"][1] == out["local"][1], kind
        assert _values(_agent_stream(tmp_path / "data", request["request"])) == out["dask"][1]
    # Both engines computed every answer through the map (the catalog's counts aside).
    assert [c for c in calls if c != "row_count"] == ["MixtureRequestStats"] * 6


def test_a_local_fit_on_the_engine_equals_the_in_process_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _zero_noise(monkeypatch)
    calls = _engine_calls(monkeypatch)
    _write_data(tmp_path / "data")
    fit = {
        "columns": ["amount", "age"],
        "K": 2,
        "covariance_type": "diag",
        "bounds": [[0, 1000], [18, 100]],
        "max_rounds": 3,
        "tol": 1e-3,
        "noise_multiplier": 5.0,
        "seed": 0,
    }
    out = {}
    for engine in ("local", "dask"):
        ex = _executor(tmp_path / engine, tmp_path / "data", engine, "synchronous")
        meta, _ = ex.execute(_task("gmm_local", fit, "f"), b"")
        out[engine] = json.loads(meta.result_json)
    assert out["dask"] == out["local"] and out["local"]["rows"] > 0
    assert "MixtureRequestStats" in calls


def _init_request() -> dict[str, Any]:
    from common.clustering.federated_em import FederatedEM

    em = FederatedEM(
        K=2,
        covariance_type="diag",
        bounds=[[0, 1000], [18, 100]],
        max_rounds=2,
        tol=1e-3,
        noise_multiplier=5.0,
        seed=0,
    )
    return em.initial_request()


def _eval_request() -> dict[str, Any]:
    em = _em_request()
    return {
        "kind": "gmm.eval",
        **{k: v for k, v in em.items() if k not in ("kind", "loglik_weight")},
    }


_GMM: dict[str, Any] = {"columns": ["amount", "age"], "request": _em_request()}
_REQUESTS: dict[str, dict[str, Any]] = {
    "init": {"columns": ["amount", "age"], "request": _init_request()},
    "em": _GMM,
    "eval": {"columns": ["amount", "age"], "request": _eval_request()},
}
