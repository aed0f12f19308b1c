"""What data scientists may see of a site's datasets: declared schema and a DP row count.

The row count shown in ``orchestrator datasets`` is released through the Gaussian mechanism
(sensitivity 1 under add/remove of one row; Dwork & Roth 2014, Thm A.1) with the policy's
``catalog_noise_multiplier``, charged to the ledger **before** it leaves (write-ahead), and
cached in the state directory: asking again costs nothing more. A new count (the data
changed) is a new release and is charged again.

(The training protocol itself still discloses exact row counts to the orchestrator, which
uses them for sample rates and weighting; the README lists this.)
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path

from common import noise
from common.accounting import DpEvent
from common.domain import ColumnInfo
from site_agent.config import DatasetConfig, Policy
from site_agent.ledger import Ledger

CATALOG_JOB = "catalog"


class CatalogCounts:
    def __init__(self, state_dir: Path, ledger: Ledger, policy: Policy) -> None:
        self.path = state_dir / "catalog_counts.json"
        self.ledger = ledger
        self.policy = policy
        self._lock = threading.Lock()
        self._cache: dict[str, dict[str, float]] = (
            json.loads(self.path.read_text()) if self.path.exists() else {}
        )

    def noisy_count(self, dataset: str, exact: int) -> float:
        """The cached DP count of ``dataset``; a fresh, charged release when ``exact`` moved."""
        with self._lock:
            hit = self._cache.get(dataset)
            if hit is not None and int(hit["exact"]) == exact:
                return float(hit["noisy"])
            sigma = self.policy.catalog_noise_multiplier
            # Write-ahead: the charge is durable before the number exists.
            self.ledger.charge(
                dataset=dataset,
                job_id=CATALOG_JOB,
                round=0,
                task_id=f"catalog-{uuid.uuid4().hex}",
                kind="catalog",
                events=[DpEvent(noise_multiplier=sigma, sample_rate=1.0, steps=1)],
                delta=self.policy.delta,
            )
            rng = noise.private_numpy_rng()
            noisy = max(0.0, round(exact + float(noise.gaussian_np(rng, sigma))))
            self._cache[dataset] = {"exact": float(exact), "noisy": noisy, "sigma": sigma}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._cache))
            os.replace(tmp, self.path)
            return noisy


def schema_of(cfg: DatasetConfig, feature_names: tuple[str, ...]) -> tuple[ColumnInfo, ...]:
    """Declared types and bounds of the feature columns, in model order (no data read)."""
    out = []
    for name in feature_names:
        spec = cfg.columns.get(name)
        if spec is None:
            out.append(ColumnInfo(name=name))
        else:
            out.append(
                ColumnInfo(
                    name=name,
                    type=spec.type,
                    min=spec.min,
                    max=spec.max,
                    categories=tuple(spec.categories or ()),
                )
            )
    return tuple(out)
