"""The orchestrator's own cap on a job's model size, checked from the spec before anything is
built (issue 17.3): building an oversized model to count it would allocate it (17 GiB for a
32 × 65,536 MLP), even when every site is going to refuse it.

The count comes from :func:`common.training.models.count_spec_parameters`, which allocates nothing. A
spec whose input width or class count the orchestrator has yet to derive (from the sites'
declared schemas) is counted with the smallest possible ones (1 and 2), a lower bound: its
hidden layers alone can already be too many, and the exact count is checked again once the
dimensions are filled in.
"""

from __future__ import annotations

from common.errors import InvalidSpecError
from common.specs import AnyJobSpec, JobSpec, ModelSpec
from common.training.models import count_spec_parameters

DEFAULT_MAX_PARAMETERS = 50_000_000
"""``orchestrator serve --max-parameters``'s default: 200 MB of float32 weights, well beyond
the tabular models DP-SGD trains well, and a few such copies fit a small server's memory."""


def spec_parameters(model: ModelSpec) -> int:
    """The parameters ``model`` has (a lower bound while its dimensions are unset)."""
    if model.input_dim is None or model.num_classes is None:
        model = model.model_copy(
            update={"input_dim": model.input_dim or 1, "num_classes": model.num_classes or 2}
        )
    return count_spec_parameters(model)


def check_model_size(spec: AnyJobSpec, max_parameters: int) -> None:
    """Refuse a training job whose model has more than ``max_parameters`` parameters.

    Raises:
        InvalidSpecError: naming the count and the limit.
    """
    if not isinstance(spec, JobSpec):
        return  # mixture jobs have no network; their size is bounded by their spec's fields
    n = spec_parameters(spec.model)
    if n > max_parameters:
        raise InvalidSpecError(
            f"the model has {n:,} parameters; this orchestrator takes at most "
            f"{max_parameters:,} (orchestrator serve --max-parameters)"
        )
