"""`make demo`: an orchestrator and 3 site agents as real processes on 127.0.0.1.

scikit-learn's digits (1797 x 64, 10 classes) are split into a held-out test set (never seen
by any site) and three site CSVs of 50% / 30% / 20% of the rest. The script writes each
site's ``site.yaml`` and a ``job.yaml``, starts the processes through the console scripts,
runs ``orchestrator launch --wait``, pulls the model, evaluates it on the held-out split, and
prints the test accuracy and the (ε, δ) guarantee from the model card.

Usage: python -m examples.demo [--workdir DIR] [--rounds N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

SITES = (("bank-a", 0.5), ("bank-b", 0.3), ("bank-c", 0.2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bin_path(name: str) -> str:
    """The console script next to the running interpreter (the venv's), else on PATH."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


@dataclass(frozen=True)
class DemoFiles:
    workdir: Path
    site_configs: dict[str, Path]
    job_file: Path
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    def cli_env(self, user: str = "analyst") -> dict[str, str]:
        """Environment for the orchestrator CLI, authenticated as ``user`` over mTLS."""
        return {
            **os.environ,
            "DPFED_CA": str(self.pki / "ca.pem"),
            "DPFED_CERT": str(self.pki / "users" / f"{user}.pem"),
            "DPFED_KEY": str(self.pki / "users" / f"{user}.key"),
        }


def prepare(
    workdir: Path,
    *,
    port: int,
    rounds: int = 5,
    noise_multiplier: float | None = 1.0,
    target_epsilon: float | None = None,
    max_epsilon: float = 10.0,
    hidden: Sequence[int] = (64,),
    local_epochs: float = 1.0,
    seed: int = 0,
    extra_job: dict[str, object] | None = None,
    orchestrator_address: str | None = None,
    hosts: Sequence[str] = ("127.0.0.1", "::1", "localhost"),
) -> DemoFiles:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from common.rpc.tls import ROLE_DATA_SCIENTIST, ROLE_OPERATOR, init_pki

    workdir.mkdir(parents=True, exist_ok=True)
    # Certificates generated on the fly: a CA, the orchestrator, each site, two CLI users.
    init_pki(
        workdir / "pki",
        sites=[s for s, _ in SITES],
        users=[("analyst", ROLE_DATA_SCIENTIST), ("operator", ROLE_OPERATOR)],
        hosts=tuple(hosts),
    )
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel intensities 0..16 → 0..1
    x_pool, x_test, y_pool, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y_pool))
    cuts = np.cumsum([round(f * len(order)) for _, f in SITES])[:-1]
    columns = [f"px{i}" for i in range(x.shape[1])]
    configs: dict[str, Path] = {}
    for (site_id, _), idx in zip(SITES, np.split(order, cuts), strict=True):
        site_dir = workdir / site_id
        site_dir.mkdir(exist_ok=True)
        data = np.column_stack([x_pool[idx], y_pool[idx]])
        header = ",".join([*columns, "digit"])
        fmt = ["%.6f"] * len(columns) + ["%d"]
        np.savetxt(
            site_dir / "digits.csv", data, delimiter=",", header=header, comments="", fmt=fmt
        )
        cfg = {
            "site_id": site_id,
            "orchestrator": orchestrator_address or f"127.0.0.1:{port}",
            "state_dir": "state",
            "datasets": [
                {
                    "name": "digits",
                    "path": "digits.csv",
                    "label": "digit",
                    # pixel intensities scaled to [0, 1]; the classes 0..9
                    "feature_bounds": [0, 1],
                    "num_classes": 10,
                }
            ],
            "tls": {
                "ca": "../pki/ca.pem",
                "cert": f"../pki/sites/{site_id}.pem",
                "key": f"../pki/sites/{site_id}.key",
            },
            "policy": {"max_epsilon": max_epsilon, "delta": 1.0e-5, "min_noise_multiplier": 0.5},
            "poll_seconds": 2.0,
            "heartbeat_seconds": 2.0,
            "threads": 1,
        }
        configs[site_id] = site_dir / "site.yaml"
        configs[site_id].write_text(yaml.safe_dump(cfg, sort_keys=False))
    job: dict[str, object] = {
        "name": "digits-demo",
        "dataset": "digits",
        "model": {
            "kind": "mlp",
            "input_dim": x.shape[1],
            "num_classes": 10,
            "hidden": list(hidden),
            "activation": "relu",
        },
        "rounds": rounds,
        "local_epochs": local_epochs,
        "batch_size": 32,
        "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.0},
        "dp": {
            **(
                {"target_epsilon": target_epsilon}
                if target_epsilon is not None
                else {"noise_multiplier": noise_multiplier}
            ),
            "max_grad_norm": 1.0,
            "delta": 1.0e-5,
        },
        "min_sites": 3,
        "round_timeout_s": 300,
        "seed": seed,
        **(extra_job or {}),
    }
    job_file = workdir / "job.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))
    return DemoFiles(workdir, configs, job_file, x_test, y_test.astype(np.int64))


@dataclass
class Cluster:
    """Real processes: one orchestrator and one agent per site; stopped on exit."""

    workdir: Path
    port: int
    site_configs: dict[str, Path]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _log(self, name: str) -> int:
        return os.open(self.workdir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def start_orchestrator(self) -> None:
        fd = self._log("orchestrator")
        self.procs["orchestrator"] = subprocess.Popen(
            [
                bin_path("orchestrator"),
                "serve",
                "--listen",
                self.server,
                "--state-dir",
                str(self.workdir / "orchestrator-state"),
                "--offline-after",
                "10",
                "--pki-dir",
                str(self.workdir / "pki"),
            ],
            stdout=fd,
            stderr=fd,
            start_new_session=True,
        )
        os.close(fd)
        wait_for_port(self.port, timeout_s=60)

    def start_agent(self, site_id: str) -> None:
        fd = self._log(site_id)
        self.procs[site_id] = subprocess.Popen(
            [bin_path("site-agent"), "serve", "--config", str(self.site_configs[site_id])],
            stdout=fd,
            stderr=fd,
            start_new_session=True,
        )
        os.close(fd)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            p.wait(timeout=30)

    def stop_all(self) -> None:
        for name in list(self.procs):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def wait_for_sites(self, n: int, timeout_s: float = 120.0) -> None:
        from common.rpc.tls import TlsFiles
        from orchestrator.client import ControlClient

        deadline = time.time() + timeout_s
        pki = self.workdir / "pki"
        tls = TlsFiles(
            ca=pki / "ca.pem", cert=pki / "users/analyst.pem", key=pki / "users/analyst.key"
        )
        with ControlClient(self.server, tls=tls) as c:
            while time.time() < deadline:
                try:
                    if sum(s.state != "offline" for s in c.sites()) >= n:
                        return
                except Exception:
                    pass
                time.sleep(0.5)
        raise TimeoutError(
            f"{n} sites did not register within {timeout_s} s; see {self.workdir}/*.log"
        )


@contextmanager
def running_cluster(files: DemoFiles, port: int) -> Iterator[Cluster]:
    cluster = Cluster(files.workdir, port, files.site_configs)
    try:
        cluster.start_orchestrator()
        for site_id in files.site_configs:
            cluster.start_agent(site_id)
        cluster.wait_for_sites(len(files.site_configs))
        yield cluster
    finally:
        cluster.stop_all()


def wait_for_port(port: int, *, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def evaluate_pulled(model_dir: Path, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    from common.training.models import load_model

    model = load_model(model_dir)
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((pred == y).mean())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("demo-state"))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument(
        "--target-epsilon",
        type=float,
        default=4.0,
        help="calibrate each site's σ so that no site passes this ε (default 4)",
    )
    ap.add_argument(
        "--noise-multiplier",
        type=float,
        default=None,
        help="fixed σ for every site instead of --target-epsilon",
    )
    ap.add_argument("--keep", action="store_true", help="keep the previous workdir's state")
    ap.add_argument(
        "--prepare-only",
        metavar="ORCHESTRATOR_ADDRESS",
        help="only write data, site configs, job.yaml and certificates for that address "
        "(e.g. orchestrator:50051 for docker/compose.yaml), then exit",
    )
    args = ap.parse_args(argv)
    # SIGTERM → SystemExit, so the cluster's processes are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.workdir.exists() and not args.keep:
        shutil.rmtree(args.workdir)
    if args.prepare_only:
        host = args.prepare_only.rpartition(":")[0]
        files = prepare(
            args.workdir,
            port=0,
            rounds=args.rounds,
            noise_multiplier=args.noise_multiplier,
            target_epsilon=None if args.noise_multiplier is not None else args.target_epsilon,
            orchestrator_address=args.prepare_only,
            hosts=("127.0.0.1", "::1", "localhost", host),
        )
        print(f"wrote {args.workdir}/: pki/, job.yaml and one folder per site")
        return 0
    port = free_port()
    files = prepare(
        args.workdir,
        port=port,
        rounds=args.rounds,
        noise_multiplier=args.noise_multiplier,
        target_epsilon=None if args.noise_multiplier is not None else args.target_epsilon,
    )
    print(
        f"demo: 3 sites (50/30/20% of digits), {len(files.test_y)} held-out test rows; "
        f"logs in {args.workdir}/",
        flush=True,
    )
    env = files.cli_env("analyst")
    with running_cluster(files, port) as cluster:
        orch = bin_path("orchestrator")
        subprocess.run([orch, "sites", "--server", cluster.server], check=True, env=env)
        subprocess.run(
            [orch, "plan", str(files.job_file), "--server", cluster.server], check=False, env=env
        )
        proc = subprocess.run(
            [orch, "launch", str(files.job_file), "--server", cluster.server, "--wait"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        job_id = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode != 0:
            print(f"demo: job {job_id} did not release a model (exit {proc.returncode})")
            return proc.returncode
        out_dir = args.workdir / "model"
        subprocess.run(
            [orch, "pull", job_id, "--out", str(out_dir), "--server", cluster.server],
            check=True,
            env=env,
        )
        subprocess.run([orch, "status", job_id, "--server", cluster.server], check=True, env=env)
    card = json.loads((out_dir / "model_card.json").read_text())
    acc = evaluate_pulled(out_dir, files.test_x, files.test_y)
    print()
    print(
        f"held-out test accuracy: {acc:.3f}  (chance: 0.100; {len(files.test_y)} rows no site saw)"
    )
    print(
        f"privacy guarantee:      (ε = {card['epsilon']:.3f}, δ = {card['delta']:g}) sample-level DP, "
        f"{card['accountant'].upper()} accountant, max over sites:"
    )
    for s in card["sites"]:
        print(
            f"  {s['site_id']}: {s['num_examples']} rows, σ={s['noise_multiplier']:.3g}, "
            f"q={s['sample_rate']:.3g}, steps={s['steps']}, ε={s['epsilon']:.3f}"
        )
    print(
        f"model: {out_dir}/model.safetensors + model_card.json; "
        f"load with common.training.models.load_model({str(out_dir)!r})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
