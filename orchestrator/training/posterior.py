"""DP-SGLD at the orchestrator: the posterior samples a job releases (``common.training.sgld``).

The global model of every round is already checkpointed (``orchestrator.training.rounds``); for an
``optimizer: {name: sgld}`` job the release packs the checkpoints of the sample rounds
(:func:`common.training.sgld.sample_rounds`: ``samples`` rounds evenly spaced after ``burn_in``, the
last among them) into one weights file and lists them on the card. Sampling reads only
released global models, so it is post-processing: the job's ε is DP-SGD's for its steps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from common.errors import JobFailedError
from common.specs import JobSpec
from common.training.sgld import pack_samples, sample_rounds
from common.training.tensors import state_from_bytes


def released_state(
    spec: JobSpec,
    final: dict[str, Tensor],
    checkpoint: Callable[[int], Path],
    card: dict[str, Any],
) -> dict[str, Tensor]:
    """The weights to release: ``final`` for an ordinary job; for DP-SGLD the packed samples
    (``sample{k}.<key>``), with ``card["posterior_samples"]`` and ``card["posterior"]`` set.

    Raises:
        JobFailedError: a sample round's checkpoint is missing.
    """
    opt = spec.optimizer
    if opt.name != "sgld":
        return final
    rounds = sample_rounds(rounds=spec.rounds, burn_in=opt.burn_in, samples=opt.samples)
    states = []
    for r in rounds:
        path = checkpoint(r)
        if r == spec.rounds:
            states.append(final)
            continue
        if not path.is_file():
            raise JobFailedError(
                f"the global model of round {r}, a posterior sample, has no checkpoint."
            )
        states.append(state_from_bytes(path.read_bytes()))
    card["posterior"] = {
        "method": "DP-SGLD (Wang, Fienberg & Smola 2015; Li et al. 2019): the DP-SGD noise is "
        "the Langevin noise; the released model averages the samples' predicted probabilities",
        "burn_in_rounds": opt.burn_in,
        "temperature": opt.temperature,
        "accounting": "DP-SGD's for the same steps (sampling the global models is post-processing)",
    }
    card["posterior_samples"] = [{"index": k, "round": r} for k, r in enumerate(rounds)]
    return pack_samples(states)
