"""`orchestrator serve`: run the orchestrator process (gRPC server, its PKI, metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from common.cli_support import err_console, setup_logging
from orchestrator.cli.connection import DEFAULT_SERVER


def serve(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on")] = DEFAULT_SERVER,
    state_dir: Annotated[
        Path, typer.Option(help="folder for the database, checkpoints, models")
    ] = Path("./orchestrator-state"),
    db_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL (default: SQLite in the state dir)")
    ] = None,
    offline_after: Annotated[
        float, typer.Option(help="seconds of silence before a site counts as offline")
    ] = 30.0,
    pki_dir: Annotated[
        Path | None,
        typer.Option(help="the deployment's PKI (default: STATE_DIR/pki, created on first start)"),
    ] = None,
    host: Annotated[
        list[str] | None, typer.Option(help="extra host name/IP for the server certificate")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="plaintext gRPC (refused off loopback)")
    ] = False,
    metrics_listen: Annotated[
        str | None, typer.Option(help="HOST:PORT for Prometheus metrics at /metrics (opt-in)")
    ] = None,
    max_workers: Annotated[
        int,
        typer.Option(
            help="gRPC worker threads; each connected site holds one, and an eighth (at least "
            "8) is kept for CLI calls, so serve up to about 7/8 of this many sites"
        ),
    ] = 512,
    max_calls_per_site: Annotated[
        int,
        typer.Option(
            min=2,
            help="calls one site certificate may have in progress (an agent needs 3); more "
            "are refused at once, so a rogue site cannot take the worker threads",
        ),
    ] = 8,
    max_downloads: Annotated[
        int,
        typer.Option(
            min=1,
            help="model downloads streamed at once; other sites wait their turn (at the site)",
        ),
    ] = 8,
    max_uploads: Annotated[
        int,
        typer.Option(
            min=1,
            help="updates a round takes at once, being read or queued in spool files under the "
            "state directory (disk ≈ (this + 1) × model size, with the one it is folding; memory "
            "one chunk each); other sites wait their turn (at the site)",
        ),
    ] = 4,
    max_parameters: Annotated[
        int,
        typer.Option(
            min=1,
            help="largest model (parameters) a job may ask for; checked from the spec before "
            "anything is built",
        ),
    ] = 50_000_000,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
    log_format: Annotated[str, typer.Option(help="text or json")] = "text",
) -> None:
    """Run the orchestrator until SIGTERM/SIGINT; unfinished jobs resume at the next start."""
    from orchestrator.server import DEFAULT_HOSTS, ensure_server_pki, serve_forever, start_server

    setup_logging(log_level, fmt=log_format)
    tls = None
    if not insecure:
        tls = ensure_server_pki(pki_dir or state_dir / "pki", hosts=(*DEFAULT_HOSTS, *(host or [])))
    running = start_server(
        listen=listen,
        state_dir=state_dir,
        tls=tls,
        db_url=db_url,
        offline_after_s=offline_after,
        metrics_listen=metrics_listen,
        max_workers=max_workers,
        max_downloads=max_downloads,
        max_uploads=max_uploads,
        max_parameters=max_parameters,
        max_calls_per_site=max_calls_per_site,
    )
    err_console.print(
        f"orchestrator listening on {listen} ({'plaintext' if tls is None else 'mutual TLS'})"
    )
    serve_forever(running)
