"""The model card of every job kind: what a compliance officer reads about a release.

:func:`model_card` writes the fields every release states — what was released, its ε and
δ and the accountant that bounded them, the privacy unit, the guarantee and its limits
(including where each site's noise came from), each site's ε and charged events — and a
kind adds what only it has (training: the encoding, the metrics of every round, site-level
DP, the audit; mixtures: the model selection, the bootstrap's uncertainty).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from common.version import __version__

PRIVACY_UNIT = "record (sample-level DP at each site)"

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


def model_card(
    *,
    kind: str,
    job_id: str,
    name: str,
    dataset: str,
    model: Mapping[str, Any],
    epsilon: float,
    delta: float,
    accountant: str,
    guarantee: str,
    rounds: int,
    sites: Sequence[Mapping[str, Any]],
    secure_noise: Mapping[str, bool],
    **extra: Any,
) -> dict[str, Any]:
    """The card of a release: the shared fields, then the kind's ``extra`` fields.

    ``sites``: one entry per site with at least ``site_id``, ``epsilon`` and ``events``; each
    gets its ``noise_source`` from ``secure_noise`` (a site's declared ``policy.secure_noise``,
    missing means False). ``epsilon`` is the released ε (the maximum over sites, each
    composed by ``accountant``)."""
    declared = {str(s["site_id"]): bool(secure_noise.get(str(s["site_id"]), False)) for s in sites}
    return {
        "job_id": job_id,
        "kind": kind,
        "name": name,
        "dataset": dataset,
        "model": dict(model),
        "epsilon": epsilon,
        "delta": delta,
        "accountant": accountant,
        "privacy_unit": PRIVACY_UNIT,
        "guarantee": guarantee,
        "limits": LIMITS + noise_limits(declared),
        "rounds": rounds,
        "sites": [
            {**s, "noise_source": "csprng" if declared[str(s["site_id"])] else "standard"}
            for s in sites
        ],
        **extra,
        "released_at": time.time(),
        "dpfed_version": __version__,
    }
