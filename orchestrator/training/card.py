"""A trained model's card: the fields of every card (``orchestrator.jobs.model_card``) and what
training adds (each site's DP-SGD totals, the encoding, every round's metrics, the training
parameters, site-level DP)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.domain import SiteSpend
from common.dp.accounting import compute_epsilon
from common.specs import JobSpec
from orchestrator.core.store import JobRow, RoundRow
from orchestrator.jobs.accounting import ACCOUNTANT, charged_event_dict
from orchestrator.jobs.model_card import model_card
from orchestrator.metric_pooling import metrics_card
from orchestrator.planning import quantile_event
from orchestrator.training.site_dp import site_level_events

GUARANTEE = (
    "Sample-level (ε, δ)-differential privacy under add/remove of one record at any single "
    "site, for the released model and metrics: every noised model update and noised "
    "validation-metric release of that site that the orchestrator accepted, plus any it "
    "received in a round interrupted by a restart, and every update the orchestrator "
    "rejected (it does not enter the model, but it depended on the site's data and its "
    "rejection is published, so it is counted at the most its task could have cost). Sites "
    "hold disjoint records, so the "
    "model's ε is the maximum of the per-site ε (parallel composition). ε is an upper bound "
    "from Opacus's PRV accountant (Gopi et al. 2021), composed over every DP-SGD step "
    "and metric release. Row counts and the sample rate of each site are treated as public."
)

REJECTED_UPDATES = (
    "counted: an update the orchestrator rejected is charged to its site's ε at the most its "
    "assigned task could have cost, because it depended on the site's data and its rejection "
    "is published (the job's events, the sites of each round)"
)


def encoding_card(spec: JobSpec) -> dict[str, Any]:
    """What the card says about the features: the encoding ``load_pipeline`` applies
    (``"encoding"``), each feature's declaration and slots, the classes, and where the
    encoding's parameters came from (empty for a spec without a derived encoding)."""
    if not spec.encoding.derived:
        return {}
    enc = spec.encoding.feature_encoding(require_edges=True)
    q = quantile_event(spec)
    return {
        "encoding": enc.to_dict(),
        "features": [
            {**f.to_dict(), "encoding": f.kind, "slots": f.slot_names()} for f in enc.features
        ],
        "label": enc.label.name,
        "classes": list(enc.classes),
        "encoding_privacy": (
            "numeric columns scaled by their declared bounds and categories one-hot over their "
            "declared lists: derived from the sites' declared schemas, no data used"
            if q is None
            else (
                "quantile bin edges of numeric columns from the sites' Gaussian-noised "
                f"histograms (noise multiplier {q.noise_multiplier:g}), charged to every site "
                "and included in ε; bounds and categories from the declared schemas"
            )
        ),
    }


def training_card(
    *,
    row: JobRow,
    spec: JobSpec,
    rounds: list[RoundRow],
    sites: list[SiteSpend],
    epsilon: float,
    accountant: str,
    secure_noise: Mapping[str, bool],
) -> dict[str, Any]:
    """``sites``: each site's spend with its exact ε (``JobAccount.spends``); ``epsilon`` and
    ``accountant``: the released ε and the accountant that bounded it; ``secure_noise``: each
    site's declared ``policy.secure_noise``."""
    exact = any(r.metrics_exact for r in rounds)
    card = model_card(
        kind="train",
        job_id=row.job_id,
        name=row.name,
        dataset=spec.dataset,
        model=spec.model.model_dump(mode="json"),
        epsilon=epsilon,
        delta=spec.dp.delta,
        accountant=accountant,
        guarantee=GUARANTEE,
        rounds=len(rounds),
        sites=[
            {
                "site_id": s.site_id,
                "num_examples": s.num_examples,
                "noise_multiplier": s.noise_multiplier,
                "sample_rate": s.sample_rate,
                "steps": s.steps,
                "max_grad_norm": s.max_grad_norm,
                "epsilon": s.epsilon,
                "dataset_epsilon_lifetime": s.dataset_epsilon,
                "events": [charged_event_dict(e) for e in s.events],
            }
            for s in sites
        ],
        secure_noise=secure_noise,
        dp=spec.dp.model_dump(mode="json"),
        metrics=[
            {
                "round": r.round,
                "sites": list(r.site_ids),
                "loss": r.loss,
                "accuracy": r.accuracy,
                "num_examples": r.num_examples,
                "epsilon": r.epsilon,
                "duration_s": round(r.duration_s, 3),
                # pooled with standard errors (and AUC): orchestrator.metric_pooling
                "validation": r.metrics,
            }
            for r in rounds
        ],
        **metrics_card(spec, rounds),
        metrics_privacy=(
            "EXACT metrics from at least one site: they are OUTSIDE the DP guarantee"
            if exact
            else (
                f"validation metrics released with the Gaussian mechanism "
                f"(noise multiplier {spec.metrics.noise_multiplier:g}), included in ε"
                if spec.metrics.enabled
                else "no metrics were released"
            )
        ),
        training={
            "rounds": spec.rounds,
            "local_epochs": spec.local_epochs,
            "local_steps": spec.local_steps,
            "batch_size": spec.batch_size,
            "optimizer": spec.optimizer.model_dump(mode="json"),
            "min_sites": spec.min_sites,
        },
        **encoding_card(spec),
        rejected_updates=REJECTED_UPDATES,
    )
    if spec.site_dp is not None:
        card["site_level_dp"] = site_level_card(spec, row, len(rounds))
    return card


def site_level_card(spec: JobSpec, row: JobRow, rounds: int) -> dict[str, Any]:
    """What the card says about site-level DP (``orchestrator.training.site_dp``)."""
    sdp = spec.site_dp
    assert sdp is not None
    bound = compute_epsilon(
        site_level_events(sdp, rounds), delta=spec.dp.delta, accountant=ACCOUNTANT
    )
    return {
        "epsilon": bound.epsilon,
        "delta": spec.dp.delta,
        "accountant": bound.accountant,
        "mechanism": "DP-FedAvg (McMahan et al. 2018): server-side clipping + Gaussian noise"
        + (", adaptive clipping (Andrew et al. 2021)" if sdp.adaptive else ""),
        "noise_multiplier": sdp.noise_multiplier,
        "initial_clip_norm": sdp.clip_norm,
        "final_clip_norm": row.site_clip_norm or sdp.clip_norm,
        "protects": (
            "whether any one whole site (all of its records) took part, against anyone who "
            "sees the released model; it relies on the orchestrator adding this noise "
            "honestly. The sample-level guarantee above holds independently."
        ),
    }
