"""What the site discloses about its datasets and policy, and the sizes its answers carry.

By default a dataset's exact row counts are disclosed (the orchestrator sets sample rates and
weights with them; the README lists this). Under ``policy.disclose_row_counts: false`` only
the catalog's DP count leaves (:mod:`site_agent.data.catalog`): the sizes registered, the
sizes a train task's sample rate comes from, and every example count in an answer are derived
from it (post-processing), and a dataset whose DP count was withheld serves no task.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.domain import DatasetInfo, PolicySummary
from common.dp import noise
from common.dp.running import running_epsilon
from common.errors import PolicyRefusal
from site_agent.boundary.budget import budget_limit
from site_agent.boundary.ledger import Ledger
from site_agent.config import DatasetConfig, SiteConfig
from site_agent.data.catalog import WITHHELD, CatalogCounts, schema_of
from site_agent.data.datasets import Shape, SiteDatasets

ACCOUNTANT = "prv"
"""The tight accountant of every ε the site reports (the budget check is RDP's)."""


@dataclass
class SiteContext:
    """What a task handler works with: the site's config, ledger, datasets and catalog."""

    config: SiteConfig
    ledger: Ledger
    datasets: SiteDatasets
    catalog: CatalogCounts

    def budget(self, dataset: str) -> float:
        return budget_limit(self.config, dataset)

    def disclosed(self, name: str) -> Shape:
        """The dataset's sizes as the site discloses them: exact by default; else derived
        from the catalog's DP count alone (:func:`public_shape`).

        Raises:
            PolicyRefusal: sizes are private and no DP count was released.
        """
        shape = self.datasets.shape(name)
        if self.config.policy.disclose_row_counts:
            return shape
        with noise.secure_noise(self.config.policy.secure_noise):  # cached after the first
            dp_rows = self.catalog.noisy_count(name, self.datasets.exact_rows(name))
        return public_shape(shape, dp_rows, self.datasets.config_of(name))


def public_shape(shape: Shape, dp_rows: float, cfg: DatasetConfig) -> Shape:
    """``shape`` with sizes from the DP count ``dp_rows`` of all rows alone (post-processing):
    ``round(dp_rows · validation_fraction)`` validation rows, the rest (at least 1) train rows.

    Raises:
        PolicyRefusal: the count was withheld (budget or σ floor), so no size is public.
    """
    if dp_rows == WITHHELD:
        raise PolicyRefusal(
            f"The site keeps the size of dataset {cfg.name!r} private "
            "(policy.disclose_row_counts: false) and its DP row count was withheld (the "
            "budget or the σ floor did not allow it), so it serves no task: a sample rate "
            "or an example count would disclose the exact size."
        )
    n_val = None if shape.num_validation is None else round(dp_rows * cfg.validation_fraction)
    n_train = max(1, round(dp_rows) - (n_val or 0))
    return dataclasses.replace(shape, num_train=n_train, num_validation=n_val)


def dataset_infos(site: SiteContext) -> list[DatasetInfo]:
    """What the site discloses about each dataset (registration and heartbeats)."""
    with noise.secure_noise(site.config.policy.secure_noise):  # the catalog's DP counts
        return [_info(site, cfg) for cfg in site.config.datasets]


def _info(site: SiteContext, cfg: DatasetConfig) -> DatasetInfo:
    policy = site.config.policy
    sp = site.datasets.shape(cfg.name)
    # Charged (once, then cached) before the spend below is computed and disclosed.
    dp_rows = site.catalog.noisy_count(cfg.name, site.datasets.exact_rows(cfg.name))
    if not policy.disclose_row_counts:
        # Only the DP count leaves: the sizes registered are derived from it; none when it
        # was withheld.
        try:
            sp = public_shape(sp, dp_rows, cfg)
        except PolicyRefusal:
            sp = dataclasses.replace(sp, num_train=0, num_validation=0)
    # The running bound (common.dp.running, ≤ ~2% above exact): the same figure as the DP
    # report's lifetime ε, recomputed only when the ledger moves.
    spent = running_epsilon(
        site.ledger.events(cfg.name), delta=policy.delta, accountant=ACCOUNTANT
    ).epsilon
    return DatasetInfo(
        name=cfg.name,
        num_rows=sp.num_train,
        columns=sp.feature_names,
        label=sp.label,
        epsilon_spent=spent,
        max_epsilon=site.budget(cfg.name),
        policy_delta=policy.delta,
        num_validation_rows=sp.num_validation or 0,
        dp_num_rows=dp_rows,
        schema=schema_of(cfg, sp.feature_names),
        label_schema=cfg.label_schema(),
        source=cfg.source_format(),
    )


def policy_summary(config: SiteConfig) -> PolicySummary:
    """The site's policy as it is disclosed."""
    p = config.policy
    return PolicySummary(
        max_epsilon=p.max_epsilon,
        delta=p.delta,
        min_noise_multiplier=p.min_noise_multiplier,
        max_rounds=p.max_rounds,
        allowed_models=tuple(p.allowed_models),
        allow_exact_metrics=p.allow_exact_metrics,
        max_steps_per_task=p.max_steps_per_task,
        max_parameters=p.max_parameters,
        secure_noise=p.secure_noise,
    )
