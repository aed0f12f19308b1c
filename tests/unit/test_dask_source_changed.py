"""``engine: dask`` refuses to compute on files other than those it was given: a Parquet file
replaced, rewritten in place, or a folder's file replaced, added or removed, is refused with
the in-agent path's message before any statistic is computed and without reading a row; an
untouched dataset is computed as before."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from common.errors import InvalidSpecError
from site_agent import dask_engine
from site_agent.config import DatasetConfig
from site_agent.data.loading import LocalDataset
from tests.unit.dask_sites import COLUMNS, write_loans
from tests.unit.test_dask_wiring import QUANTILES, _executor, _task, _write_data

NAMES = ("amount", "age", "home")
CHANGED = r"The dataset 'loans' changed since (this task|the site agent) started.*restart the agent"


def _cfg(path: Path) -> DatasetConfig:
    return DatasetConfig.model_validate(
        {
            "name": "loans",
            "path": str(path),
            "format": "parquet",
            "label": "status",
            "columns": COLUMNS,
        }
    )


def _replace(path: Path, rows: int, seed: int) -> None:
    """``path`` replaced the way a writer swaps a file in: a new file renamed over it."""
    tmp = path.with_name(f".{path.name}.new")
    write_loans(tmp, rows=rows, seed=seed, row_group=70)
    os.replace(tmp, path)


class _Reads:
    """Counts the row groups read and the statistics computed (the spies of a test)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.row_groups = 0
        self.maps = 0
        load = dask_engine.load_partition

        def counted(*args: Any) -> LocalDataset:
            self.row_groups += 1
            return load(*args)

        monkeypatch.setattr(dask_engine, "load_partition", counted)

    def row_count(self, ds: LocalDataset) -> int:
        self.maps += 1
        return len(ds)


def _modifications() -> dict[str, Any]:
    def replaced(path: Path) -> None:
        _replace(path, rows=400, seed=9)

    def same_rows_replaced(path: Path) -> None:
        _replace(path, rows=300, seed=1)  # the very rows it held, in a new file

    def rewritten_in_place(path: Path) -> None:
        ino = path.stat().st_ino
        write_loans(path, rows=400, seed=9, row_group=70)
        assert path.stat().st_ino == ino

    def footer_changed_same_size_and_mtime(path: Path) -> None:
        """A byte of the footer changed in place, size and mtime put back: only the footer's
        digest tells."""
        st = path.stat()
        data = bytearray(path.read_bytes())
        footer_len = int.from_bytes(data[-8:-4], "little")
        data[-8 - footer_len // 2] ^= 0xFF
        with path.open("r+b") as f:
            f.write(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        now = path.stat()
        assert (now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)

    def removed(path: Path) -> None:
        path.unlink()

    return {
        f.__name__: f
        for f in (
            replaced,
            same_rows_replaced,
            rewritten_in_place,
            footer_changed_same_size_and_mtime,
            removed,
        )
    }


MODIFICATIONS = _modifications()


def test_an_untouched_file_is_computed_every_time(tmp_path: Path) -> None:
    write_loans(tmp_path / "loans.parquet", rows=300, seed=1, row_group=70)
    cfg = _cfg(tmp_path / "loans.parquet")
    engine = dask_engine.StatsEngine(cfg, NAMES, None)
    first = engine.fold(dask_engine.row_count, 0)
    assert first == engine.fold(dask_engine.row_count, 0) > 0
    engine.check_source()
    # Reading it (the agent's own loads do) changes nothing either.
    dask_engine.local_partials(cfg, NAMES, dask_engine.row_count)
    assert engine.fold(dask_engine.row_count, 0) == first


@pytest.mark.parametrize("modify", MODIFICATIONS.values(), ids=MODIFICATIONS.keys())
def test_a_modified_file_is_refused_before_any_statistic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modify: Any
) -> None:
    path = tmp_path / "loans.parquet"
    write_loans(path, rows=300, seed=1, row_group=70)
    engine = dask_engine.StatsEngine(_cfg(path), NAMES, None)
    reads = _Reads(monkeypatch)
    modify(path)
    with pytest.raises(InvalidSpecError, match=CHANGED):
        engine.fold(reads.row_count, 0)
    assert (reads.row_groups, reads.maps) == (0, 0)


def test_the_start_up_version_refuses_when_the_engine_is_built(tmp_path: Path) -> None:
    """Given the version the agent counted, a change is refused when the handler builds its
    engine, before the release is charged."""
    path = tmp_path / "loans.parquet"
    write_loans(path, rows=300, seed=1, row_group=70)
    cfg = _cfg(path)
    counted = dask_engine.source_version(cfg)
    assert dask_engine.StatsEngine(cfg, NAMES, None, version=counted).fold(dask_engine.row_count, 0)
    _replace(path, rows=400, seed=9)
    with pytest.raises(InvalidSpecError, match="changed since the site agent started"):
        dask_engine.StatsEngine(cfg, NAMES, None, version=counted)


def _folder(root: Path) -> Path:
    for i in range(3):
        write_loans(root / f"part-{i}.parquet", rows=120, seed=i, row_group=50)
    return root


def _folder_changes() -> dict[str, Any]:
    def one_file_replaced(root: Path) -> None:
        _replace(root / "part-1.parquet", rows=120, seed=7)

    def one_file_rewritten(root: Path) -> None:
        write_loans(root / "part-2.parquet", rows=100, seed=7, row_group=50)

    def a_file_added(root: Path) -> None:
        write_loans(root / "part-3.parquet", rows=10, seed=7, row_group=50)

    def a_file_removed(root: Path) -> None:
        (root / "part-0.parquet").unlink()

    def every_file_removed(root: Path) -> None:
        for f in root.glob("*.parquet"):
            f.unlink()

    return {
        f.__name__: f
        for f in (
            one_file_replaced,
            one_file_rewritten,
            a_file_added,
            a_file_removed,
            every_file_removed,
        )
    }


FOLDER_CHANGES = _folder_changes()


@pytest.mark.parametrize("change", FOLDER_CHANGES.values(), ids=FOLDER_CHANGES.keys())
def test_a_changed_folder_is_refused_and_an_untouched_one_computed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Any
) -> None:
    root = _folder(tmp_path / "loans")
    engine = dask_engine.StatsEngine(_cfg(root), NAMES, None)
    # Non-Parquet files of the folder are not the dataset's.
    (root / "notes.txt").write_text("not data")
    local = dask_engine.local_partials(_cfg(root), NAMES, dask_engine.row_count)
    assert engine.fold(dask_engine.row_count, 0) == dask_engine.fold(local, 0) > 0
    reads = _Reads(monkeypatch)
    change(root)
    with pytest.raises(InvalidSpecError, match=CHANGED):
        engine.fold(reads.row_count, 0)
    assert (reads.row_groups, reads.maps) == (0, 0)


def test_a_file_replaced_while_the_workers_read_it_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check after the map: a replacement during the computation discards its result."""
    path = tmp_path / "loans.parquet"
    write_loans(path, rows=300, seed=1, row_group=70)
    engine = dask_engine.StatsEngine(_cfg(path), NAMES, None)
    seen: list[int] = []

    def replacing(ds: LocalDataset) -> int:
        if not seen:
            _replace(path, rows=400, seed=9)
        seen.append(len(ds))
        return len(ds)

    with pytest.raises(InvalidSpecError, match=CHANGED):
        engine.fold(replacing, 0)
    assert seen  # it had started


class _CountingClient:
    """A ``distributed.Client`` whose task submissions are counted."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return self.client.submit(*args, **kwargs)

    def gather(self, futures: Any) -> Any:
        return self.client.gather(futures)


def test_a_local_dask_cluster_computes_an_untouched_file_and_refuses_a_replaced_one(
    tmp_path: Path,
) -> None:
    distributed = pytest.importorskip("distributed")
    path = tmp_path / "loans.parquet"
    write_loans(path, rows=300, seed=1, row_group=70)
    cfg = _cfg(path)
    local = dask_engine.fold(dask_engine.local_partials(cfg, NAMES, dask_engine.row_count), 0)
    with (
        distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,  # in-process workers: no network, quick to start
            dashboard_address=None,
            worker_dashboard_address=None,
        ) as cluster,
        dask_engine.connect(cluster.scheduler_address) as client,
    ):
        counting = _CountingClient(client)
        engine = dask_engine.StatsEngine(cfg, NAMES, counting)
        assert engine.fold(dask_engine.row_count, 0) == local > 0
        submitted = counting.submitted
        assert submitted == len(dask_engine.partitions(cfg)) > 1
        _replace(path, rows=400, seed=9)
        with pytest.raises(InvalidSpecError, match=CHANGED):
            engine.fold(dask_engine.row_count, 0)
        assert counting.submitted == submitted  # no task sent to the cluster


def test_a_site_refuses_a_release_whose_file_changed_after_its_charge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the site's pipeline: the file replaced once the quantiles were charged is
    refused (the charge stays: an over-count, never an under-count); nothing is released."""
    _write_data(tmp_path / "data")
    ex = _executor(tmp_path / "site", tmp_path / "data", "dask", "synchronous")
    fold = dask_engine.StatsEngine.fold

    def replaced_first(self: dask_engine.StatsEngine, fn: Any, *args: Any) -> Any:
        if isinstance(fn, dask_engine.QuantileCounts):
            _write_data(tmp_path / "data", rows=400)
        return fold(self, fn, *args)

    monkeypatch.setattr(dask_engine.StatsEngine, "fold", replaced_first)
    try:
        with pytest.raises(InvalidSpecError, match=CHANGED):
            ex.execute(_task("quantiles", QUANTILES, "q"), b"")
        assert [e.kind for e in ex.ledger.entries(dataset="loans")] == ["catalog", "quantiles"]
    finally:
        ex.ledger.close()


def test_a_site_refuses_a_file_replaced_after_start_up(tmp_path: Path) -> None:
    _write_data(tmp_path / "data")
    ex = _executor(tmp_path / "site", tmp_path / "data", "dask", "synchronous")
    try:
        assert ex.dataset_infos()[0].num_rows > 0  # the catalog, counted at start-up
        _write_data(tmp_path / "data", rows=400)
        with pytest.raises(InvalidSpecError, match="changed since the site agent started"):
            meta, _ = ex.execute(_task("quantiles", QUANTILES, "q"), b"")
            json.loads(meta.result_json)
        # Refused when the task's engine is set up, before its charge.
        assert [e.kind for e in ex.ledger.entries(dataset="loans")] == ["catalog"]
    finally:
        ex.ledger.close()
