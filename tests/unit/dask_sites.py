"""The loans table the ``engine: dask`` tests share: its declared columns and a Parquet file
of it whose rows exercise the declared schema (amounts out of range or missing, ages out of
range, undeclared categories, labels undeclared or missing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

COLUMNS: dict[str, Any] = {
    "amount": {"type": "numeric", "min": 0, "max": 1000},
    "age": {"type": "numeric", "min": 18, "max": 100, "nullable": False},
    "home": {"type": "categorical", "categories": ["owner", "rent"]},
    "status": {"type": "categorical", "categories": ["good", "bad"]},
}
"""The columns as ``site.yaml`` declares them (``status`` is the label)."""


def write_loans(path: Path, *, rows: int, seed: int, row_group: int) -> None:
    """``rows`` loans drawn from ``seed``, written to ``path`` in row groups of ``row_group``
    rows (the parent folder is created)."""
    rng = np.random.default_rng(seed)
    amount = rng.uniform(-50, 1200, rows)
    amount[rng.random(rows) < 0.1] = np.nan
    frame = pd.DataFrame(
        {
            "amount": amount,
            "age": rng.integers(10, 110, rows).astype(float),
            "home": rng.choice(np.array(["owner", "rent", "castle", None], dtype=object), rows),
            "status": rng.choice(np.array(["good", "bad", "maybe", None], dtype=object), rows),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, row_group_size=row_group)
