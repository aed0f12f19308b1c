"""``orchestrator synth DATASET --method autoregressive``: a DP generator trained like any model.

The synthesizer (:mod:`common.synthesis.autoregressive`) is an ordinary training job: its
spec lists the columns of the encoding derived from the sites' agreed declared schema
(:func:`synth_job_spec`), the sites train it with federated DP-SGD on the negative
log-likelihood of their encoded rows (``site_agent.generative``), every site charges its
ledger, and the orchestrator releases it with a model card. Sampling then happens here, from
the released weights only (post-processing): ``rows`` rows drawn with ``seed``, decoded to
the declared schema and written as CSV or Parquet (:func:`write_table`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from common.errors import InvalidSpecError, JobFailedError
from common.schema.encoding import FeatureEncoding, derive_encoding, uniform_edges
from common.specs import JobSpec, parse_job_spec
from common.synthesis.autoregressive import AutoregressiveNet, sample_table
from common.synthesis.autoregressive_spec import (
    AutoregressiveSpec,
    columns_of,
    layout_disagreement,
)
from common.training.models import CARD_FILE, WEIGHTS_FILE, load_model
from common.training.pipeline import card_encoding
from orchestrator.client import ControlClient
from orchestrator.schemas import agree


@dataclass(frozen=True)
class SynthOptions:
    """How the synthesizer is trained (all public; they go into the job spec)."""

    epsilon: float
    """Target ε each site spends on the job (δ below), the quantile edges included."""
    delta: float = 1e-5
    rounds: int = 20
    local_epochs: float = 1.0
    batch_size: int = 512
    lr: float = 0.01
    max_grad_norm: float = 1.0
    hidden: int = 16
    bins: int = 20
    """Bins of each numeric column's density (on its encoded position)."""
    numeric: str = "quantile"
    """The job's numeric encoding: ``quantile`` (DP edges, charged) or ``minmax``."""
    quantile_bins: int = 8
    quantile_noise_multiplier: float = 10.0
    seed: int | None = None
    """Seeds the initial weights (public); never the sites' DP noise."""


def agreed_encoding(
    client: ControlClient, dataset: str, *, numeric: str, quantile_bins: int
) -> FeatureEncoding:
    """The encoding the orchestrator will derive for ``dataset`` (layout only: quantile edges
    are uniform placeholders of the right width until the job releases the DP ones)."""
    holders = [
        (s.site_id, d)
        for s in client.sites()
        if s.state != "offline"
        for d in s.datasets
        if d.name == dataset
    ]
    if not holders:
        raise InvalidSpecError(f"No online site holds a dataset named {dataset!r}.")
    agreement = agree(dataset, holders)
    edges = None
    if numeric == "quantile":
        edges = {
            c.name: uniform_edges(c.min, c.max, quantile_bins)
            for c in agreement.features
            if c.type == "numeric" and c.min is not None and c.max is not None
        }
    return derive_encoding(agreement.features, agreement.label, numeric=numeric, edges=edges)


def synth_job_spec(dataset: str, encoding: FeatureEncoding, opts: SynthOptions) -> JobSpec:
    """The training job of the synthesizer for ``dataset`` (its metrics are off: they would
    score a classifier, and cost budget)."""
    model = AutoregressiveSpec(
        kind="autoregressive", columns=columns_of(encoding), hidden=opts.hidden, bins=opts.bins
    )
    data: dict[str, Any] = {
        "name": f"synth-{dataset}",
        "dataset": dataset,
        "model": model.model_dump(mode="json", exclude_none=True),
        "rounds": opts.rounds,
        "local_epochs": opts.local_epochs,
        "batch_size": opts.batch_size,
        "optimizer": {"name": "adam", "lr": opts.lr},
        "dp": {
            "target_epsilon": opts.epsilon,
            "max_grad_norm": opts.max_grad_norm,
            "delta": opts.delta,
        },
        "metrics": {"enabled": False},
        "encoding": {"numeric": opts.numeric},
    }
    if opts.numeric == "quantile":
        data["encoding"].update(
            bins=opts.quantile_bins, quantile_noise_multiplier=opts.quantile_noise_multiplier
        )
    if opts.seed is not None:
        data["seed"] = opts.seed
    return parse_job_spec(data, source="synthesizer job")


def load_synthesizer(model_dir: Path) -> tuple[AutoregressiveNet, FeatureEncoding, dict[str, Any]]:
    """The released synthesizer in ``model_dir``, its encoding and its card.

    Raises:
        InvalidSpecError: the folder holds another kind of model, or one whose columns are
            not its encoding's.
    """
    net = load_model(model_dir)
    card = json.loads((model_dir / CARD_FILE).read_text(encoding="utf-8"))
    if not isinstance(net, AutoregressiveNet):
        raise InvalidSpecError(f"{model_dir} holds a classifier, not an autoregressive model.")
    encoding = card_encoding(card, source=f"model card {model_dir / CARD_FILE}")
    spec = AutoregressiveSpec.model_validate(card["model"])
    problem = layout_disagreement(spec, encoding)
    if problem is not None:
        raise InvalidSpecError(f"The released synthesizer does not fit its encoding: {problem}.")
    return net, encoding, card


def write_table(table: pd.DataFrame, out: Path) -> None:
    """CSV (missing cells empty) or Parquet (by the suffix; numbers float64, categories as
    strings, missing as null)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".parquet":
        table.to_parquet(out, index=False)
    elif suffix == ".csv":
        table.to_csv(out, index=False, na_rep="")
    else:
        raise InvalidSpecError(f"--out must end in .csv or .parquet, not {out.name!r}.")


@dataclass(frozen=True)
class SynthResult:
    job_id: str
    table: pd.DataFrame
    card: dict[str, Any]


def run(
    client: ControlClient,
    dataset: str,
    opts: SynthOptions,
    *,
    rows: int,
    seed: int | None,
    model_dir: Path | None = None,
) -> SynthResult:
    """Train the synthesizer on ``dataset`` at the sites, then sample ``rows`` rows here.

    ``model_dir`` keeps the released model (a temporary folder otherwise).

    Raises:
        JobFailedError: the job did not release a model (its error named).
    """
    encoding = agreed_encoding(
        client, dataset, numeric=opts.numeric, quantile_bins=opts.quantile_bins
    )
    spec = synth_job_spec(dataset, encoding, opts)
    job_id = client.submit(spec.model_dump_json())
    last = client.job(job_id)
    for st in client.watch(job_id):
        last = st
    if last.state != "completed" or not last.model_released:
        raise JobFailedError(f"synthesizer job {job_id} {last.state}: {last.error or 'no model'}")
    card_text, weights = client.download(job_id)
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_dir if model_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CARD_FILE).write_text(card_text, encoding="utf-8")
        (folder / WEIGHTS_FILE).write_bytes(weights)
        net, enc, card = load_synthesizer(folder)
    return SynthResult(job_id=job_id, table=sample_table(net, enc, rows, seed=seed), card=card)
