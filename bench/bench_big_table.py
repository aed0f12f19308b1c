"""Site data larger than memory (issue 19.3): a 20-million-row × 50-feature Parquet table
trained with Poisson sampling from the encoded, memory-mapped row cache, the agent's peak
resident memory measured; steps/s against the in-memory path on a table that fits.

Each measurement runs in a fresh child process doing what the agent does (``SitePipeline``
on a ``site.yaml``: the catalog's row counts, which stream the per-record train/validation
sides; one real train task with validation metrics, whose first run builds the encoded
cache); the child reports its phases' wall times, its DP-SGD steps/s measured on
``train_local`` alone, and its peak RSS (``VmHWM``). The tables are generated in a temporary
directory with pyarrow, one row group at a time, and removed at the end.

    .venv/bin/python bench/bench_big_table.py                  # 20M rows (~4 GB), ~10 min
    .venv/bin/python bench/bench_big_table.py --rows 2000000   # a quick look

Results: ``bench/results/big_table.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL: dict[str, Any] = {"kind": "mlp", "hidden": [64]}


def generate(path: Path, rows: int, features: int, seed: int = 0) -> float:
    """A Parquet table of ``rows`` float32 features in [-1, 1] and a 0/1 label from a
    linear rule plus noise, written one row group at a time; returns seconds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    w = rng.normal(size=features).astype(np.float32)
    names = [f"f{i}" for i in range(features)]
    schema = pa.schema([(n, pa.float32()) for n in names] + [("y", pa.int8())])
    group = 500_000
    with pq.ParquetWriter(path, schema, compression="snappy") as writer:
        for start in range(0, rows, group):
            n = min(group, rows - start)
            x = rng.uniform(-1, 1, size=(n, features)).astype(np.float32)
            y = ((x @ w + rng.normal(scale=0.5, size=n)) > 0).astype(np.int8)
            cols = [pa.array(x[:, i]) for i in range(features)] + [pa.array(y)]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema), row_group_size=n)
            del x, y, cols
    return time.perf_counter() - t0


def write_site(folder: Path, table: Path, storage: str) -> Path:
    import yaml

    cfg = {
        "site_id": "bank",
        "orchestrator": "127.0.0.1:1",
        "state_dir": str(folder / "state"),
        "insecure": True,
        "datasets": [
            {
                "name": "transactions",
                "path": str(table),
                "label": "y",
                "num_classes": 2,
                "feature_bounds": [-1.0, 1.0],
                "validation_fraction": 0.1,
                "chunk_rows": 100_000,
                "storage": storage,
            }
        ],
        "policy": {"max_epsilon": 100.0, "delta": 1e-5, "min_noise_multiplier": 0.5},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(config: Path, steps: int, batch: int) -> dict[str, Any]:
    """One agent's work on the site in ``config``; what it measured."""
    import torch

    from common.domain import TaskAssignment
    from common.schema.encoding import derive_encoding
    from common.specs import OptimizerSpec
    from common.training.models import build_model, parse_model_spec
    from common.training.tensors import state_to_bytes
    from site_agent.boundary.ledger import Ledger
    from site_agent.boundary.pipeline import SitePipeline
    from site_agent.config import load_site_config
    from site_agent.trainer import TrainParams, train_local

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    cfg = load_site_config(config)
    ds = cfg.datasets[0]
    t0 = time.perf_counter()
    with Ledger(cfg.state_dir / "ledger.sqlite") as ledger:
        ex = SitePipeline(cfg, ledger)  # streams the sides (disk) or loads the table (memory)
        out["open_s"] = time.perf_counter() - t0
        (info,) = ex.dataset_infos()
        out["train_rows"], out["validation_rows"] = info.num_rows, info.num_validation_rows
        label = ds.label_schema()
        assert label is not None
        enc = derive_encoding(ds.feature_schema(info.columns), label)
        t0 = time.perf_counter()
        train_rows, _ = ex._encoded_rows(ds.name, enc)  # the cache build, if any
        out["encode_s"] = time.perf_counter() - t0
        out["rss_after_open_mb"] = vm_hwm_mb()

        model = parse_model_spec({**MODEL, "input_dim": enc.width, "num_classes": 2})
        state = build_model(model, seed=0).state_dict()
        params = TrainParams(
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            batch_size=batch,
            local_epochs=None,
            local_steps=steps,
            optimizer=OptimizerSpec(lr=0.1),
        )
        features, labels = (train_rows, None) if train_rows.maps else train_rows.arrays()
        train_local(  # warm-up (first pages, allocator)
            model_spec=model,
            global_state=state,
            features=features,
            labels=labels,
            params=TrainParams(**{**params.__dict__, "local_steps": 5}),
        )
        t0 = time.perf_counter()
        train_local(
            model_spec=model, global_state=state, features=features, labels=labels, params=params
        )
        out["train_s"] = time.perf_counter() - t0
        out["steps_per_s"] = steps / out["train_s"]

        # One real train task, with its validation metrics, through the executor.
        d = enc.to_dict()
        spec = {
            "dataset": ds.name,
            "model": MODEL,
            "rounds": 1,
            "batch_size": batch,
            "local_steps": steps,
            "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
            "encoding": {"features": d["features"], "label": d["label"]},
        }
        blob = state_to_bytes(state)
        task = TaskAssignment(
            task_id=f"t-{uuid.uuid4()}",
            job_id="job-bench",
            round=1,
            rounds=1,
            job_spec_json=json.dumps(spec),
            dataset=ds.name,
            noise_multiplier=1.0,
            model_size=len(blob),
            model_sha256=hashlib.sha256(blob).hexdigest(),
            deadline_unix=4e9,
            kind="train",
        )
        t0 = time.perf_counter()
        ex.precheck(task)
        meta, _ = ex.execute(task, blob)
        out["task_s"] = time.perf_counter() - t0
        out["task_metrics_released"] = meta.metrics is not None
    out["peak_rss_mb"] = vm_hwm_mb()
    return out


def run_child(config: Path, steps: int, batch: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(config), "--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*cmd, "--batch", str(batch)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--features", type=int, default=50)
    p.add_argument("--fit-rows", type=int, default=1_000_000, help="the table that fits")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dir", type=Path, default=None, help="temporary folder (default: /tmp)")
    p.add_argument(
        "--tables",
        type=Path,
        default=None,
        help="a folder with big.parquet and fits.parquet from an earlier run (kept)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/big_table.json")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps, args.batch)))
        return

    base = Path(tempfile.mkdtemp(prefix="dpfed-big-", dir=args.dir))
    need = int((args.rows + args.fit_rows) * args.features * 4 * 2.2)
    free = shutil.disk_usage(base).free
    if free < need:
        shutil.rmtree(base)
        raise SystemExit(f"{base} has {free / 1e9:.1f} GB free; this run needs {need / 1e9:.1f} GB")
    results: dict[str, Any] = {
        "rows": args.rows,
        "features": args.features,
        "fit_rows": args.fit_rows,
        "steps": args.steps,
        "batch_size": args.batch,
        "model": MODEL,
        "cpu_threads": 1,
        "command": "bench/bench_big_table.py " + " ".join(sys.argv[1:]),
    }
    try:
        small = base / "fits.parquet"
        if args.tables is not None and (args.tables / "fits.parquet").exists():
            small = args.tables / "fits.parquet"
        else:
            results["generate_fit_s"] = generate(small, args.fit_rows, args.features)
        for storage in ("memory", "disk"):
            cfg = write_site(base / f"fit-{storage}", small, storage)
            results[f"fit_{storage}"] = run_child(cfg, args.steps, args.batch)
            print(storage, results[f"fit_{storage}"], flush=True)
        big = base / "big.parquet"
        if args.tables is not None and (args.tables / "big.parquet").exists():
            big = args.tables / "big.parquet"
        else:
            results["generate_big_s"] = generate(big, args.rows, args.features)
        results["big_parquet_gb"] = big.stat().st_size / 1e9
        cfg = write_site(base / "big-disk", big, "disk")
        results["big_disk"] = run_child(cfg, args.steps, args.batch)
        print("big", results["big_disk"], flush=True)
        # Opened again: the cache is reused (no second pass over the table).
        results["big_disk_reopened"] = run_child(cfg, args.steps, args.batch)
        print("big reopened", results["big_disk_reopened"], flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
