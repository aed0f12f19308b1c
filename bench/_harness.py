"""Shared plumbing for the benchmarks in this folder (not a benchmark itself).

* :func:`write_site` writes one site's CSV and ``site.yaml``;
* :class:`Federation` runs an orchestrator in this process (``start_server``) with site agents
  either as threads of this process (:meth:`Federation.add_thread_agents`, as
  ``tests/integration/test_grpc_job.py`` does) or as real ``site-agent`` processes
  (:meth:`Federation.add_process_agents`), over plaintext loopback or mTLS;
* :func:`run_job` submits a job spec and follows it to its end like ``orchestrator launch
  --wait`` (a ``WatchJob`` stream);
* :class:`Timeline` records wall-clock intervals of named functions (monkeypatched wrappers, no
  product change) in this process, and ``bench/_timed_agent.py`` does the same inside agent
  processes, so a round can be split into training and everything else.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.domain import JobStatus  # noqa: E402
from common.rpc.tls import ROLE_DATA_SCIENTIST, TlsFiles, init_pki  # noqa: E402
from common.specs import parse_job_spec  # noqa: E402
from orchestrator.client import ControlClient  # noqa: E402
from orchestrator.server import RunningServer, start_server  # noqa: E402

# ------------------------------------------------------------------ timelines


class Timeline:
    """Thread-safe list of (who, what, t0, t1, extra) wall-clock intervals.

    ``sink`` (a path) also appends each record as a JSON line, for agent processes.
    """

    def __init__(self, sink: Path | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._sink = sink.open("a", buffering=1) if sink is not None else None
        self.local = threading.local()

    def add(self, who: str, what: str, t0: float, t1: float, **extra: Any) -> None:
        rec = {"who": who, "what": what, "t0": t0, "t1": t1, **extra}
        with self._lock:
            self.records.append(rec)
            if self._sink is not None:
                self._sink.write(json.dumps(rec) + "\n")

    def wrap(
        self,
        owner: Any,
        name: str,
        what: str,
        who: Callable[..., str] | str,
        extra: Callable[..., dict[str, Any]] | None = None,
    ) -> None:
        """Replace ``owner.name`` by a wrapper that records each call's interval."""
        fn = getattr(owner, name)
        if getattr(fn, "_bench_wrapped", False):
            return

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = time.time()
                w = who(*args, **kwargs) if callable(who) else who
                self.add(w, what, t0, t1, **(extra(*args, **kwargs) if extra else {}))

        wrapper._bench_wrapped = True  # type: ignore[attr-defined]
        setattr(owner, name, wrapper)

    @staticmethod
    def load(path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


TIMELINE = Timeline()
"""The process-wide timeline the installed wrappers record into (wrappers are installed once)."""


def install_site_timers(tl: Timeline | None = None) -> None:
    """Time the site agent's task path: handle > fetch, execute > train_local, accounting."""
    tl = tl or TIMELINE
    import site_agent.boundary.pipeline as ex
    import site_agent.handlers.train as tr
    from site_agent.agent import SiteAgent
    from site_agent.boundary.ledger import Ledger

    def site_of_agent(self: Any, *a: Any, **k: Any) -> str:
        return str(self.config.site_id)

    def site_of_thread(*a: Any, **k: Any) -> str:
        return str(getattr(tl.local, "site", "?"))

    def round_of_task(self: Any, stub: Any, task: Any, *a: Any, **k: Any) -> dict[str, Any]:
        return {"round": task.round, "job": task.job_id}

    orig_execute = ex.SitePipeline.execute

    def execute(self: Any, task: Any, blob: bytes) -> Any:
        tl.local.site = self.config.site_id
        t0 = time.time()
        try:
            return orig_execute(self, task, blob)
        finally:
            tl.add(self.config.site_id, "execute", t0, time.time(), round=task.round)

    if not getattr(ex.SitePipeline.execute, "_bench_wrapped", False):
        execute._bench_wrapped = True  # type: ignore[attr-defined]
        ex.SitePipeline.execute = execute  # type: ignore[method-assign]
    tl.wrap(SiteAgent, "_handle", "handle", site_of_agent, round_of_task)
    tl.wrap(SiteAgent, "_fetch", "fetch", site_of_agent)
    tl.wrap(tr, "train_local", "train_local", site_of_thread)
    tl.wrap(ex, "check_release", "policy_check", site_of_thread)
    # The DP report's PRV compositions run in a thread alongside training; what the round
    # pays is the wait for them after training, plus any composition on the task's thread.
    tl.wrap(tr, "_wait_for_report", "accounting", site_of_thread)
    tl.wrap(tr, "compute_epsilon", "accounting", site_of_thread)
    tl.wrap(Ledger, "spent", "accounting", site_of_thread)
    tl.wrap(Ledger, "charge", "ledger_charge", site_of_thread)


def install_orchestrator_timers(tl: Timeline | None = None) -> None:
    """Time the orchestrator's round: the whole _round and its bookkeeping steps."""
    tl = tl or TIMELINE
    import orchestrator.training.rounds as rounds
    from orchestrator.coordinator import Coordinator
    from orchestrator.core.store import Store
    from orchestrator.training.aggregation import RunningWeightedMean

    def rnd(self: Any, r: int, *a: Any, **k: Any) -> dict[str, Any]:
        return {"round": r, "job": self.job_id}

    tl.wrap(rounds.JobRunner, "_round", "round", "orchestrator", rnd)
    tl.wrap(rounds.JobRunner, "_check", "check_update", "orchestrator")
    tl.wrap(rounds.JobRunner, "_job_epsilon", "job_epsilon", "orchestrator")
    tl.wrap(RunningWeightedMean, "add", "aggregate", "orchestrator")
    tl.wrap(Store, "commit_round", "commit_round", "orchestrator")
    tl.wrap(rounds, "atomic_write", "checkpoint", "orchestrator")
    tl.wrap(rounds, "state_to_bytes", "serialize", "orchestrator")
    tl.wrap(Coordinator, "job", "status_view", "orchestrator")


# ------------------------------------------------------------------ sites and federations


def write_site(
    root: Path,
    site_id: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    dataset: str = "data",
    **kw: Any,
) -> Path:
    """One site with one dataset (CSV) and its site.yaml; returns the config path."""
    return write_site_datasets(root, site_id, {dataset: (x, y)}, **kw)


def write_site_datasets(
    root: Path,
    site_id: str,
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    address: str,
    poll_s: float = 5.0,
    heartbeat_s: float = 2.0,
    max_epsilon: float = 1000.0,
    min_noise_multiplier: float = 0.01,
    validation_fraction: float = 0.0,
    tls: TlsFiles | None = None,
    threads: int | None = 1,
    feature_bounds: tuple[float, float] = (0.0, 1.0),
    num_classes: int | Mapping[str, int] = 10,
) -> Path:
    """One site holding several datasets (one CSV each) and its site.yaml.

    Every dataset declares its schema as a site operator would: each feature numeric within
    ``feature_bounds`` (values outside are clipped at load), the label's classes
    ``0..num_classes-1`` (per dataset name when a mapping). Give every site the same
    declaration: a job trains only on features that mean the same thing at every site.
    """
    d = root / site_id
    d.mkdir(parents=True, exist_ok=True)
    datasets = []
    for name, (x, y) in data.items():
        cols = [f"f{i}" for i in range(x.shape[1])]
        np.savetxt(
            d / f"{name}.csv",
            np.column_stack([x, y]),
            delimiter=",",
            header=",".join([*cols, "label"]),
            comments="",
            fmt=["%.6g"] * len(cols) + ["%d"],
        )
        datasets.append(
            {
                "name": name,
                "path": f"{name}.csv",
                "label": "label",
                "feature_bounds": list(feature_bounds),
                "num_classes": num_classes if isinstance(num_classes, int) else num_classes[name],
                "validation_fraction": validation_fraction,
            }
        )
    cfg: dict[str, Any] = {
        "site_id": site_id,
        "orchestrator": address,
        "state_dir": "state",
        "datasets": datasets,
        "policy": {
            "max_epsilon": max_epsilon,
            "delta": 1e-5,
            "min_noise_multiplier": min_noise_multiplier,
        },
        "poll_seconds": poll_s,
        "heartbeat_seconds": heartbeat_s,
    }
    if threads:
        cfg["threads"] = threads
    if tls is None:
        cfg["insecure"] = True
    else:
        cfg["tls"] = {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)}
    path = d / "site.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@dataclass
class Federation:
    """An in-process orchestrator plus site agents (threads or processes); stop() ends all."""

    root: Path
    mtls: bool = False
    offline_after_s: float = 30.0
    max_workers: int = 64
    server_kwargs: dict[str, Any] = field(default_factory=dict)  # more start_server arguments
    server: RunningServer | None = None
    pki: dict[str, TlsFiles] = field(default_factory=dict)
    agents: list[Any] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    proc_logs: list[Path] = field(default_factory=list)

    def start(self, site_ids: Sequence[str] = ()) -> Federation:
        tls = None
        if self.mtls:
            self.pki = init_pki(
                self.root / "pki", sites=list(site_ids), users=[("bench", ROLE_DATA_SCIENTIST)]
            )
            tls = self.pki["orchestrator"]
        self.server = start_server(
            listen="127.0.0.1:0",
            state_dir=self.root / "orchestrator",
            tls=tls,
            offline_after_s=self.offline_after_s,
            max_workers=self.max_workers,
            **self.server_kwargs,
        )
        return self

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    def site_tls(self, site_id: str) -> TlsFiles | None:
        return self.pki.get(f"site:{site_id}") if self.mtls else None

    def client(self) -> ControlClient:
        return ControlClient(self.address, tls=self.pki.get("user:bench") if self.mtls else None)

    def add_thread_agents(self, configs: Sequence[Path]) -> None:
        from site_agent.agent import SiteAgent
        from site_agent.config import load_site_config

        for cfg in configs:
            agent = SiteAgent(load_site_config(cfg))
            t = threading.Thread(target=agent.run, daemon=True, name=f"agent-{cfg.parent.name}")
            t.start()
            self.agents.append(agent)
            self.threads.append(t)

    def add_process_agents(
        self, configs: Sequence[Path], *, timings_dir: Path | None = None
    ) -> None:
        """``site-agent serve`` processes (through bench/_timed_agent.py when timing)."""
        for cfg in configs:
            self.proc_logs.append(cfg.parent / "agent.log")
            log = (cfg.parent / "agent.log").open("ab")
            if timings_dir is not None:
                cmd = [
                    sys.executable,
                    str(BENCH / "_timed_agent.py"),
                    str(cfg),
                    str(timings_dir / f"{cfg.parent.name}.jsonl"),
                ]
            else:
                exe = Path(sys.executable).parent / "site-agent"
                cmd = [str(exe), "serve", "--config", str(cfg), "--log-level", "WARNING"]
            self.procs.append(
                subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, cwd=str(ROOT))
            )
            log.close()

    def wait_sites(self, n: int, timeout_s: float = 120.0) -> float:
        t0 = time.time()
        with self.client() as c:
            while True:
                online = sum(s.state != "offline" for s in c.sites())
                if online >= n:
                    return time.time() - t0
                if time.time() - t0 > timeout_s:
                    raise TimeoutError(f"{online}/{n} sites registered after {timeout_s} s")
                for p, log in zip(self.procs, self.proc_logs, strict=True):
                    if p.poll() is not None:
                        tail = log.read_text(errors="replace")[-1500:]
                        raise RuntimeError(
                            f"agent process {log.parent.name} exited with {p.returncode}:\n{tail}"
                        )
                time.sleep(0.2)

    def stop(self) -> None:
        for a in self.agents:
            a.stop()
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 20
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in self.threads:
            t.join(timeout=max(0.1, deadline - time.time()))
        for a in self.agents:
            a.close()
        if self.server is not None:
            self.server.stop(0.5)


@contextmanager
def federation(root: Path, **kw: Any) -> Iterator[Federation]:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    fed = Federation(root, **kw)
    try:
        yield fed
    finally:
        fed.stop()


def job_json(spec: dict[str, Any]) -> str:
    return parse_job_spec(spec).model_dump_json()


def run_job(client: ControlClient, spec: dict[str, Any]) -> JobStatus:
    """Submit and follow the job to its end (as ``orchestrator launch --wait`` does)."""
    job_id = client.submit(job_json(spec))
    last = None
    for st in client.watch(job_id):
        last = st
    assert last is not None
    if last.state != "completed":
        raise RuntimeError(f"job {job_id} ended {last.state}: {last.error}")
    return client.job(job_id)


# ------------------------------------------------------------------ legacy transfers

LEGACY_TRANSFER_ENV = "DPFED_BENCH_LEGACY_TRANSFER"
LEGACY_SERVER_KWARGS: dict[str, Any] = {
    "max_downloads": 1 << 30,
    "malloc_mmap_threshold": None,
    "malloc_arena_max": None,
}
"""``start_server`` arguments that undo the download limit and the malloc tuning."""


def use_legacy_transfers() -> None:
    """In this process, move models in 1 MiB chunks, as dpfed did before the memory fixes of
    §2 in RESULTS.md, for side-by-side runs. (The orchestrator side also needs
    ``LEGACY_SERVER_KWARGS``; ``blob_from_chunks`` keeps its single-copy assembly, and agents
    wait for the orchestrator's go before an upload's bytes, as the protocol requires.)"""
    import common.rpc.serde as serde

    if getattr(serde.blob_to_chunks, "_bench_legacy", False):
        return
    chunks = functools.partial(serde.blob_to_chunks, chunk_size=1 << 20)
    chunks._bench_legacy = True  # type: ignore[attr-defined]
    serde.blob_to_chunks = chunks  # type: ignore[assignment]


# ------------------------------------------------------------------ misc


def rss_mib() -> float:
    """Current resident set size of this process (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Peak RSS of this process, sampled every ``interval_s`` in a thread."""

    def __init__(self, interval_s: float = 0.01, *, keep: bool = False) -> None:
        self.interval_s = interval_s
        self.peak = 0.0
        self.baseline = 0.0
        self.keep = keep
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            v = rss_mib()
            self.peak = max(self.peak, v)
            if self.keep:
                self.samples.append((time.time(), v))
            self._stop.wait(self.interval_s)

    def peak_between(self, t0: float, t1: float) -> float:
        return max((v for t, v in self.samples if t0 <= t <= t1), default=float("nan"))

    def at(self, t: float) -> float:
        """The last sample taken at or before ``t``."""
        before = [v for ts, v in self.samples if ts <= t]
        return before[-1] if before else self.baseline

    def __enter__(self) -> RssSampler:
        self.baseline = rss_mib()
        self.peak = self.baseline
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mib())


def environment() -> dict[str, Any]:
    import platform

    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "machine": platform.machine(),
    }


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend, imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
