"""What both CLIs share: `main(argv) -> int` around a typer app, errors → exit codes."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Sequence

import click
import typer
from rich.console import Console
from rich.markup import escape

from common.errors import DpfedError

err_console = Console(
    stderr=True, highlight=False, emoji=False, width=None if sys.stderr.isatty() else 160
)


def printable(value: object, *, newlines: bool = False) -> str:
    """``value`` with control and format characters (ESC and the sequences it starts, C1
    controls such as CSI, bidirectional overrides, zero-width characters) shown as escapes
    (``\\x1b``, ``\\u202e``). ``newlines`` keeps line breaks; otherwise they are escaped too.
    """
    out = []
    for ch in str(value):
        if ch.isprintable() or ch == " " or (newlines and ch == "\n"):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def inert(value: object, *, newlines: bool = False) -> str:
    """``value`` as rich text that prints as itself: what a remote party wrote (job names,
    site failure reasons, dataset and column names, error details) must not drive the
    terminal. :func:`printable`, then rich markup escaped, so ``[link=...]`` or ``[red]``
    print literally."""
    return escape(printable(value, newlines=newlines))


class PrintableFormatter(logging.Formatter):
    """Text log lines with control characters escaped: log messages quote what remote
    parties sent (failure reasons, error details), and the log often goes to a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), newlines=True)


def run_app(app: typer.Typer, argv: Sequence[str] | None, *, prog: str) -> int:
    """Run ``app`` in-process and return its exit code instead of calling sys.exit."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args=args, prog_name=prog, standalone_mode=False)
    except DpfedError as err:
        err_console.print(
            f"[bold red]error:[/] {inert(err, newlines=True)}", markup=True, soft_wrap=True
        )
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


_KV = re.compile(r"\b(job|site|round|task)=([^\s,;]+)")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``job=…``, ``site=…``, ``round=…`` in a message become fields."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": msg,
        }
        for key, value in _KV.findall(msg):
            if value != "-":
                out[key] = (
                    int(value.split("/")[0]) if key == "round" and value[:1].isdigit() else value
                )
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "INFO", *, fmt: str = "text") -> None:
    if fmt not in ("text", "json"):
        raise DpfedError(f"--log-format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()  # json.dumps escapes control characters itself
        if fmt == "json"
        else PrintableFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(
        getattr(logging, (os.environ.get("DPFED_LOG_LEVEL") or level).upper(), logging.INFO)
    )
