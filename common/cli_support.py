"""What both CLIs share: `main(argv) -> int` around a typer app, errors → exit codes."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import click
import typer
from rich.console import Console

from common.errors import DpfedError

err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def run_app(app: typer.Typer, argv: Sequence[str] | None, *, prog: str) -> int:
    """Run ``app`` in-process and return its exit code instead of calling sys.exit."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args=args, prog_name=prog, standalone_mode=False)
    except DpfedError as err:
        err_console.print(f"[bold red]error:[/] {err}", markup=True, soft_wrap=True)
        return err.exit_code
    except click.exceptions.Exit as ex:
        return int(ex.exit_code)
    except click.ClickException as ex:
        ex.show()
        return int(ex.exit_code)
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        return 130
    return int(result) if isinstance(result, int) else 0


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, (os.environ.get("DPFED_LOG_LEVEL") or level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
