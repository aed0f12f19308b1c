"""Site commands: the registered sites, the datasets catalog, the privacy ledger, and an
operator's enable/disable."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from common.cli_support import err_console, inert
from common.domain import ColumnInfo
from common.errors import InvalidSpecError
from orchestrator.cli.connection import Connection, connected
from orchestrator.cli.formatting import fmt_column, fmt_eps, fmt_rows, fmt_time, out


@connected
def sites(
    *,
    conn: Connection,
) -> None:
    """List registered sites and the datasets each exposes (name, rows, columns)."""
    with conn.client() as client:
        rows = client.sites()
    t = Table(title="sites")
    for col in (
        "site",
        "state",
        "last seen",
        "version",
        "dataset",
        "rows (DP)",
        "columns",
        "ε spent / budget",
    ):
        t.add_column(col)
    for s in rows:
        for i, d in enumerate(s.datasets or ()):
            cols = ", ".join(d.columns)
            if len(cols) > 60:
                cols = f"{len(d.columns)} columns: {', '.join(d.columns[:4])}, …"
            t.add_row(
                inert(s.site_id) if i == 0 else "",
                inert(s.state) if i == 0 else "",
                fmt_time(s.last_seen) if i == 0 else "",
                inert(s.version) if i == 0 else "",
                inert(d.name),
                fmt_rows(d.dp_num_rows),
                f"{inert(cols)} → label {inert(d.label)}",
                f"{d.epsilon_spent:.3f} / {d.max_epsilon:.3g}",
            )
    out.print(t)


@connected
def datasets(
    *,
    conn: Connection,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """The catalog: each site's datasets, declared schema and a DP row count (no values)."""
    with conn.client() as client:
        rows = client.sites()
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "site": s.site_id,
                        "dataset": d.name,
                        "source": d.source,
                        "rows_dp": d.dp_num_rows,
                        "label": d.label,
                        "columns": [
                            {
                                "name": c.name,
                                "type": c.type,
                                "min": c.min,
                                "max": c.max,
                                "categories": list(c.categories),
                            }
                            for c in d.schema
                        ],
                        "epsilon_spent": d.epsilon_spent,
                        "max_epsilon": d.max_epsilon,
                    }
                    for s in rows
                    for d in s.datasets
                ],
                indent=2,
            )
        )
        return
    t = Table(title="datasets (row counts are noised: Gaussian mechanism, charged once per site)")
    for col in ("site", "dataset", "source", "rows (DP)", "label", "columns (declared schema)"):
        t.add_column(col)
    for s in rows:
        for d in s.datasets:
            schema = d.schema or tuple(ColumnInfo(name=c) for c in d.columns)
            shown = "; ".join(fmt_column(c) for c in schema[:6])
            if len(schema) > 6:
                shown += f"; … ({len(schema)} columns)"
            t.add_row(
                inert(s.site_id),
                inert(d.name),
                inert(d.source),
                fmt_rows(d.dp_num_rows),
                inert(d.label),
                inert(shown),
            )
    out.print(t)


@connected
def ledger(
    *,
    conn: Connection,
) -> None:
    """Privacy spend per site, dataset and job, with each dataset's lifetime spend."""
    with conn.client() as client:
        rows, site_rows = client.ledger()
    t = Table(title="spend per job (at the job's δ)")
    for col in ("site", "dataset", "job", "rounds", "ε", "δ"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            inert(r.site_id),
            inert(r.dataset),
            inert(r.job_id),
            str(r.rounds),
            fmt_eps(r.epsilon),
            f"{r.delta:g}",
        )
    out.print(t)
    t = Table(title="lifetime spend per dataset (as each site reports it, at the site's δ)")
    for col in ("site", "dataset", "ε spent", "budget", "remaining", "δ"):
        t.add_column(col)
    for s in site_rows:
        for d in s.datasets:
            t.add_row(
                inert(s.site_id),
                inert(d.name),
                f"{d.epsilon_spent:.3f}",
                f"{d.max_epsilon:.3g}",
                f"{max(0.0, d.max_epsilon - d.epsilon_spent):.3f}",
                f"{d.policy_delta:g}",
            )
    out.print(t)


@connected
def site_enable(
    site_id: Annotated[str, typer.Argument()],
    action: Annotated[str, typer.Argument(help="enable | disable")],
    *,
    conn: Connection,
) -> None:
    """Operators only: disable a site (refused at registration, never scheduled) or re-enable it."""
    if action not in ("enable", "disable"):
        raise InvalidSpecError(f"action must be enable or disable, not {action!r}")
    with conn.client() as client:
        s = client.set_site_enabled(site_id, action == "enable")
    err_console.print(f"site {inert(s.site_id)}: {inert(s.state)}")
