"""``site-agent serve`` with the benchmark's timers installed (see ``_harness.py``).

Usage: python bench/_timed_agent.py SITE_YAML TIMINGS_JSONL
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness


def main() -> int:
    config, sink = sys.argv[1], Path(sys.argv[2])
    _harness.install_site_timers(_harness.Timeline(sink))
    from site_agent.cli import main as agent_main

    return agent_main(["serve", "--config", config, "--log-level", "WARNING"])


if __name__ == "__main__":
    raise SystemExit(main())
