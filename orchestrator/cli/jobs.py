"""Job commands: launch (and follow), plan, status, jobs, cancel."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.cli_support import err_console, inert
from common.domain import JobStatus, PooledMetrics
from common.errors import DpfedError, JobFailedError, PolicyRefusal
from common.specs import GmmJobSpec, load_any_job_spec, load_job_spec
from orchestrator.cli.connection import Connection, connected
from orchestrator.cli.formatting import fmt_eps, fmt_metric, fmt_time, out
from orchestrator.client import ControlClient
from orchestrator.metric_pooling import (
    format_estimate,
    metrics_plan_summary,
    metrics_summary,
)


@connected
def launch(
    job_file: Annotated[Path, typer.Argument(help="job.yaml")],
    *,
    conn: Connection,
    wait: Annotated[bool, typer.Option("--wait", help="follow the job until it ends")] = False,
) -> None:
    """Submit a job; print its id (last line of stdout). With --wait, exit 0 only on release."""
    spec = load_any_job_spec(job_file)
    with conn.client() as client:
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
                info = (metrics_summary(m) + "  " if m else "") + f"ε {fmt_eps(h.epsilon)}"
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


@connected
def plan(
    job_file: Annotated[Path, typer.Argument(help="job.yaml")],
    *,
    conn: Connection,
) -> None:
    """Project each site's ε for a job before launching it, and who would refuse."""
    spec = load_job_spec(job_file)
    with conn.client() as client:
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
            fmt_eps(s.projected_epsilon),
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


@connected
def status(
    job_id: Annotated[str, typer.Argument()],
    *,
    conn: Connection,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show one job: state, rounds, metrics per round, each site's spend, events."""
    with conn.client() as client:
        s = client.job(job_id)
    if as_json:
        from dataclasses import asdict

        print(json.dumps(asdict(s), default=str, indent=2))
        return
    out.print(
        f"[bold]{inert(s.job_id)}[/] {inert(s.name)}  dataset={inert(s.dataset)}  "
        f"state={inert(s.state)}  rounds {s.round}/{s.rounds}  ε={fmt_eps(s.epsilon)} "
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
                format_estimate(m.loss) if m else fmt_metric(h.loss),
                format_estimate(m.accuracy) if m else fmt_metric(h.accuracy),
                format_estimate(m.auc) if m else "-",
                fmt_eps(h.epsilon),
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
                fmt_eps(sp.epsilon),
                fmt_eps(sp.dataset_epsilon),
            )
        out.print(t)
    if s.events:
        t = Table(title="events")
        for col in ("time", "level", "site", "message"):
            t.add_column(col)
        for ev in s.events[-20:]:
            t.add_row(
                fmt_time(ev.time), inert(ev.level), inert(ev.site_id or "-"), inert(ev.message)
            )
        out.print(t)


@connected
def jobs(
    *,
    conn: Connection,
) -> None:
    """List jobs."""
    with conn.client() as client:
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
            fmt_eps(j.epsilon),
            f"{j.delta:g}",
            "released" if j.model_released else "-",
            fmt_time(j.created_at),
        )
    out.print(t)


@connected
def cancel(
    job_id: Annotated[str, typer.Argument()],
    *,
    conn: Connection,
) -> None:
    """Cancel a running job (no model is released): its submitter or an operator may."""
    with conn.client() as client:
        s = client.cancel(job_id)
    err_console.print(f"{inert(s.job_id)}: {inert(s.state)} ({inert(s.error)})")
