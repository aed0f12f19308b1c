"""`orchestrator` command line: serve, launch, plan, status, jobs, sites, ledger, pull.

Every command that talks to a running orchestrator takes ``--server HOST:PORT`` (default
``$DPFED_SERVER`` or 127.0.0.1:50051). Tables and progress go to standard error; standard
output carries only what scripts read (the job id of ``launch``, JSON with ``--json``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.cli_support import err_console, inert, run_app, setup_logging
from common.domain import ColumnInfo, JobStatus, PooledMetrics
from common.errors import DpfedError, InvalidSpecError, JobFailedError, PolicyRefusal
from common.rpc.tls import DEFAULT_DAYS, ROLES, TlsFiles
from common.specs import GmmJobSpec, load_any_job_spec, load_job_spec
from orchestrator.client import ControlClient
from orchestrator.metric_pooling import (
    EVALUATE_LOSS_BOUND,
    format_estimate,
    metrics_plan_summary,
    metrics_summary,
    pool_metrics,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="dpfed orchestrator: run the server and drive federated DP jobs.",
)
out = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 200)

DEFAULT_SERVER = "127.0.0.1:50051"
ServerOpt = Annotated[
    str,
    typer.Option("--server", "-s", envvar="DPFED_SERVER", help="orchestrator HOST:PORT"),
]


CaOpt = Annotated[Path | None, typer.Option("--ca", envvar="DPFED_CA", help="CA certificate (PEM)")]
CertOpt = Annotated[
    Path | None, typer.Option("--cert", envvar="DPFED_CERT", help="your certificate (PEM)")
]
KeyOpt = Annotated[
    Path | None, typer.Option("--key", envvar="DPFED_KEY", help="your private key (PEM)")
]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure", envvar="DPFED_INSECURE", help="plaintext, loopback only (development)"
    ),
]


def _client(
    server: str, ca: Path | None, cert: Path | None, key: Path | None, insecure: bool
) -> ControlClient:
    if insecure:
        return ControlClient(server)
    if ca is None or cert is None or key is None:
        raise InvalidSpecError(
            "mutual TLS needs --ca, --cert and --key (or DPFED_CA, DPFED_CERT, DPFED_KEY); "
            "use --insecure only for a plaintext orchestrator on loopback"
        )
    return ControlClient(server, tls=TlsFiles(ca=ca, cert=cert, key=key))


def _fmt_eps(x: float) -> str:
    return "-" if not math.isfinite(x) or x == 0 else f"{x:.3f}"


def _fmt_time(t: float) -> str:
    if t <= 0:
        return "-"
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_metric(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.3f}"


@app.command()
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


@app.command()
def launch(
    job_file: Annotated[Path, typer.Argument(help="job.yaml")],
    server: ServerOpt = DEFAULT_SERVER,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
    wait: Annotated[bool, typer.Option("--wait", help="follow the job until it ends")] = False,
) -> None:
    """Submit a job; print its id (last line of stdout). With --wait, exit 0 only on release."""
    spec = load_any_job_spec(job_file)
    with _client(server, ca, cert, key, insecure) as client:
        job_id = client.submit(spec.model_dump_json())
        print(job_id, flush=True)
        _await_admission(client, job_id)
        if wait:
            rounds = spec.max_rounds if isinstance(spec, GmmJobSpec) else spec.rounds
            final = _follow(client, job_id, rounds)
            _print_result(final)
            if final.state != "completed" or not final.model_released:
                raise JobFailedError(f"job {job_id} {final.state}: {final.error or 'no model'}")


def _await_admission(client: ControlClient, job_id: str) -> None:
    """Return once the sites have admitted the job (it left "pending"); a job that fewer than
    min_sites admitted fails launch here (exit 4), naming each refusing site and its reason,
    before any site trained (orchestrator.admission)."""
    from orchestrator.admission import ADMISSION_REFUSED

    status = client.job(job_id)
    if status.state == "pending":
        err_console.print(f"{job_id}: waiting for the sites to admit the job")
    while status.state == "pending":
        time.sleep(0.5)
        status = client.job(job_id)
    if status.state == "failed" and status.error.startswith(ADMISSION_REFUSED):
        raise PolicyRefusal(f"job {job_id} was not started: {status.error}")


def _follow(client: ControlClient, job_id: str, rounds: int) -> JobStatus:
    last: JobStatus | None = None
    seen_events = 0
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as progress:
        bar = progress.add_task(f"{job_id} rounds", total=rounds, info="waiting for sites")
        for status in client.watch(job_id):
            last = status
            for ev in status.events[seen_events:]:
                if ev.level != "info":
                    who = f"\\[{inert(ev.site_id)}] " if ev.site_id else ""
                    progress.console.print(
                        f"[yellow]{inert(ev.level)}[/]: {who}{inert(ev.message)}"
                    )
            seen_events = len(status.events)
            info = inert(status.state)
            if status.history:
                h = status.history[-1]
                m = _last_metrics(status)
                info = (metrics_summary(m) + "  " if m else "") + f"ε {_fmt_eps(h.epsilon)}"
            progress.update(bar, completed=status.round, info=info)
    if last is None:
        raise DpfedError(f"lost track of job {job_id}")
    if not last.terminal:
        last = client.job(job_id)
    return last


def _last_metrics(status: JobStatus) -> PooledMetrics | None:
    return next((h.metrics for h in reversed(status.history) if h.metrics is not None), None)


def _print_result(status: JobStatus) -> None:
    if status.state == "completed":
        err_console.print(
            f"[green]completed[/]: model released, ε = {status.epsilon:.4g}, δ = {status.delta:g} "
            f"({status.accountant.upper()} accountant, max over {len(status.sites)} sites)"
        )
        final = next((h for h in reversed(status.history) if h.metrics is not None), None)
        if final is not None:
            err_console.print(
                f"validation (round {final.round}, ± the DP noise's standard error): "
                + metrics_summary(final.metrics)
            )
    else:
        err_console.print(f"[red]{inert(status.state)}[/]: {inert(status.error, newlines=True)}")


@app.command()
def plan(
    job_file: Annotated[Path, typer.Argument(help="job.yaml")],
    server: ServerOpt = DEFAULT_SERVER,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Project each site's ε for a job before launching it, and who would refuse."""
    spec = load_job_spec(job_file)
    with _client(server, ca, cert, key, insecure) as client:
        p = client.plan(spec.model_dump_json())
    t = Table(
        title=f"plan for dataset {inert(repr(spec.dataset))}, {spec.rounds} rounds, δ={p.delta:g}"
    )
    for col in (
        "site",
        "rows",
        "σ",
        "q",
        "steps",
        "job ε",
        "lifetime ε before → after",
        "budget",
        "verdict",
    ):
        t.add_column(col)
    for s in p.sites:
        t.add_row(
            inert(s.site_id),
            str(s.num_examples),
            f"{s.noise_multiplier:.3g}",
            f"{s.sample_rate:.3g}",
            str(s.steps),
            _fmt_eps(s.projected_epsilon),
            f"{s.dataset_epsilon_before:.3f} → {s.dataset_epsilon_after:.3f}",
            f"{s.max_epsilon:.3g}",
            f"[red]refuse[/]: {inert(s.reason)}" if s.would_refuse else "[green]ok[/]",
        )
    out.print(t)
    verdict = "feasible" if p.feasible else f"NOT feasible: {inert(p.message, newlines=True)}"
    out.print(f"released model ε ≈ {p.epsilon:.3f} ({p.accountant.upper()}); {verdict}")
    out.print(metrics_plan_summary(spec))
    if not p.feasible:
        raise typer.Exit(4)


@app.command()
def status(
    job_id: Annotated[str, typer.Argument()],
    server: ServerOpt = DEFAULT_SERVER,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show one job: state, rounds, metrics per round, each site's spend, events."""
    with _client(server, ca, cert, key, insecure) as client:
        s = client.job(job_id)
    if as_json:
        from dataclasses import asdict

        print(json.dumps(asdict(s), default=str, indent=2))
        return
    out.print(
        f"[bold]{inert(s.job_id)}[/] {inert(s.name)}  dataset={inert(s.dataset)}  "
        f"state={inert(s.state)}  rounds {s.round}/{s.rounds}  ε={_fmt_eps(s.epsilon)} "
        f"δ={s.delta:g}" + (f"\n[red]error:[/] {inert(s.error, newlines=True)}" if s.error else "")
    )
    if s.history:
        t = Table(title="rounds")
        cols = (
            "round",
            "sites",
            "examples",
            "val loss",
            "val acc",
            "val AUC",
            "ε after",
            "seconds",
        )
        for col in cols:
            t.add_column(col)
        for h in s.history:
            m = h.metrics  # ± the DP noise's standard error (orchestrator.metric_pooling)
            t.add_row(
                str(h.round),
                inert(", ".join(h.site_ids)),
                str(h.num_examples),
                format_estimate(m.loss) if m else _fmt_metric(h.loss),
                format_estimate(m.accuracy) if m else _fmt_metric(h.accuracy),
                format_estimate(m.auc) if m else "-",
                _fmt_eps(h.epsilon),
                f"{h.duration_s:.1f}",
            )
        out.print(t)
    if s.sites:
        t = Table(title="privacy spend per site (this job)")
        for col in ("site", "examples", "σ", "q", "steps", "C", "ε (job)", "dataset ε (lifetime)"):
            t.add_column(col)
        for sp in s.sites:
            t.add_row(
                inert(sp.site_id),
                str(sp.num_examples),
                f"{sp.noise_multiplier:.3g}",
                f"{sp.sample_rate:.3g}",
                str(sp.steps),
                f"{sp.max_grad_norm:g}",
                _fmt_eps(sp.epsilon),
                _fmt_eps(sp.dataset_epsilon),
            )
        out.print(t)
    if s.events:
        t = Table(title="events")
        for col in ("time", "level", "site", "message"):
            t.add_column(col)
        for ev in s.events[-20:]:
            t.add_row(
                _fmt_time(ev.time), inert(ev.level), inert(ev.site_id or "-"), inert(ev.message)
            )
        out.print(t)


@app.command()
def jobs(
    server: ServerOpt = DEFAULT_SERVER,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """List jobs."""
    with _client(server, ca, cert, key, insecure) as client:
        rows = client.jobs()
    t = Table(title="jobs")
    for col in ("job", "name", "dataset", "state", "rounds", "ε", "δ", "model", "created"):
        t.add_column(col)
    for j in rows:
        t.add_row(
            inert(j.job_id),
            inert(j.name or "-"),
            inert(j.dataset),
            inert(j.state),
            f"{j.round}/{j.rounds}",
            _fmt_eps(j.epsilon),
            f"{j.delta:g}",
            "released" if j.model_released else "-",
            _fmt_time(j.created_at),
        )
    out.print(t)


@app.command()
def sites(
    server: ServerOpt = DEFAULT_SERVER,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """List registered sites and the datasets each exposes (name, rows, columns)."""
    with _client(server, ca, cert, key, insecure) as client:
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
                _fmt_time(s.last_seen) if i == 0 else "",
                inert(s.version) if i == 0 else "",
                inert(d.name),
                _fmt_rows(d.dp_num_rows),
                f"{inert(cols)} → label {inert(d.label)}",
                f"{d.epsilon_spent:.3f} / {d.max_epsilon:.3g}",
            )
    out.print(t)


def _fmt_rows(dp_rows: float) -> str:
    if dp_rows < 0:  # the site's σ floor or budget did not allow the count (site_agent.data.catalog)
        return "withheld (budget)"
    return f"≈{dp_rows:,.0f}"


def _fmt_column(c: ColumnInfo) -> str:
    if c.type == "categorical":
        cats = ", ".join(c.categories[:5]) + (", …" if len(c.categories) > 5 else "")
        return f"{c.name}: categorical {{{cats}}}"
    if c.min is not None and c.max is not None:
        return f"{c.name}: numeric [{c.min:g}, {c.max:g}]"
    return f"{c.name}: numeric"


@app.command()
def datasets(
    server: ServerOpt = DEFAULT_SERVER,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """The catalog: each site's datasets, declared schema and a DP row count (no values)."""
    with _client(server, ca, cert, key, insecure) as client:
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
            shown = "; ".join(_fmt_column(c) for c in schema[:6])
            if len(schema) > 6:
                shown += f"; … ({len(schema)} columns)"
            t.add_row(
                inert(s.site_id),
                inert(d.name),
                inert(d.source),
                _fmt_rows(d.dp_num_rows),
                inert(d.label),
                inert(shown),
            )
    out.print(t)


@app.command()
def ledger(
    server: ServerOpt = DEFAULT_SERVER,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Privacy spend per site, dataset and job, with each dataset's lifetime spend."""
    with _client(server, ca, cert, key, insecure) as client:
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
            _fmt_eps(r.epsilon),
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


@app.command()
def pull(
    job_id: Annotated[str, typer.Argument()],
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write the model into")],
    server: ServerOpt = DEFAULT_SERVER,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Download a released model: OUT/model.safetensors and OUT/model_card.json."""
    with _client(server, ca, cert, key, insecure) as client:
        card, weights = client.download(job_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = json.loads(card)
    if c.get("kind") == "gmm":
        (out_dir / "mixture.json").write_bytes(weights)
        (out_dir / "model_card.json").write_text(card)
        err_console.print(
            f"wrote {out_dir}/mixture.json and model_card.json (K = {inert(c['model']['K'])}, "
            f"ε = {c['epsilon']:.4g}, δ = {c['delta']:g}); load with "
            f"common.clustering.released.load_mixture({str(out_dir)!r}).predict(X)"
        )
        return
    (out_dir / "model.safetensors").write_bytes(weights)
    (out_dir / "model_card.json").write_text(card)
    err_console.print(
        f"wrote {out_dir}/model.safetensors and model_card.json "
        f"(ε = {c['epsilon']:.4g}, δ = {c['delta']:g}); load with "
        f"common.training.models.load_model({str(out_dir)!r})"
    )


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument()],
    server: ServerOpt = DEFAULT_SERVER,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Cancel a running job (no model is released): its submitter or an operator may."""
    with _client(server, ca, cert, key, insecure) as client:
        s = client.cancel(job_id)
    err_console.print(f"{inert(s.job_id)}: {inert(s.state)} ({inert(s.error)})")


@app.command("site")
def site_enable(
    site_id: Annotated[str, typer.Argument()],
    action: Annotated[str, typer.Argument(help="enable | disable")],
    server: ServerOpt = DEFAULT_SERVER,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Operators only: disable a site (refused at registration, never scheduled) or re-enable it."""
    if action not in ("enable", "disable"):
        raise InvalidSpecError(f"action must be enable or disable, not {action!r}")
    with _client(server, ca, cert, key, insecure) as client:
        s = client.set_site_enabled(site_id, action == "enable")
    err_console.print(f"site {inert(s.site_id)}: {inert(s.state)}")


@app.command()
def evaluate(
    job_id: Annotated[str, typer.Argument()],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="the sites' dataset")],
    noise_multiplier: Annotated[
        float, typer.Option(help="Gaussian noise on each site's sums (charged to its ledger)")
    ] = 10.0,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the sites")] = 300.0,
    server: ServerOpt = DEFAULT_SERVER,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Evaluate a released model on each site's data: DP-noised metrics, charged to the sites."""
    with _client(server, ca, cert, key, insecure) as client:
        ev = client.evaluate(
            job_id, dataset=dataset, noise_multiplier=noise_multiplier, timeout_s=timeout
        )
    t = Table(title=f"{job_id} on dataset {dataset!r} (noised sums, σ={noise_multiplier:g})")
    for col in ("site", "rows", "accuracy", "loss", "AUC", "ε (this evaluation)", "note"):
        t.add_column(col)
    for s in ev.sites:
        one = (
            None
            if s.metrics is None
            else pool_metrics(
                [s.metrics], noise_multiplier=noise_multiplier, loss_bound=EVALUATE_LOSS_BOUND
            )
        )
        t.add_row(
            inert(s.site_id),
            format_estimate(one.num_examples) if one else "-",
            format_estimate(one.accuracy) if one else "-",
            format_estimate(one.loss) if one else "-",
            format_estimate(one.auc) if one else "-",
            _fmt_eps(s.epsilon),
            inert(s.error),
        )
    out.print(t)
    rows = f"{ev.metrics.num_examples.value:.0f}" if ev.metrics else "0"
    out.print(
        f"pooled over ≈{rows} rows (± the DP noise's standard error): "
        f"{metrics_summary(ev.metrics)}; cost ε = {ev.epsilon:.3g}, δ = {ev.delta:g} "
        "(max over sites)"
    )


@app.command()
def synth(
    dataset: Annotated[str, typer.Argument(help="the sites' dataset")],
    epsilon: Annotated[float, typer.Option("--epsilon", help="ε each site spends (δ=1e-5)")],
    rows: Annotated[int, typer.Option("--rows", help="synthetic rows to sample")],
    out_file: Annotated[
        Path, typer.Option("--out", help="CSV file to write (autoregressive: .csv or .parquet)")
    ],
    columns: Annotated[
        str | None, typer.Option(help="comma-separated columns (default: all, at most 16)")
    ] = None,
    bins: Annotated[int, typer.Option(help="bins per numeric column")] = 8,
    server: ServerOpt = DEFAULT_SERVER,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
    method: Annotated[
        str,
        typer.Option(help="mst (noisy marginals) or autoregressive (a DP-SGD-trained model)"),
    ] = "mst",
    seed: Annotated[int | None, typer.Option(help="autoregressive: seed of the draw")] = None,
    rounds: Annotated[int, typer.Option(help="autoregressive: training rounds")] = 20,
    model_out: Annotated[
        Path | None, typer.Option(help="autoregressive: keep the released model in this folder")
    ] = None,
) -> None:
    """DP synthetic rows with the dataset's schema, for prototyping (charged to each site)."""
    if method == "autoregressive":  # orchestrator.synth_autoregressive (issue 20)
        from orchestrator import synth_autoregressive as ar

        opts = ar.SynthOptions(epsilon=epsilon, rounds=rounds, quantile_bins=bins)
        with _client(server, ca, cert, key, insecure) as client:
            res = ar.run(client, dataset, opts, rows=rows, seed=seed, model_dir=model_out)
        ar.write_table(res.table, out_file)
        err_console.print(
            f"wrote {rows} synthetic rows to {out_file} from job {inert(res.job_id)} "
            f"(ε = {res.card['epsilon']:.4g}, δ = {res.card['delta']:g}, max over sites)"
        )
        return
    if method != "mst":
        raise InvalidSpecError(f"--method is mst or autoregressive, not {method!r}.")
    cols = tuple(c.strip() for c in columns.split(",") if c.strip()) if columns else ()
    with _client(server, ca, cert, key, insecure) as client:
        csv_text, info = client.synthesize(
            dataset, epsilon=epsilon, rows=rows, bins=bins, columns=cols
        )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(csv_text)
    err_console.print(
        f"wrote {rows} synthetic rows to {out_file}: {inert(info['guarantee'])}; sites "
        f"{inert(', '.join(str(s) for s in info['sites']))}"  # type: ignore[attr-defined]
        + (f"; missing: {inert(info['sites_missing'])}" if info.get("sites_missing") else "")
    )


certs = typer.Typer(no_args_is_help=True, help="The deployment's certificates (mutual TLS).")
app.add_typer(certs, name="certs")


@certs.command("init")
def certs_init(
    pki_dir: Annotated[Path, typer.Option(help="folder for the CA and certificates")],
    site: Annotated[list[str] | None, typer.Option(help="a site id (repeat)")] = None,
    user: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME:ROLE with ROLE operator, data-scientist or monitor (read-only) (repeat)"
        ),
    ] = None,
    host: Annotated[
        list[str] | None, typer.Option(help="orchestrator host name/IP (repeat)")
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="validity of each certificate")] = DEFAULT_DAYS,
) -> None:
    """Create a CA, the orchestrator's certificate, one per site and one per CLI user."""
    from common.rpc.tls import init_pki

    users: list[tuple[str, str]] = []
    for u in user or ["operator:operator", "analyst:data-scientist"]:
        name, sep, role = u.partition(":")
        if not sep or role not in ROLES:
            raise InvalidSpecError(f"--user {u!r}: expected NAME:ROLE with ROLE in {ROLES}")
        users.append((name, role))
    files = init_pki(
        pki_dir,
        sites=site or [],
        users=users,
        hosts=tuple(host or ("127.0.0.1", "::1", "localhost")),
        days=days,
    )
    t = Table(title=f"certificates in {pki_dir} (keep ca.key offline; give each party its own)")
    for col in ("for", "certificate", "key"):
        t.add_column(col)
    for who, f in files.items():
        t.add_row(who, str(f.cert), str(f.key))
    out.print(t)


@certs.command("issue")
def certs_issue(
    pki_dir: Annotated[Path, typer.Option(help="folder holding ca.pem and ca.key")],
    name: Annotated[str, typer.Option(help="site id or user name")],
    role: Annotated[str, typer.Option(help=f"one of {', '.join(ROLES)}")],
    days: Annotated[int, typer.Option(min=1, help="validity of the certificate")] = DEFAULT_DAYS,
    host: Annotated[
        list[str] | None,
        typer.Option(help="orchestrator role only: a host name/IP it serves (repeat)"),
    ] = None,
) -> None:
    """Issue a certificate from an existing CA: a new site or user, or a rotation (the one it
    replaces stays valid until you revoke its serial)."""
    from common.rpc.tls import issue, issued, revoked_serials

    revoked = revoked_serials(pki_dir)
    before = [c for c in issued(pki_dir) if c.name == name and c.serial not in revoked]
    f = issue(pki_dir, name=name, role=role, days=days, hosts=tuple(host or ()))
    new = next(
        c
        for c in issued(pki_dir)
        if c.name == name and c.serial not in revoked and c.serial not in {b.serial for b in before}
    )
    out.print(
        f"{role} {name}: certificate {f.cert} (serial {new.serial_hex}, valid until "
        f"{_fmt_time(new.not_after)}), key {f.key}, CA {f.ca}"
    )
    for old in before:
        out.print(
            f"the earlier certificate of {name} (serial {old.serial_hex}) is still valid: once "
            f"{name} uses the new one, run `orchestrator certs revoke --pki-dir {pki_dir} "
            f"{old.serial_hex}`"
        )


@certs.command("revoke")
def certs_revoke(
    target: Annotated[str, typer.Argument(help="a name (all its certificates) or a serial")],
    pki_dir: Annotated[Path, typer.Option(help="folder holding ca.pem and ca.key")],
) -> None:
    """Revoke certificates: the orchestrator refuses them from its next call on (crl.pem)."""
    from common.rpc.tls import CRL_FILE, revoke

    done = revoke(pki_dir, target)
    if not done:
        out.print(f"{target}: already revoked")
    for c in done:
        out.print(f"revoked {c.role} {c.name} (serial {c.serial_hex}) in {pki_dir / CRL_FILE}")


@certs.command("list")
def certs_list(
    pki_dir: Annotated[Path, typer.Option(help="folder holding ca.pem and issued.json")],
) -> None:
    """Every certificate the CA issued: name, role, serial, expiry, revoked or not."""
    from common.rpc.tls import issued, revoked_serials

    revoked = revoked_serials(pki_dir)
    t = Table(title=f"certificates issued by the CA in {pki_dir}")
    for col in ("name", "role", "serial", "valid until", "status"):
        t.add_column(col)
    now = dt.datetime.now().timestamp()
    for c in sorted(issued(pki_dir), key=lambda c: (c.name, c.not_after)):
        status = "revoked" if c.serial in revoked else "expired" if c.not_after <= now else "valid"
        t.add_row(c.name, c.role, c.serial_hex, _fmt_time(c.not_after), status)
    out.print(t)


def main(argv: Sequence[str] | None = None) -> int:
    return run_app(app, argv, prog="orchestrator")


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run()
