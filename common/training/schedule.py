"""How many DP-SGD steps a task runs: the one ``(q, steps)`` function, used by the
orchestrator to plan and by the sites to charge and to train.

Under Poisson sampling (Abadi et al. 2016; Opacus ``DPDataLoader``) each step includes every
example independently with probability ``q = min(1, batch_size / N)``, so an "epoch" is
``1/q`` expected batches: ``steps = local_steps``, or ``ceil(local_epochs / q)`` (rounded
down within 10⁻⁹, so that 3.0000000000000004 expected batches is 3 steps, not 4).
"""

from __future__ import annotations

import math

from common.errors import InvalidSpecError


class ScheduleError(InvalidSpecError, ValueError):
    """Sizes that no schedule exists for (a spec error, and a ``ValueError``)."""


def task_schedule(
    *, num_examples: int, batch_size: int, local_epochs: float | None, local_steps: int | None
) -> tuple[float, int]:
    """(sample rate q, number of steps) of one round of local training.

    Raises:
        ScheduleError: no example, a batch size below 1, not exactly one of
            ``local_epochs`` and ``local_steps``, or either of them not positive.
    """
    if num_examples < 1:
        raise ScheduleError(
            "A dataset with no training rows cannot be trained on: local training needs at "
            "least one example."
        )
    if batch_size < 1:
        raise ScheduleError(f"batch_size must be at least 1, got {batch_size}.")
    if (local_epochs is None) == (local_steps is None):
        raise ScheduleError("Set exactly one of local_epochs and local_steps.")
    q = min(1.0, batch_size / num_examples)
    if local_steps is not None:
        if local_steps < 1:
            raise ScheduleError(f"local_steps must be at least 1, got {local_steps}.")
        return q, int(local_steps)
    assert local_epochs is not None
    if not (local_epochs > 0.0 and math.isfinite(local_epochs)):
        raise ScheduleError(f"local_epochs must be positive, got {local_epochs}.")
    return q, max(1, math.ceil(local_epochs / q - 1e-9))
