"""What jobs release: pull a released model, evaluate it on the sites' data, and DP
synthetic rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from common.cli_support import err_console, inert
from common.errors import InvalidSpecError
from orchestrator.cli.connection import Connection, connected
from orchestrator.cli.formatting import fmt_eps, out
from orchestrator.metric_pooling import (
    EVALUATE_LOSS_BOUND,
    format_estimate,
    metrics_summary,
    pool_metrics,
)


@connected
def pull(
    job_id: Annotated[str, typer.Argument()],
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write the model into")],
    *,
    conn: Connection,
) -> None:
    """Download a released model into OUT: model_card.json and the model (model.safetensors;
    mixture.json for a mixture)."""
    with conn.client() as client:
        card, weights = client.download(job_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = json.loads(card)
    # The kind's registry entry names the file and how to load it (lazily: the registry
    # imports the job machinery, which the other commands do not need).
    from orchestrator.jobs.kinds import released_files

    name, summary, load_hint = released_files(c)
    (out_dir / name).write_bytes(weights)
    (out_dir / "model_card.json").write_text(card)
    err_console.print(
        f"wrote {out_dir}/{name} and model_card.json ({inert(summary)}ε = {c['epsilon']:.4g}, "
        f"δ = {c['delta']:g}); load with {load_hint.format(path=str(out_dir))}"
    )


@connected
def evaluate(
    job_id: Annotated[str, typer.Argument()],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="the sites' dataset")],
    noise_multiplier: Annotated[
        float, typer.Option(help="Gaussian noise on each site's sums (charged to its ledger)")
    ] = 10.0,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the sites")] = 300.0,
    *,
    conn: Connection,
) -> None:
    """Evaluate a released model on each site's data: DP-noised metrics, charged to the sites."""
    with conn.client() as client:
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
            fmt_eps(s.epsilon),
            inert(s.error),
        )
    out.print(t)
    rows = f"{ev.metrics.num_examples.value:.0f}" if ev.metrics else "0"
    out.print(
        f"pooled over ≈{rows} rows (± the DP noise's standard error): "
        f"{metrics_summary(ev.metrics)}; cost ε = {ev.epsilon:.3g}, δ = {ev.delta:g} "
        "(max over sites)"
    )


@connected
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
    *,
    conn: Connection,
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
    if method == "autoregressive":  # orchestrator.synth_autoregressive
        from orchestrator import synth_autoregressive as ar

        opts = ar.SynthOptions(epsilon=epsilon, rounds=rounds, quantile_bins=bins)
        with conn.client() as client:
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
    with conn.client() as client:
        csv_text, info = client.synthesize(
            dataset, epsilon=epsilon, rows=rows, bins=bins, columns=cols
        )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(csv_text)
    err_console.print(
        f"wrote {rows} synthetic rows to {out_file} (release {inert(info['job_id'])}, in "
        f"`orchestrator ledger`): {inert(info['guarantee'])}; sites "
        f"{inert(', '.join(str(s) for s in info['sites']))}"  # type: ignore[attr-defined]
        + (f"; missing: {inert(info['sites_missing'])}" if info.get("sites_missing") else "")
    )
