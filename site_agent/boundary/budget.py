"""Which budget a dataset draws on: a budget belongs to the data, not to its name.

Two dataset names on the same file, or on the same database URL and query, draw on one
budget (:func:`data_key`), limited by the smaller of their ``max_epsilon``
(:func:`budget_limit`); the ledger is told which names share a key (:func:`open_ledger`).
"""

from __future__ import annotations

import os
import re

from site_agent.boundary.ledger import Ledger
from site_agent.config import DatasetConfig, SiteConfig


def data_key(cfg: DatasetConfig) -> str:
    """What identifies a dataset's records: its file's real path (symbolic links resolved),
    or its database URL and query (whitespace runs folded, case kept)."""
    if cfg.path is not None:
        return "file:" + os.path.realpath(cfg.path)
    query = re.sub(r"\s+", " ", (cfg.query or "").strip())
    return f"sql:{cfg.url}\n{query}"


def budget_keys(config: SiteConfig) -> dict[str, str]:
    """Each dataset name's budget key (see :class:`site_agent.boundary.ledger.Ledger`)."""
    return {d.name: data_key(d) for d in config.datasets}


def open_ledger(config: SiteConfig) -> Ledger:
    """The site's ledger, told which names share a budget."""
    return Ledger(config.state_dir / "ledger.sqlite", budgets=budget_keys(config))


def budget_limit(config: SiteConfig, dataset: str) -> float:
    """The ε limit of ``dataset``'s budget: the smallest over every name on the same data."""
    cfg = config.dataset(dataset)
    if cfg is None:
        return config.max_epsilon_for(dataset)
    key = data_key(cfg)
    return min(config.max_epsilon_for(d.name) for d in config.datasets if data_key(d) == key)
