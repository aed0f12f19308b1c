"""Uploads wait for room in their round, so queued models do not grow with the site count."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from common.domain import TaskAssignment, UpdateMeta
from common.errors import NotFoundError, TryLaterError
from orchestrator.core.broker import Broker, Result


def _task(i: int) -> TaskAssignment:
    return TaskAssignment(
        task_id=f"t{i}",
        job_id="j",
        round=1,
        rounds=1,
        job_spec_json="{}",
        dataset="d",
        noise_multiplier=1.0,
        model_size=0,
        model_sha256="",
        deadline_unix=0.0,
    )


def _dispatch(
    broker: Broker, n: int, model: bytes = b""
) -> tuple[queue.Queue[Result], list[TaskAssignment]]:
    """Sites s0…s{n-1} connected, each sent its task t{i} of one round (one results queue)."""
    results: queue.Queue[Result] = queue.Queue()
    tasks = []
    for i in range(n):
        broker.connect(f"s{i}")
        t = replace(_task(i), model_size=len(model))
        broker.dispatch_into(f"s{i}", t, model, results)
        tasks.append(t)
    return results, tasks


def test_an_upload_waits_while_the_round_holds_enough_unfolded_updates() -> None:
    broker = Broker()
    results, _ = _dispatch(broker, 3)
    results.put("a")  # type: ignore[arg-type]  # two results already waiting in the round
    results.put("b")  # type: ignore[arg-type]
    with pytest.raises(TryLaterError):  # held back while the round has 2 unfolded results
        broker.wait_for_capacity("s2", "t2", limit=2)
    results.get()  # the round folds one
    broker.wait_for_capacity("s2", "t2", limit=2)


def test_an_upload_for_a_finished_round_is_refused() -> None:
    broker = Broker()
    results: queue.Queue[Result] = queue.Queue()
    broker.connect("s0")
    broker.dispatch_into("s0", _task(0), b"", results)
    broker.cancel(["t0"])
    with pytest.raises(NotFoundError):
        broker.wait_for_capacity("s0", "t0", limit=1)


def test_uploads_being_read_count_against_the_limit() -> None:
    broker = Broker()
    _dispatch(broker, 3)
    t0 = broker.wait_for_capacity("s0", "t0", limit=2)
    broker.wait_for_capacity("s1", "t1", limit=2)
    with pytest.raises(TryLaterError):  # two uploads in flight, none queued yet: the third waits
        broker.wait_for_capacity("s2", "t2", limit=2)
    broker.release_capacity(t0)
    broker.wait_for_capacity("s2", "t2", limit=2)


# ------------------------------------------------------------------ downloads


def test_at_most_max_downloads_stream_at_once() -> None:
    broker = Broker()
    broker.max_downloads = 2
    _dispatch(broker, 3, b"model")
    with broker.download_slot("s0", "t0") as blob, broker.download_slot("s1", "t1"):
        assert blob.read_all() == b"model"
        assert broker.downloads_in_progress() == 2
        with pytest.raises(TryLaterError), broker.download_slot("s2", "t2"):
            pass
        assert broker.downloads_in_progress() == 2 and broker.downloads_waiting() == 1
    with broker.download_slot("s2", "t2"):
        assert broker.downloads_in_progress() == 1 and broker.downloads_waiting() == 0
    assert broker.downloads_in_progress() == 0


def test_a_download_for_a_finished_round_is_refused_and_keeps_no_place() -> None:
    broker = Broker()
    broker.max_downloads = 1
    _dispatch(broker, 2, b"m")
    broker.cancel(["t1"])
    with pytest.raises(NotFoundError), broker.download_slot("s1", "t1"):
        pass
    assert broker.downloads_in_progress() == 0 and broker.downloads_waiting() == 0


class _Context:
    """The parts of grpc.ServicerContext the agent servicer uses, without a network."""

    def __init__(self, invocation: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata: list[tuple[str, str]] = []
        self.trailing: tuple[tuple[str, str], ...] = ()
        self.invocation = invocation

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.invocation

    def set_trailing_metadata(self, md: tuple[tuple[str, str], ...]) -> None:
        self.trailing = md

    def is_active(self) -> bool:
        return True

    def send_initial_metadata(self, md: tuple[tuple[str, str], ...]) -> None:
        self.metadata.extend(md)

    def abort(self, code: object, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


def test_fetch_model_streams_to_at_most_max_downloads_sites_at_once() -> None:
    """Through the servicer: a stream that has started sending holds a slot until it ends."""
    from types import SimpleNamespace

    from common.rpc import serde
    from common.rpc.transport import RETRY_AFTER_MS
    from orchestrator.api.agent_service import AgentServicer
    from orchestrator.auth import Authorizer
    from protos.dpfed.v1 import dpfed_pb2 as pb

    broker = Broker()
    broker.max_downloads = 3
    model = bytes(range(256)) * (3 * serde.CHUNK_SIZE // 256 + 1)
    n = 8
    _dispatch(broker, n, model)
    servicer = AgentServicer(SimpleNamespace(broker=broker), Authorizer(mtls=False))  # type: ignore[arg-type]
    lock = threading.Lock()
    streaming, most = 0, 0
    got: dict[int, bytes] = {}
    refused = [0] * n
    contexts = [_Context() for _ in range(n)]

    def fetch(i: int) -> None:
        nonlocal streaming, most
        while True:  # as an agent does: ask again after the time the refusal names
            chunks = servicer.FetchModel(
                pb.FetchModelRequest(site_id=f"s{i}", task_id=f"t{i}"), contexts[i]
            )
            parts = []
            try:
                for k, ch in enumerate(chunks):
                    if k == 0:
                        with lock:
                            streaming += 1
                            most = max(most, streaming)
                    time.sleep(0.02)  # a slow reader
                    parts.append(ch)
            except RuntimeError as err:  # _Context.abort
                assert "RESOURCE_EXHAUSTED" in str(err)
                refused[i] += 1
                ((key, ms),) = contexts[i].trailing
                assert key == RETRY_AFTER_MS
                time.sleep(float(ms) / 1000)
                continue
            break
        with lock:
            streaming -= 1
        got[i] = serde.blob_from_chunks(parts)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(got) == list(range(n))
    assert all(b == model for b in got.values())
    assert most == 3
    assert sum(refused) > 0  # the others were told to come back
    assert broker.downloads_in_progress() == 0


def test_an_abandoned_download_gives_its_slot_back() -> None:
    from types import SimpleNamespace

    from orchestrator.api.agent_service import AgentServicer
    from orchestrator.auth import Authorizer
    from protos.dpfed.v1 import dpfed_pb2 as pb

    broker = Broker()
    broker.max_downloads = 1
    results: queue.Queue[Result] = queue.Queue()
    broker.connect("s0")
    broker.dispatch_into("s0", _task(0), b"x" * 1_000_000, results)
    servicer = AgentServicer(SimpleNamespace(broker=broker), Authorizer(mtls=False))  # type: ignore[arg-type]
    stream = servicer.FetchModel(pb.FetchModelRequest(site_id="s0", task_id="t0"), _Context())
    next(stream)
    assert broker.downloads_in_progress() == 1
    del stream  # gRPC drops the generator of a cancelled call
    assert broker.downloads_in_progress() == 0


# ------------------------------------------------------------------ gated uploads


def _meta(site_id: str, task_id: str, size: int) -> UpdateMeta:
    from common.domain import ChargedEvent, DpReport
    from common.dp.events import DpEvent

    return UpdateMeta(
        site_id=site_id,
        task_id=task_id,
        num_examples=10,
        dp_report=DpReport(
            events=(ChargedEvent("train", DpEvent(1.0, 0.1, 1)),),
            max_grad_norm=1.0,
            delta=1e-5,
            task_epsilon=0.1,
            job_epsilon=0.1,
            dataset_epsilon=0.1,
            policy_delta=1e-5,
            accountant="prv",
        ),
        metrics=None,
        total_size=size,
        sha256="",
    )


def test_an_upload_sends_no_bytes_until_the_round_has_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over gRPC: the agent sends its header, then holds its chunks until the orchestrator's
    go, so a waiting upload does not sit in the orchestrator's receive buffers."""
    import grpc

    from common.rpc import serde
    from common.rpc.transport import CHANNEL_OPTIONS
    from orchestrator.server import start_server
    from protos.dpfed.v1 import dpfed_pb2_grpc as pb_grpc
    from site_agent.agent import fetch_model, push_update

    running = start_server(listen="127.0.0.1:0", state_dir=tmp_path)
    try:
        broker = running.coordinator.broker
        model = b"m" * 300_000
        results, tasks = _dispatch(broker, 2, model)
        for _ in range(4):  # the round holds four unfolded results: no room for uploads
            results.put("unfolded")  # type: ignore[arg-type]
        channel = grpc.insecure_channel(running.address, options=CHANNEL_OPTIONS)
        stub = pb_grpc.AgentServiceStub(channel)
        assert fetch_model(stub, "s0", tasks[0]) == model

        delta = bytes(range(256)) * (5 * serde.CHUNK_SIZE // 256)
        sent = [0]  # chunks the agent side has handed to gRPC
        original = serde.blob_to_chunks

        def counting(data: bytes, **kw: Any) -> Iterator[Any]:
            for ch in original(data, **kw):
                sent[0] += 1
                yield ch

        monkeypatch.setattr(serde, "blob_to_chunks", counting)
        done: dict[int, Any] = {}

        def push() -> None:
            done[0] = push_update(stub, _meta("s0", "t0", len(delta)), delta)

        pushing = threading.Thread(target=push, name="push-0", daemon=True)
        pushing.start()
        time.sleep(0.5)
        assert sent[0] == 0, "a waiting upload sent chunks"
        results.get()  # the round folds one: room for one upload
        pushing.join(timeout=10)
        assert done[0].accepted
        assert sent[0] == 5  # all of them, after the go
        assert results.qsize() == 4  # full again: three unfolded and that update
        channel.close()
    finally:
        running.stop(0.2)


# ------------------------------------------------------------------ the allocator


def test_large_buffers_go_back_to_the_os_whatever_thread_allocated_them() -> None:
    """64 threads take turns holding four 4 MiB buffers at most; freed by another thread.
    With glibc's default adaptive threshold each thread's arena keeps what it freed (about
    140 MiB here); with ``return_large_buffers_to_os`` peak RSS stays near the 16 MiB alive."""
    import subprocess
    import sys

    script = r"""
import os, queue, sys, threading
from orchestrator.allocator import return_large_buffers_to_os
if not return_large_buffers_to_os():
    print("skip"); sys.exit(0)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
q, slots = queue.Queue(), threading.BoundedSemaphore(4)
base, peak = rss(), 0.0
def work():
    for _ in range(3):
        slots.acquire()
        b = bytearray(4 << 20)
        q.put(b)
        del b
ts = [threading.Thread(target=work) for _ in range(64)]
for t in ts:
    t.start()
for _ in range(64 * 3):
    b = q.get()
    peak = max(peak, rss() - base)
    del b
    slots.release()
print(peak)
"""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=120
    )
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "skip":
        pytest.skip("not glibc: mallopt unavailable")
    assert float(out.stdout) < 48, f"peak RSS +{float(out.stdout):.0f} MiB for 16 MiB alive"


def test_the_upload_limit_defaults_to_the_brokers_max_uploads() -> None:
    broker = Broker()
    broker.max_uploads = 1
    _dispatch(broker, 2)
    t0 = broker.wait_for_capacity("s0", "t0")
    with pytest.raises(TryLaterError):  # one place, taken: the second upload waits for it
        broker.wait_for_capacity("s1", "t1")
    broker.release_capacity(t0)
    broker.wait_for_capacity("s1", "t1")


@pytest.mark.parametrize("shared", [False, True])
def test_worker_threads_share_two_malloc_arenas(shared: bool) -> None:
    """glibc gives each new thread its own arena (up to 8 per core), each keeping what its
    thread allocated; ``share_malloc_arenas`` caps them at two. Counted with malloc_info."""
    import subprocess
    import sys

    script = r"""
import ctypes, os, sys, tempfile, threading
from orchestrator.allocator import share_malloc_arenas
if sys.argv[1] == "1" and not share_malloc_arenas():
    print("skip"); sys.exit(0)
hold = threading.Barrier(24)
def work():
    blocks = [bytearray(64 << 10) for _ in range(8)]  # below the mmap threshold: arenas
    hold.wait()
    del blocks
ts = [threading.Thread(target=work) for _ in range(24)]
for t in ts:
    t.start()
for t in ts:
    t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
path = tempfile.mktemp()
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, f)
libc.fclose(f)
print(open(path).read().count("<heap nr="))
os.unlink(path)
"""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script, "1" if shared else "0"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "skip":
        pytest.skip("not glibc: mallopt unavailable")
    arenas = int(out.stdout)
    if shared:
        assert arenas <= 2, arenas
    else:  # the control: without the cap, 24 threads holding memory at once get many arenas
        assert arenas > 2, arenas


# ------------------------------------------------------------------ turns taken at the agent


def test_a_transfer_is_told_when_to_come_back_and_keeps_its_place() -> None:
    """No room → TryLaterError with a wait; the place is kept, in arrival order."""
    broker = Broker()
    _dispatch(broker, 4, b"model")
    first = broker.wait_for_capacity("s0", "t0", limit=1)
    waits = []
    for i in (1, 2, 3):
        with pytest.raises(TryLaterError) as err:
            broker.wait_for_capacity(f"s{i}", f"t{i}", limit=1)
        waits.append(err.value.retry_after_s)
        assert err.value.grpc_status == "RESOURCE_EXHAUSTED"
    assert 0 < waits[0] < waits[1] < waits[2]  # further back, told to come back later
    assert broker.uploads_waiting() == 3
    broker.release_capacity(first)
    time.sleep(waits[2])  # everyone is due: the first in line gets the place, whoever asks
    with pytest.raises(TryLaterError):
        broker.wait_for_capacity("s3", "t3", limit=1)
    broker.release_capacity(broker.wait_for_capacity("s1", "t1", limit=1))
    broker.cancel(["t2", "t3"])  # the round ends: its waiters leave the line
    assert broker.uploads_waiting() == 0

    broker.max_downloads = 1
    with broker.download_slot("s0", "t0") as blob:
        assert blob.read_all() == b"model"
        with pytest.raises(TryLaterError), broker.download_slot("s1", "t1"):
            pass
        assert broker.downloads_waiting() == 1
    with broker.download_slot("s1", "t1"):
        assert broker.downloads_waiting() == 0


def _threads_waiting_in(*functions: str) -> int:
    """Server worker threads whose stack is inside one of ``functions`` right now."""
    import sys

    names = {t.ident: t.name for t in threading.enumerate()}
    count = 0
    for ident, frame in sys._current_frames().items():
        if not names.get(ident, "").startswith("grpc"):
            continue
        f: Any = frame
        while f is not None:
            if f.f_code.co_name in functions:
                count += 1
                break
            f = f.f_back
    return count


def test_waiting_agents_hold_no_orchestrator_thread(tmp_path: Path) -> None:
    """Many sites wait for their download and upload turns; the orchestrator spends no worker
    thread on a waiting site, so its memory does not grow with the number of sites. Every
    transfer completes."""
    import grpc

    from common.rpc import serde
    from common.rpc.transport import CHANNEL_OPTIONS
    from orchestrator.server import start_server
    from protos.dpfed.v1 import dpfed_pb2_grpc as pb_grpc
    from site_agent import agent

    n = 12
    running = start_server(listen="127.0.0.1:0", state_dir=tmp_path, max_downloads=1, max_uploads=1)
    try:
        broker = running.coordinator.broker
        model = b"m" * (3 * serde.CHUNK_SIZE)
        results, tasks = _dispatch(broker, n, model)
        channel = grpc.insecure_channel(running.address, options=CHANNEL_OPTIONS)
        stub = pb_grpc.AgentServiceStub(channel)
        delta = b"u" * (2 * serde.CHUNK_SIZE)
        results.put("unfolded")  # type: ignore[arg-type]  # the round is full: uploads wait
        blocker = broker.download_slot("s0", "t0")  # so is the one download place
        blocker.__enter__()
        out: dict[int, Any] = {}

        def site(i: int) -> None:
            assert agent.fetch_model(stub, f"s{i}", tasks[i]) == model
            out[i] = agent.push_update(stub, _meta(f"s{i}", f"t{i}", len(delta)), delta)

        threads = [threading.Thread(target=site, args=(i,), daemon=True) for i in range(1, n)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        waiting_threads = max(
            _threads_waiting_in("download_slot", "wait_for_capacity") for _ in range(20)
        )
        assert broker.downloads_waiting() == n - 1
        blocker.__exit__(None, None, None)
        deadline = time.time() + 30
        while len(out) < n - 1 and time.time() < deadline:
            try:
                results.get(timeout=0.05)  # the round folds what arrives, one at a time
            except queue.Empty:
                pass
        for t in threads:
            t.join(timeout=10)
        assert sorted(out) == list(range(1, n)) and all(r.accepted for r in out.values())
        assert waiting_threads <= 1, waiting_threads
        channel.close()
    finally:
        running.stop(0.2)
