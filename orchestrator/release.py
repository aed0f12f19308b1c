"""The model card: what a compliance officer reads about a released model's guarantee."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from common.domain import SiteSpend
from common.specs import JobSpec
from orchestrator.core.store import JobRow, RoundRow
from orchestrator.metric_pooling import metrics_card
from orchestrator.planning import quantile_event
from orchestrator.views import charged_event_dict

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

LIMITS = (
    "The guarantee is per record, not per person: a person with several records at one site, "
    "or records at several sites, is protected with a correspondingly larger ε (group "
    "privacy). It assumes the sites ran the dpfed agent unmodified."
)


def noise_limits(secure_noise: Mapping[str, bool]) -> str:
    """What the card says about where the sites' noise came from (as their policies declare)."""
    standard = sorted(site for site, secure in secure_noise.items() if not secure)
    if not standard:
        return (
            " Every site drew its noise from a ChaCha20 CSPRNG with Opacus' secure-mode "
            "countermeasure to floating-point attacks (policy.secure_noise)."
        )
    return (
        f" Noise at {', '.join(standard)} came from the standard (non-cryptographic) "
        "generators seeded from OS entropy, without a countermeasure to floating-point attacks "
        "on the Gaussian sampler; a site sets policy.secure_noise to change that."
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


def build_model_card(
    *,
    row: JobRow,
    spec: JobSpec,
    rounds: list[RoundRow],
    sites: list[SiteSpend],
    epsilon: float,
    version: str,
    secure_noise: Mapping[str, bool],
) -> dict[str, Any]:
    """``sites``: each site's spend with its exact ε (``JobAccount.spends``);
    ``secure_noise``: each site's declared ``policy.secure_noise`` (missing means False)."""
    declared = {s.site_id: bool(secure_noise.get(s.site_id, False)) for s in sites}
    exact = any(r.metrics_exact for r in rounds)
    return {
        "job_id": row.job_id,
        "name": row.name,
        "dataset": spec.dataset,
        "model": spec.model.model_dump(mode="json"),
        "epsilon": epsilon,
        "delta": spec.dp.delta,
        "accountant": "prv",
        "privacy_unit": "record (sample-level DP at each site)",
        "guarantee": GUARANTEE,
        "limits": LIMITS + noise_limits(declared),
        "rounds": len(rounds),
        "dp": spec.dp.model_dump(mode="json"),
        "sites": [
            {
                "site_id": s.site_id,
                "num_examples": s.num_examples,
                "noise_multiplier": s.noise_multiplier,
                "sample_rate": s.sample_rate,
                "steps": s.steps,
                "max_grad_norm": s.max_grad_norm,
                "epsilon": s.epsilon,
                "dataset_epsilon_lifetime": s.dataset_epsilon,
                "noise_source": "csprng" if declared[s.site_id] else "standard",
                "events": [charged_event_dict(e) for e in s.events],
            }
            for s in sites
        ],
        "metrics": [
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
        "metrics_privacy": (
            "EXACT metrics from at least one site: they are OUTSIDE the DP guarantee"
            if exact
            else (
                f"validation metrics released with the Gaussian mechanism "
                f"(noise multiplier {spec.metrics.noise_multiplier:g}), included in ε"
                if spec.metrics.enabled
                else "no metrics were released"
            )
        ),
        "training": {
            "rounds": spec.rounds,
            "local_epochs": spec.local_epochs,
            "local_steps": spec.local_steps,
            "batch_size": spec.batch_size,
            "optimizer": spec.optimizer.model_dump(mode="json"),
            "min_sites": spec.min_sites,
        },
        **encoding_card(spec),
        "released_at": time.time(),
        "dpfed_version": version,
    }
