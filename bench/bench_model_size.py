"""Moving 1M, 10M and 50M-parameter models through dpfed's chunked gRPC transfer.

The real path, end to end on 127.0.0.1 (plaintext): a child process runs the orchestrator
(``start_server``) and puts tasks carrying a safetensors model blob of P float32 parameters
into its broker, as a round does; this process plays the site agent:

* **download** — ``AgentService.FetchModel`` (the servicer cuts the blob with
  ``common.rpc.serde.blob_to_chunks``), reassembled with ``serde.blob_from_chunks``, as
  ``SiteAgent._fetch`` does;
* **upload** — ``AgentService.PushUpdate`` (header, then ``blob_to_chunks`` chunks), which the
  servicer writes to a spool file (``orchestrator.core.spool``) and hands to the broker, as
  ``SiteAgent`` pushes an update;

and compares their throughput with a plain in-memory copy of the same bytes
(``bytearray(blob)``), measured in this process in the same run. Both processes sample their
resident memory every 2 ms; each transfer's *peak memory* is its process's peak RSS during
the transfer minus its RSS when the transfer started (the client already holds the update it
will push; the server holds its model in a spool file, as a round does), divided by the blob
size.

Writes ``bench/results/model_size.json`` and ``model_size.png``.
Run: ``.venv/bin/python bench/bench_model_size.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

SITE = "bench-site"
SIZES = (1_000_000, 10_000_000, 50_000_000)


def _chunk_size() -> int:
    from common.rpc import serde

    return serde.CHUNK_SIZE


def _blob(params: int) -> bytes:
    import torch

    from common.training.tensors import state_to_bytes

    cols = 1000
    rows = (params - cols) // cols
    g = torch.Generator().manual_seed(params)
    state = {
        "layer.weight": torch.randn(rows, cols, generator=g),
        "layer.bias": torch.randn(params - rows * cols, generator=g),
    }
    return state_to_bytes(state)


# ------------------------------------------------------------------ server side (child)


def serve(sizes: list[int], repeats: int, samples_out: Path) -> int:
    from common.domain import TaskAssignment
    from common.training.tensors import iter_chunks
    from orchestrator.core import spool
    from orchestrator.core.broker import Result, UpdateResult
    from orchestrator.server import start_server

    state_dir = Path(tempfile.mkdtemp(prefix="dpfed-model-size-"))
    running = start_server(listen="127.0.0.1:0", state_dir=state_dir)
    broker = running.coordinator.broker
    broker.connect(SITE)
    results: queue.Queue[Result] = queue.Queue()
    stop = threading.Event()

    def drain() -> None:  # what a round does with an update: take it off the queue
        while not stop.is_set():
            try:
                res = results.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(res, UpdateResult):
                res.payload.close()  # its spool file

    threading.Thread(target=drain, daemon=True).start()
    tasks: dict[str, dict[str, Any]] = {}
    models = []
    for p in sizes:
        blob = _blob(p)
        # As a round does: the model lies in a spool file that FetchModel reads a chunk at a time.
        model = spool.receive(
            iter_chunks(blob), size=len(blob), spool_dir=running.coordinator.store.paths.spool
        )
        models.append(model)
        del blob
        ids = []
        for _ in range(1 + repeats):  # one task to fetch from, `repeats` to push to
            tid = uuid.uuid4().hex
            task = TaskAssignment(
                task_id=tid,
                job_id="bench",
                round=1,
                rounds=1,
                job_spec_json="{}",
                dataset="bench",
                noise_multiplier=1.0,
                model_size=model.size,
                model_sha256=model.sha256,
                deadline_unix=time.time() + 3600,
            )
            broker.dispatch_into(SITE, task, model, results)
            ids.append(tid)
        tasks[str(p)] = {"task_ids": ids, "size": model.size}
    with h.RssSampler(0.002, keep=True) as rss:
        print(json.dumps({"port": running.port, "tasks": tasks}), flush=True)
        sys.stdin.read()  # the client closes stdin when it is done
    stop.set()
    samples_out.write_text(json.dumps(rss.samples))
    running.stop(0.5)
    shutil.rmtree(state_dir, ignore_errors=True)
    return 0


# ------------------------------------------------------------------ client side (this process)


def _update_stream(meta: Any, blob: bytes) -> Iterator[Any]:
    from common.rpc import serde
    from protos.dpfed.v1 import dpfed_pb2 as pb

    yield pb.UpdateChunk(header=serde.update_meta_to_proto(meta))
    for ch in serde.blob_to_chunks(blob):
        yield pb.UpdateChunk(chunk=ch)


def _meta(task_id: str, blob: bytes) -> Any:
    from common.domain import ChargedEvent, DpReport, UpdateMeta
    from common.dp.events import DpEvent

    report = DpReport(
        events=(ChargedEvent("train", DpEvent(1.0, 0.01, 1)),),
        max_grad_norm=1.0,
        delta=1e-5,
        task_epsilon=0.1,
        job_epsilon=0.1,
        dataset_epsilon=0.1,
        policy_delta=1e-5,
        accountant="prv",
    )
    return UpdateMeta(
        site_id=SITE,
        task_id=task_id,
        num_examples=100,
        dp_report=report,
        metrics=None,
        total_size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
    )


def run(sizes: list[int], repeats: int) -> dict[str, Any]:
    import grpc

    from common.rpc import serde
    from common.rpc.transport import CHANNEL_OPTIONS
    from protos.dpfed.v1 import dpfed_pb2 as pb
    from protos.dpfed.v1 import dpfed_pb2_grpc as pb_grpc

    tmp = Path(tempfile.mkdtemp(prefix="dpfed-model-size-client-"))
    samples_path = tmp / "server_rss.json"
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            "--sizes",
            *map(str, sizes),
            "--repeats",
            str(repeats),
            "--samples",
            str(samples_path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(h.ROOT),
    )
    rows: list[dict[str, Any]] = []
    try:
        assert child.stdout is not None and child.stdin is not None
        hello = json.loads(child.stdout.readline())
        address = f"127.0.0.1:{hello['port']}"
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        stub = pb_grpc.AgentServiceStub(channel)
        windows: list[dict[str, Any]] = []
        with h.RssSampler(0.002, keep=True) as rss:
            for p in sizes:
                info = hello["tasks"][str(p)]
                fetch_id, push_ids = info["task_ids"][0], info["task_ids"][1:]
                size = info["size"]

                def fetch(fetch_id: str = fetch_id, size: int = size) -> bytes:
                    chunks = stub.FetchModel(
                        pb.FetchModelRequest(site_id=SITE, task_id=fetch_id), timeout=600
                    )
                    return serde.blob_from_chunks(chunks, expected_size=size)

                payload = fetch()  # warm-up, and the bytes we will push back
                for _ in range(repeats):
                    time.sleep(0.2)
                    t0 = time.time()
                    got = fetch()
                    t1 = time.time()
                    assert len(got) == size
                    del got
                    windows.append({"params": p, "what": "download", "t0": t0, "t1": t1})
                for r in range(repeats):
                    time.sleep(0.2)
                    meta = _meta(push_ids[r], payload)
                    t0 = time.time()
                    resp = stub.PushUpdate(_update_stream(meta, payload), timeout=600)
                    t1 = time.time()
                    assert resp.accepted
                    windows.append({"params": p, "what": "upload", "t0": t0, "t1": t1})
                copies, warm = [], []
                src = np.frombuffer(payload, dtype=np.uint8)
                target = np.empty_like(src)
                np.copyto(target, src)  # touch every page once
                for _ in range(max(5, repeats)):
                    t0 = time.perf_counter()
                    c = bytearray(payload)  # a new buffer: allocation + page faults + copy
                    copies.append(time.perf_counter() - t0)
                    del c
                    t0 = time.perf_counter()
                    np.copyto(target, src)  # into an already-touched buffer: the copy alone
                    warm.append(time.perf_counter() - t0)
                del target, src
                windows.append(
                    {
                        "params": p,
                        "what": "memcpy",
                        "seconds": copies,
                        "warm_seconds": warm,
                        "size": size,
                    }
                )
                del payload
        channel.close()
        child.stdin.close()
        child.wait(timeout=60)
        server = h.RssSampler(keep=True)
        server.samples = [tuple(s) for s in json.loads(samples_path.read_text())]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    for p in sizes:
        size = next(w["size"] for w in windows if w["params"] == p and w["what"] == "memcpy")
        mb = size / 1e6
        mw = next(w for w in windows if w["params"] == p and w["what"] == "memcpy")
        memcpy_s = statistics.median(mw["seconds"])
        warm_s = statistics.median(mw["warm_seconds"])
        row: dict[str, Any] = {
            "params": p,
            "bytes": size,
            "memcpy_MBps": mb / memcpy_s,
            "memcpy_warm_MBps": mb / warm_s,
        }
        for what in ("download", "upload"):
            ws = [w for w in windows if w["params"] == p and w["what"] == what]
            secs = [w["t1"] - w["t0"] for w in ws]
            client_inc = [rss.peak_between(w["t0"], w["t1"]) - rss.at(w["t0"]) for w in ws]
            server_inc = [server.peak_between(w["t0"], w["t1"]) - server.at(w["t0"]) for w in ws]
            med = statistics.median(secs)
            row[what] = {
                "seconds": secs,
                "MBps": mb / med,
                "memcpy_over_transfer": med / memcpy_s,
                "warm_memcpy_over_transfer": med / warm_s,
                "client_peak_increase_mib": max(client_inc),
                "server_peak_increase_mib": max(server_inc),
                "client_peak_over_size": max(client_inc) * 2**20 / size,
                "server_peak_over_size": max(server_inc) * 2**20 / size,
            }
        rows.append(row)
    return {"rows": rows}


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = h.pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    mb = [r["bytes"] / 1e6 for r in rows]
    ax.plot(mb, [r["memcpy_warm_MBps"] for r in rows], "o:", label="memcpy into touched buffer")
    ax.plot(mb, [r["memcpy_MBps"] for r in rows], "o-", label="copy into a new buffer")
    ax.plot(mb, [r["download"]["MBps"] for r in rows], "s-", label="FetchModel (download)")
    ax.plot(mb, [r["upload"]["MBps"] for r in rows], "^-", label="PushUpdate (upload)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model size, MB (float32)")
    ax.set_ylabel("MB/s (median)")
    ax.set_title("Throughput, gRPC loopback vs memcpy", fontsize=10)
    ax.legend(fontsize=8)
    for what, style in (("download", "-"), ("upload", "--")):
        bx.plot(
            mb,
            [r[what]["client_peak_over_size"] for r in rows],
            "o" + style,
            label=f"{what}: client (site)",
        )
        bx.plot(
            mb,
            [r[what]["server_peak_over_size"] for r in rows],
            "s" + style,
            label=f"{what}: server (orchestrator)",
        )
    bx.set_xscale("log")
    bx.set_xlabel("model size, MB (float32)")
    bx.set_ylabel("peak RSS increase during transfer / size")
    bx.set_ylim(bottom=0)
    bx.set_title("Extra memory during one transfer", fontsize=10)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sizes", type=int, nargs="*", default=list(SIZES), help="parameters")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        return serve(args.sizes, args.repeats, args.samples)
    started = time.time()
    res = run(args.sizes, args.repeats)
    rows = res["rows"]
    print(
        f"{'params':>12}{'MB':>7}{'new-buf copy':>14}{'warm copy':>11}"
        f"{'download':>10}{'upload':>9}   transfer time / copy time   peak extra memory / size"
    )
    print(
        f"{'':>12}{'':>7}{'MB/s':>14}{'MB/s':>11}{'MB/s':>10}{'MB/s':>9}"
        f"   {'down':>6}{'up':>6} (new-buf; warm)    down c/s   up c/s"
    )
    for r in rows:
        d, u = r["download"], r["upload"]
        print(
            f"{r['params']:>12,}{r['bytes'] / 1e6:>7.0f}{r['memcpy_MBps']:>14.0f}"
            f"{r['memcpy_warm_MBps']:>11.0f}{d['MBps']:>10.0f}{u['MBps']:>9.0f}"
            f"   {d['memcpy_over_transfer']:>5.1f}x{u['memcpy_over_transfer']:>5.1f}x"
            f"; {d['warm_memcpy_over_transfer']:>5.0f}x{u['warm_memcpy_over_transfer']:>5.0f}x"
            f"   {d['client_peak_over_size']:>5.1f}/{d['server_peak_over_size']:<4.1f}"
            f"  {u['client_peak_over_size']:>5.1f}/{u['server_peak_over_size']:<4.1f}"
        )
    print("(mem c/s: peak RSS increase during the transfer / blob size, client / server)")
    payload = {
        "benchmark": "model_size",
        "command": ".venv/bin/python bench/bench_model_size.py",
        "environment": h.environment(),
        "wall_s": time.time() - started,
        "chunk_size": _chunk_size(),
        "repeats": args.repeats,
        "rows": rows,
    }
    path = h.write_json("model_size.json", payload)
    _plot(rows, h.RESULTS / "model_size.png")
    print(f"wrote {path} and model_size.png in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
