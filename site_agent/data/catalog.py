"""What data scientists may see of a site's datasets: declared schema and a DP row count.

The row count shown in ``orchestrator sites`` is released through the Gaussian mechanism
(sensitivity 1 under add/remove of one row; Dwork & Roth 2014, Thm A.1) with the policy's
``catalog_noise_multiplier``, admitted like any release (the policy's σ floor; the budget,
with every charge and every admitted job's reservation, checked in the charge's transaction),
charged to the ledger **before** it leaves (write-ahead), and cached in the state directory
per budget (names on the same data share it). It is released once: a change of the data keeps
the first count rather than charging again. When the σ floor or the budget does not allow
it, the count is withheld (:data:`WITHHELD`, shown as such by ``orchestrator sites``).

By default the training protocol also discloses exact row counts to the orchestrator, which
uses them for sample rates and weighting (the README lists this); with the policy's
``disclose_row_counts: false`` the site registers sizes derived from this count instead
(``site_agent.boundary.disclosure``), so no exact count leaves.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Final

from common.domain import ColumnInfo
from common.dp import noise
from common.dp.events import DpEvent
from common.errors import PolicyRefusal
from site_agent.boundary.admission import Release, admit_and_charge
from site_agent.boundary.ledger import Ledger
from site_agent.config import DatasetConfig, Policy

CATALOG_JOB = "catalog"
WITHHELD: Final = -1.0
"""The count a site shows when it did not release one (a DP count is never negative)."""
log = logging.getLogger("dpfed.site_agent")


class CatalogCounts:
    """The catalog's DP row counts, one release per budget (see the module docstring)."""

    def __init__(
        self,
        state_dir: Path,
        ledger: Ledger,
        policy: Policy,
        *,
        budget_limit: Callable[[str], float] | None = None,
    ) -> None:
        self.path = state_dir / "catalog_counts.json"
        self.ledger = ledger
        self.policy = policy
        self._limit = budget_limit or (lambda _name: policy.max_epsilon)
        self._lock = threading.Lock()
        self._cache: dict[str, dict[str, float]] = (
            json.loads(self.path.read_text()) if self.path.exists() else {}
        )

    def noisy_count(self, dataset: str, exact: int | Callable[[], int]) -> float:
        """The DP count of ``dataset``: released (and charged) once per budget, then cached;
        :data:`WITHHELD` when the site's σ floor or the budget does not allow it. ``exact``
        may be a function (``engine: dask``: the count on the site's cluster), called only
        after the charge is written."""
        with self._lock:
            key = self.ledger.budget_of(dataset)
            # Released once: a later change of the data does not buy a new release (each
            # would be charged again, without end); the count stays the first one.
            hit = self._cache.get(key) or self._cache.get(dataset)
            if hit is not None:
                return float(hit["noisy"])
            sigma = self.policy.catalog_noise_multiplier
            release = Release(
                what="the catalog's row count",
                events=(DpEvent(noise_multiplier=sigma, sample_rate=1.0, steps=1),),
                delta=self.policy.delta,
                kinds=("catalog",),
                scope="the count",
            )
            try:
                # Write-ahead, checked in the charge's transaction like any other release.
                admit_and_charge(
                    ledger=self.ledger,
                    policy=self.policy,
                    max_epsilon=self._limit(dataset),
                    dataset=dataset,
                    job_id=CATALOG_JOB,
                    task_id=f"catalog-{uuid.uuid4().hex}",
                    release=release,
                )
            except PolicyRefusal as err:
                log.info("catalog count of %s withheld: %s", dataset, err)
                return WITHHELD
            rows = exact() if callable(exact) else exact
            rng = noise.private_numpy_rng()
            noisy = max(0.0, round(rows + float(noise.gaussian_np(rng, sigma))))
            self._cache[key] = {"noisy": noisy, "sigma": sigma}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._cache))
            os.replace(tmp, self.path)
            return noisy


def schema_of(cfg: DatasetConfig, feature_names: tuple[str, ...]) -> tuple[ColumnInfo, ...]:
    """Declared types, bounds and nullability of the feature columns, in model order (from
    ``columns`` or ``feature_bounds``; no data read). The label's classes are
    ``cfg.label_schema()``."""
    return cfg.feature_schema(feature_names)
