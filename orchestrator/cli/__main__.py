"""``python -m orchestrator.cli``: the ``orchestrator`` command."""

import os

from orchestrator.cli import run

os.environ.setdefault("PYTHONUNBUFFERED", "1")
run()
