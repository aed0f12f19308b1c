"""`orchestrator` command line: serve, launch, plan, status, jobs, sites, datasets, ledger, pull,
cancel, site, evaluate, synth, certs.

Every command that talks to a running orchestrator takes the same connection options
(:mod:`orchestrator.cli.connection`: ``--server HOST:PORT``, default ``$DPFED_SERVER`` or
127.0.0.1:50051, and mutual TLS or ``--insecure``). Tables and progress go to standard error;
standard output carries only what scripts read (the job id of ``launch``, JSON with ``--json``).
Errors exit with the code of their class (``common.errors``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

from common.cli_support import run_app
from orchestrator.cli import certs, jobs, releases, serving, sites

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="dpfed orchestrator: run the server and drive federated DP jobs.",
)
app.command()(serving.serve)
app.command()(jobs.launch)
app.command()(jobs.plan)
app.command()(jobs.status)
app.command()(jobs.jobs)
app.command()(sites.sites)
app.command()(sites.datasets)
app.command()(sites.ledger)
app.command()(releases.pull)
app.command()(jobs.cancel)
app.command("site")(sites.site_enable)
app.command()(releases.evaluate)
app.command()(releases.synth)
app.add_typer(certs.app, name="certs")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: the process's) and return its exit code."""
    return run_app(app, argv, prog="orchestrator")


def run() -> None:
    """The ``orchestrator`` console script."""
    sys.exit(main())
