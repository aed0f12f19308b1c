"""A mixture job's checkpoint: where it stands after its last committed round (written with
that round, ``orchestrator.core.store.GmmStateRow``), enough to continue after a restart. What
each site was sent is in the job ledger, written before each dispatch (``JobThread._send``)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from common.clustering.bootstrap import MixtureStandardErrors
from common.clustering.federated_em import FederatedBIC, FederatedEM, machine_from_state
from common.clustering.model import GaussianMixtureParams
from common.errors import InvalidSpecError, JobFailedError

CHECKPOINT_VERSION = 1
PHASES = ("fit", "boot", "release")


@dataclass
class Progress:
    """Where a mixture job stands after its last committed round (the checkpoint)."""

    method: str
    columns: list[str]
    bounds: np.ndarray
    site_ids: list[str]
    round: int  # the last committed round (0: none yet)
    phase: str  # fit → (boot →) release
    machine: FederatedEM | FederatedBIC
    merged: GaussianMixtureParams | None = None  # one-shot's merged model
    standard_errors: MixtureStandardErrors | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": CHECKPOINT_VERSION,
                "method": self.method,
                "columns": self.columns,
                "bounds": self.bounds.tolist(),
                "site_ids": self.site_ids,
                "round": self.round,
                "phase": self.phase,
                "machine": self.machine.state_dict(),
                "merged": None if self.merged is None else self.merged.to_dict(),
                "standard_errors": (
                    None if self.standard_errors is None else self.standard_errors.to_dict()
                ),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Progress:
        try:
            d = json.loads(text)
            if d["version"] != CHECKPOINT_VERSION or d["phase"] not in PHASES:
                raise ValueError(f"version {d['version']!r}, phase {d['phase']!r}")
            return cls(
                method=str(d["method"]),
                columns=[str(c) for c in d["columns"]],
                bounds=np.asarray(d["bounds"], dtype=np.float64),
                site_ids=[str(s) for s in d["site_ids"]],
                round=int(d["round"]),
                phase=str(d["phase"]),
                machine=machine_from_state(d["machine"]),
                merged=None
                if d["merged"] is None
                else GaussianMixtureParams.from_dict(d["merged"]),
                standard_errors=(
                    None
                    if d["standard_errors"] is None
                    else MixtureStandardErrors.from_dict(d["standard_errors"])
                ),
            )
        except (KeyError, TypeError, ValueError, InvalidSpecError, RecursionError) as err:
            raise JobFailedError(
                f"the job's checkpoint is unreadable ({err}); cannot resume"
            ) from None
