"""Site folders and in-process agents for the integration tier.

``write_site`` writes ``<root>/<site_id>/site.yaml`` (the data files are the caller's, in the
same folder); ``write_features_csv`` writes a numeric matrix and its labels as the ``f0..fN,
label`` CSV that ``features_dataset`` declares. ``start_agents`` runs one ``SiteAgent`` per
config in a thread and ``stop_agents`` stops them all at once (each is waiting in a long poll
of up to ``poll_seconds``: stopping them one after another would add those waits up).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from common.rpc.tls import TlsFiles
from orchestrator.client import ControlClient
from site_agent.agent import SiteAgent
from site_agent.config import load_site_config

POLICY: dict[str, Any] = {"max_epsilon": 50.0, "delta": 1e-5, "min_noise_multiplier": 0.5}
"""A roomy site policy: tests that are not about budgets run several jobs on one site."""


def features_dataset(name: str, *, num_classes: int, path: str = "data.csv") -> dict[str, Any]:
    """The declaration of a ``write_features_csv`` file: features in [0, 1], integer labels."""
    return {
        "name": name,
        "path": path,
        "label": "label",
        "feature_bounds": [0, 1],
        "num_classes": num_classes,
    }


def write_features_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Columns ``f0..f{d-1}`` (5 decimals) and an integer ``label``; creates the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = [f"f{i}" for i in range(x.shape[1])]
    np.savetxt(
        path,
        np.column_stack([x, y]),
        delimiter=",",
        header=",".join([*cols, "label"]),
        comments="",
        fmt=["%.5f"] * len(cols) + ["%d"],
    )


def write_site(
    root: Path,
    site_id: str,
    *,
    orchestrator: str,
    datasets: Sequence[Mapping[str, Any]],
    policy: Mapping[str, Any] = POLICY,
    tls: TlsFiles | None = None,
    poll_seconds: float = 0.5,
    heartbeat_seconds: float = 0.5,
) -> Path:
    """``root/site_id/site.yaml`` (state in ``state/`` next to it); plaintext on loopback
    unless ``tls`` is given. Returns the file's path."""
    d = root / site_id
    d.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "site_id": site_id,
        "orchestrator": orchestrator,
        "state_dir": "state",
        "datasets": [dict(ds) for ds in datasets],
        "policy": dict(policy),
        "poll_seconds": poll_seconds,
        "heartbeat_seconds": heartbeat_seconds,
    }
    if tls is None:
        cfg["insecure"] = True
    else:
        cfg["tls"] = {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)}
    (d / "site.yaml").write_text(yaml.safe_dump(cfg))
    return d / "site.yaml"


def start_agents(
    configs: Mapping[str, Path], *, prepare: Callable[[str, SiteAgent], None] | None = None
) -> tuple[dict[str, SiteAgent], dict[str, threading.Thread]]:
    """One agent per ``site_id → site.yaml``, each running in a daemon thread.

    ``prepare(site_id, agent)`` runs before the agent starts (a test's hostile variant)."""
    agents: dict[str, SiteAgent] = {}
    threads: dict[str, threading.Thread] = {}
    for site_id, path in configs.items():
        agent = SiteAgent(load_site_config(path))
        if prepare is not None:
            prepare(site_id, agent)
        agents[site_id] = agent
        threads[site_id] = threading.Thread(target=agent.run, daemon=True, name=f"agent-{site_id}")
        threads[site_id].start()
    return agents, threads


def wait_online(client: ControlClient, n: int, timeout_s: float = 30.0) -> None:
    """Until ``n`` sites are online (neither offline nor disabled)."""
    deadline = time.time() + timeout_s
    while len([s for s in client.sites() if s.state not in ("offline", "disabled")]) < n:
        assert time.time() < deadline, f"{n} agents did not register within {timeout_s} s"
        time.sleep(0.1)


def stop_agents(
    agents: Mapping[str, SiteAgent] | Sequence[SiteAgent],
    threads: Mapping[str, threading.Thread] | Sequence[threading.Thread],
    *,
    close: bool = True,
) -> None:
    """Tell every agent to stop, then wait for each and (``close``) release its ledger."""
    agent_list = list(agents.values()) if isinstance(agents, Mapping) else list(agents)
    thread_list = list(threads.values()) if isinstance(threads, Mapping) else list(threads)
    for a in agent_list:
        a.stop()
    for t in thread_list:
        t.join(timeout=30)
    if close:
        for a in agent_list:
            a.close()
