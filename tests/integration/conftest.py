"""Shared fixtures for the in-process gRPC tests."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits


@pytest.fixture
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, features scaled to [0, 1], labels int64."""
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)
