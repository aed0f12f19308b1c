"""`site-agent` command line: serve (dial out and take tasks) and ledger (the site's spend)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from common.cli_support import err_console, inert, run_app, setup_logging
from common.dp.accounting import compute_epsilon
from common.errors import DpfedError
from site_agent.boundary.budget import budget_limit, open_ledger
from site_agent.config import load_site_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="dpfed site agent: the trust boundary in front of one site's data.",
)
out = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 200)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="site.yaml")]


@app.command()
def serve(
    config: ConfigOpt,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
    log_format: Annotated[str, typer.Option(help="text or json")] = "text",
    threads: Annotated[int | None, typer.Option(help="torch threads for training")] = None,
) -> None:
    """Dial out to the orchestrator, register and run tasks until SIGTERM/SIGINT.

    Exits 0 after a signal; non-zero when the agent stopped on its own (a fatal error), so
    that a supervisor restarts it. A malformed task is refused, never fatal."""
    import torch

    from site_agent.agent import SiteAgent

    setup_logging(log_level, fmt=log_format)
    cfg = load_site_config(config)
    n = threads or cfg.threads
    if n:
        torch.set_num_threads(n)
    agent = SiteAgent(cfg)
    done = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        agent.stop()
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    err_console.print(
        f"site {cfg.site_id}: {len(cfg.datasets)} dataset(s); dialling {cfg.orchestrator}"
    )
    worker = threading.Thread(target=agent.run, name="agent", daemon=True)
    worker.start()
    while worker.is_alive() and not done.wait(0.5):
        pass
    worker.join(timeout=5.0)
    agent.close()
    if not done.is_set():
        why = agent.fatal
        raise DpfedError(
            f"site {cfg.site_id}: the agent stopped on a fatal error"
            + (f" ({type(why).__name__}: {why})" if why is not None else "")
            + "; see the log above"
        )


@app.command()
def ledger(
    config: ConfigOpt,
    events: Annotated[bool, typer.Option("--events/--no-events", help="list the events")] = True,
) -> None:
    """Each dataset's privacy spend, remaining budget and the events behind it."""
    cfg = load_site_config(config)
    with open_ledger(cfg) as led:
        t = Table(
            title=f"site {cfg.site_id}: privacy budget per dataset (δ = {cfg.policy.delta:g})"
        )
        for col in ("dataset", "ε spent", "budget", "remaining", "jobs", "events", "accountant"):
            t.add_column(col)
        names = [d.name for d in cfg.datasets]
        names += [n for n in led.datasets() if n not in names]
        for name in names:
            spent = led.spent(name, delta=cfg.policy.delta)
            budget = budget_limit(cfg, name)
            entries = led.entries(dataset=name)
            t.add_row(
                inert(name),
                f"{spent.epsilon:.4f}",
                f"{budget:g}",
                f"{max(0.0, budget - spent.epsilon):.4f}",
                str(len({e.job_id for e in entries})),
                str(len(entries)),
                spent.accountant,
            )
        out.print(t)
        if events:
            t = Table(title="events (append-only, written before each update left the site)")
            for col in ("#", "dataset", "job", "round", "kind", "σ", "q", "steps", "δ", "task ε"):
                t.add_column(col)
            for e in led.entries():
                eps = compute_epsilon([e.event], delta=e.delta).epsilon
                t.add_row(
                    str(e.id),
                    inert(e.dataset),
                    inert(e.job_id),  # the orchestrator named it
                    str(e.round),
                    inert(e.kind),
                    f"{e.event.noise_multiplier:.3g}",
                    f"{e.event.sample_rate:.3g}",
                    str(e.event.steps),
                    f"{e.delta:g}",
                    f"{eps:.3f}",
                )
            out.print(t)


def main(argv: Sequence[str] | None = None) -> int:
    return run_app(app, argv, prog="site-agent")


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
