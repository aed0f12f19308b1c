"""orchestrator.model_size: the orchestrator's cap on a job's model, from the spec alone."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from common.errors import InvalidSpecError
from common.specs import GmmJobSpec, MLPSpec, parse_job_spec
from common.training.models import build_model, count_parameters
from orchestrator.model_size import DEFAULT_MAX_PARAMETERS, check_model_size, spec_parameters


def _job(model: dict[str, object]) -> dict[str, object]:
    return {
        "dataset": "d",
        "model": model,
        "rounds": 1,
        "batch_size": 8,
        "dp": {"noise_multiplier": 1.0},
    }


def test_the_17_gib_mlp_is_refused_without_allocating() -> None:
    spec = parse_job_spec(
        _job({"kind": "mlp", "input_dim": 64, "num_classes": 2, "hidden": [65_536] * 32})
    )
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(InvalidSpecError, match=r"parameters; this orchestrator takes at most"):
        check_model_size(spec, DEFAULT_MAX_PARAMETERS)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 0.1 and peak < 1 << 20


def test_dimensions_yet_to_be_derived_are_counted_as_a_lower_bound() -> None:
    # Hidden layers alone exceed the cap: refused before the encoding is derived.
    wide = parse_job_spec(_job({"kind": "mlp", "hidden": [20_000, 20_000]}))
    assert wide.model.input_dim is None
    with pytest.raises(InvalidSpecError, match="400,100,002 parameters"):
        check_model_size(wide, DEFAULT_MAX_PARAMETERS)
    small = MLPSpec(kind="mlp", hidden=(8,))
    assert spec_parameters(small) == 1 * 8 + 8 + 8 * 2 + 2


@pytest.mark.parametrize(
    "model",
    [
        {"kind": "linear", "input_dim": 30, "num_classes": 2},
        {"kind": "mlp", "input_dim": 64, "num_classes": 10, "hidden": [128, 64]},
        {
            "kind": "cnn2d",
            "input_dim": 64,
            "num_classes": 10,
            "input_shape": [1, 8, 8],
            "conv": [{"channels": 8}],
            "hidden": [16],
        },
    ],
)
def test_the_count_is_what_build_model_creates_and_the_limit_is_inclusive(
    model: dict[str, object],
) -> None:
    spec = parse_job_spec(_job(model))
    n = count_parameters(build_model(spec.model))
    assert spec_parameters(spec.model) == n
    check_model_size(spec, n)
    with pytest.raises(InvalidSpecError, match=f"{n:,} parameters"):
        check_model_size(spec, n - 1)


def test_mixture_jobs_have_no_network_to_count() -> None:
    gmm = GmmJobSpec.model_validate(
        {"kind": "gmm", "dataset": "d", "k": 2, "dp": {"noise_multiplier": 1.0}}
    )
    check_model_size(gmm, 1)
