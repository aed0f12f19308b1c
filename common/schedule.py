"""How many DP-SGD steps a task runs, computed identically by the orchestrator and the sites.

Under Poisson sampling (Abadi et al. 2016; Opacus ``DPDataLoader``) each step includes every
example independently with probability q = batch_size / N, so an "epoch" is 1/q steps.
"""

from __future__ import annotations

import math


def task_schedule(
    *, num_examples: int, batch_size: int, local_epochs: float | None, local_steps: int | None
) -> tuple[float, int]:
    """(sample rate q, number of steps) of one round of local training."""
    if num_examples < 1:
        raise ValueError("a dataset with no training rows cannot be trained on")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    q = min(1.0, batch_size / num_examples)
    if local_steps is not None:
        return q, int(local_steps)
    if local_epochs is None or not local_epochs > 0:
        raise ValueError("set local_epochs (> 0) or local_steps")
    return q, max(1, math.ceil(local_epochs / q - 1e-9))
