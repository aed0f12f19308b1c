"""How the CLI prints: ``out`` is standard output (tables a user reads, or what a script
reads with ``--json``); progress and messages go to ``common.cli_support.err_console``."""

from __future__ import annotations

import datetime as dt
import math
import sys

from rich.console import Console

from common.domain import ColumnInfo

out = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 200)


def fmt_eps(x: float) -> str:
    return "-" if not math.isfinite(x) or x == 0 else f"{x:.3f}"


def fmt_time(t: float) -> str:
    if t <= 0:
        return "-"
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def fmt_metric(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.3f}"


def fmt_rows(dp_rows: float) -> str:
    """A site's DP row count; negative when its σ floor or budget withheld the count
    (``site_agent.data.catalog``)."""
    if dp_rows < 0:
        return "withheld (budget)"
    return f"≈{dp_rows:,.0f}"


def fmt_column(c: ColumnInfo) -> str:
    if c.type == "categorical":
        cats = ", ".join(c.categories[:5]) + (", …" if len(c.categories) > 5 else "")
        return f"{c.name}: categorical {{{cats}}}"
    if c.min is not None and c.max is not None:
        return f"{c.name}: numeric [{c.min:g}, {c.max:g}]"
    return f"{c.name}: numeric"
