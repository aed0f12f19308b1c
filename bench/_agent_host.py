"""Many ``SiteAgent`` threads in one process, for ``bench_scale_sites.py``.

Usage: python bench/_agent_host.py CONFIG_LIST_FILE   (one site.yaml path per line)
Runs until SIGTERM; each agent dials the orchestrator named in its own config. With
DPFED_BENCH_LEGACY_TRANSFER=1 in the environment the agents transfer as before the memory
fixes (``_harness.use_legacy_transfers``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness  # (also puts the repository root on sys.path)


def main() -> int:
    import torch

    from site_agent.agent import SiteAgent
    from site_agent.config import load_site_config

    if os.environ.get(_harness.LEGACY_TRANSFER_ENV):
        _harness.use_legacy_transfers()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    paths = [p for p in Path(sys.argv[1]).read_text().splitlines() if p.strip()]
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    agents = []
    for p in paths:
        agent = SiteAgent(load_site_config(p))
        threading.Thread(target=agent.run, daemon=True, name=f"agent-{p}").start()
        agents.append(agent)
    done.wait()
    for a in agents:
        a.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
