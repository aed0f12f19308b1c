"""The closed model zoo, and the files a released model is shipped in.

A job names its model by a declarative :data:`~common.specs.ModelSpec`; a site never runs
model code it was sent. :func:`build_model` is the only place that turns a spec into a
``torch.nn.Module``, from layers DP-SGD can train with a per-example clipping bound (no
``BatchNorm``); its ``state_dict`` keys depend only on the spec. Every model maps float32 rows
``(N, input_dim)`` to logits ``(N, num_classes)``. A released model is a folder with
``model.safetensors`` (weights, with the spec in the metadata) and ``model_card.json``;
:func:`load_model` reads the module, :func:`load_pipeline` the module with its encoding
(:mod:`common.training.pipeline`). Why these layers, and the files: ``docs/training.md``,
"The model zoo" and "Released model files".
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import safetensors
import safetensors.torch
import torch
from pydantic import TypeAdapter, ValidationError
from torch import Tensor, nn

from common.errors import InvalidSpecError, NotFoundError
from common.specs import (
    Activation,
    Conv1dSpec,
    Conv2dSpec,
    LinearSpec,
    MLPSpec,
    ModelSpec,
    format_validation_error,
    model_dims,
)
from common.synthesis.autoregressive import AutoregressiveNet
from common.synthesis.autoregressive import count_parameters as count_autoregressive
from common.synthesis.autoregressive_spec import AutoregressiveSpec
from common.training.sgld import PosteriorEnsemble, unpack_samples

if TYPE_CHECKING:
    from common.training.pipeline import Pipeline

WEIGHTS_FILE = "model.safetensors"
"""Name of the weights file in a model folder."""
CARD_FILE = "model_card.json"
"""Name of the model card in a model folder."""
SPEC_METADATA_KEY = "dpfed.model_spec"
"""safetensors metadata key holding the model spec as JSON."""

_SPEC_ADAPTER: TypeAdapter[ModelSpec] = TypeAdapter(ModelSpec)
_OPACUS_PREFIX = "_module."


def parse_model_spec(data: Any, *, source: str = "model spec") -> ModelSpec:
    """Validate a model spec given as a dict (e.g. a model card's ``"model"`` entry).

    Raises :class:`~common.errors.InvalidSpecError` naming each bad field.
    """
    try:
        return _SPEC_ADAPTER.validate_python(data)
    except ValidationError as err:
        raise InvalidSpecError(format_validation_error(err, source=source)) from None


# Never in-place: Opacus' hooks keep the activations a layer saw for the backward pass.
_ACTIVATIONS: Final[dict[str, type[nn.Module]]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


def _activation(name: Activation) -> nn.Module:
    layer = _ACTIVATIONS.get(name)
    if layer is None:
        raise InvalidSpecError(f"unknown activation {name!r}")
    return layer()


def _conv_out(size: int, *, kernel: int, stride: int) -> int:
    """Output length of a conv with ``padding = kernel // 2`` (PyTorch's formula)."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def _conv_geometry(spec: Conv1dSpec | Conv2dSpec) -> list[tuple[int, ...]]:
    """Spatial size after each conv block (conv, then pool); the first entry is the input."""
    sizes: list[tuple[int, ...]] = [tuple(spec.input_shape[1:])]
    for i, layer in enumerate(spec.conv):
        after: list[int] = []
        for s in sizes[-1]:
            n = _conv_out(s, kernel=layer.kernel_size, stride=layer.stride)
            if n >= 1 and layer.pool > 1:
                n //= layer.pool
            after.append(n)
        if min(after) < 1:
            raise InvalidSpecError(
                f"model.conv[{i}] shrinks the input {spec.input_shape} to nothing "
                f"(stride {layer.stride}, pool {layer.pool}); use fewer or smaller "
                "strides and pools."
            )
        sizes.append(tuple(after))
    return sizes


def _check_groupnorm(spec: Conv1dSpec | Conv2dSpec) -> None:
    g = spec.groupnorm_groups
    if g == 0:
        return
    for i, layer in enumerate(spec.conv):
        if layer.channels % g != 0:
            raise InvalidSpecError(
                f"model.groupnorm_groups={g} does not divide model.conv[{i}].channels="
                f"{layer.channels}; GroupNorm needs the channels split into equal groups."
            )


def _dense_layers(
    layers: OrderedDict[str, nn.Module],
    *,
    in_features: int,
    hidden: tuple[int, ...],
    activation: Activation,
    dropout: float,
    num_classes: int,
) -> None:
    width = in_features
    for j, h in enumerate(hidden):
        layers[f"fc{j}"] = nn.Linear(width, h)
        layers[f"fc_act{j}"] = _activation(activation)
        if dropout > 0.0:
            layers[f"fc_drop{j}"] = nn.Dropout(dropout)
        width = h
    layers["logits"] = nn.Linear(width, num_classes)


def _build(spec: ModelSpec) -> nn.Sequential:
    assert not isinstance(spec, AutoregressiveSpec)
    input_dim, num_classes = model_dims(spec)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if isinstance(spec, LinearSpec):
        layers["logits"] = nn.Linear(input_dim, num_classes)
    elif isinstance(spec, MLPSpec):
        _dense_layers(
            layers,
            in_features=input_dim,
            hidden=spec.hidden,
            activation=spec.activation,
            dropout=spec.dropout,
            num_classes=num_classes,
        )
    else:
        _check_groupnorm(spec)
        sizes = _conv_geometry(spec)
        two_d = isinstance(spec, Conv2dSpec)
        conv_cls: type[nn.Conv1d] | type[nn.Conv2d] = nn.Conv2d if two_d else nn.Conv1d
        pool_cls: type[nn.MaxPool1d] | type[nn.MaxPool2d] = nn.MaxPool2d if two_d else nn.MaxPool1d
        layers["reshape"] = nn.Unflatten(1, tuple(spec.input_shape))
        channels = spec.input_shape[0]
        for i, layer in enumerate(spec.conv):
            layers[f"conv{i}"] = conv_cls(
                channels,
                layer.channels,
                kernel_size=layer.kernel_size,
                stride=layer.stride,
                padding=layer.kernel_size // 2,
            )
            if spec.groupnorm_groups > 0:
                layers[f"conv_norm{i}"] = nn.GroupNorm(spec.groupnorm_groups, layer.channels)
            layers[f"conv_act{i}"] = _activation(spec.activation)
            if layer.pool > 1:
                layers[f"conv_pool{i}"] = pool_cls(layer.pool)
            channels = layer.channels
        flat = channels
        for s in sizes[-1]:
            flat *= s
        layers["flatten"] = nn.Flatten(1)
        _dense_layers(
            layers,
            in_features=flat,
            hidden=spec.hidden,
            activation=spec.activation,
            dropout=0.0,
            num_classes=num_classes,
        )
    return nn.Sequential(layers)


def build_model(spec: ModelSpec, *, seed: int | None = None) -> nn.Module:
    """Build the module a spec describes, freshly initialised (PyTorch's default init).

    Args:
        spec: a validated :data:`~common.specs.ModelSpec`.
        seed: if set, the initial weights are a function of the seed alone. The seed is
            applied inside :func:`torch.random.fork_rng`, so the process-wide torch RNG is
            left exactly as it was: code that later draws from it (dropout, and anything
            that must stay unpredictable) is never made predictable by a seed the
            orchestrator chose.

    Raises:
        InvalidSpecError: the spec is well-typed but unbuildable (dimensions not derived yet,
            a conv stack that shrinks the input to nothing, GroupNorm groups that do not
            divide the channels).
    """
    if seed is None:
        return _build_any(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_any(spec)


def _build_any(spec: ModelSpec) -> nn.Module:
    if isinstance(spec, AutoregressiveSpec):  # the synthesizer (issue 20)
        return AutoregressiveNet(spec)
    return _build(spec)


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters in ``module`` (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def count_spec_parameters(spec: ModelSpec) -> int:
    """Number of parameters :func:`build_model` would create, computed without allocating.

    A site checks its ``policy.max_parameters`` with this before building anything, so an
    oversized spec cannot exhaust the site's memory.
    """

    def dense(width: int, hidden: tuple[int, ...], classes: int) -> int:
        total = 0
        for h in hidden:
            total += width * h + h
            width = h
        return total + width * classes + classes

    if isinstance(spec, AutoregressiveSpec):
        return count_autoregressive(spec)
    input_dim, num_classes = model_dims(spec)
    if isinstance(spec, LinearSpec):
        return input_dim * num_classes + num_classes
    if isinstance(spec, MLPSpec):
        return dense(input_dim, spec.hidden, num_classes)
    _check_groupnorm(spec)
    sizes = _conv_geometry(spec)
    total = 0
    channels = spec.input_shape[0]
    for layer in spec.conv:
        window = layer.kernel_size ** (len(spec.input_shape) - 1)
        total += channels * layer.channels * window + layer.channels
        if spec.groupnorm_groups > 0:
            total += 2 * layer.channels
        channels = layer.channels
    flat = channels
    for s in sizes[-1]:
        flat *= s
    return total + dense(flat, spec.hidden, num_classes)


def unwrap_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Strip the ``_module.`` prefixes an Opacus ``GradSampleModule`` adds to state keys."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        while key.startswith(_OPACUS_PREFIX):
            key = key[len(_OPACUS_PREFIX) :]
        out[key] = value
    return out


def _describe_mismatch(
    expected: Mapping[str, Tensor], got: Mapping[str, Tensor], *, what: str
) -> str | None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(
                f"unexpected tensors {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else "")
            )
        return f"{what} do not match the model spec: " + "; ".join(parts) + "."
    for key, ref in expected.items():
        if tuple(got[key].shape) != tuple(ref.shape):
            return (
                f"{what} do not match the model spec: tensor {key!r} has shape "
                f"{tuple(got[key].shape)}, the spec needs {tuple(ref.shape)}."
            )
        if not got[key].is_floating_point():
            return f"{what} do not match the model spec: tensor {key!r} is {got[key].dtype}, not floating point."
    return None


def load_weights(module: nn.Module, state: Mapping[str, Tensor], *, what: str = "weights") -> None:
    """Load ``state`` into ``module`` strictly, with an error naming the first bad tensor.

    Raises:
        InvalidSpecError: names missing or unexpected tensors, or a tensor whose shape
            differs from the module's.
    """
    state = unwrap_state(state)
    problem = _describe_mismatch(module.state_dict(), state, what=what)
    if problem is not None:
        raise InvalidSpecError(problem)
    module.load_state_dict(state, strict=True)


def _spec_json(spec: ModelSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)


def _atomic_write(path: Path, data: bytes) -> None:
    # Write-then-rename, so a crash never leaves a half-written model behind.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(
    out_dir: Path,
    *,
    module_or_state: nn.Module | Mapping[str, Tensor],
    card: Mapping[str, Any],
) -> None:
    """Write a released model: ``out_dir/model.safetensors`` and ``out_dir/model_card.json``.

    Args:
        out_dir: the model folder; created if missing. Existing files are replaced
            atomically.
        module_or_state: the trained module (an Opacus-wrapped one is fine) or its state
            dict. The weights must match ``card["model"]`` exactly: a model is never released
            with weights its own card does not describe.
        card: the model card. ``card["model"]`` is the spec as a dict
            (``spec.model_dump(mode="json")``); every value must be JSON-serialisable.

    Raises:
        InvalidSpecError: the card has no valid ``"model"`` spec, is not JSON-serialisable,
            or the weights do not match the spec.
    """
    if "model" not in card:
        raise InvalidSpecError('the model card needs a "model" entry holding the model spec.')
    spec = parse_model_spec(card["model"], source="model card")
    try:
        card_text = json.dumps(card, indent=2, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as err:
        raise InvalidSpecError(f"the model card is not JSON-serialisable: {err}") from None

    if isinstance(module_or_state, nn.Module):
        state = unwrap_state(module_or_state.state_dict())
    else:
        state = unwrap_state(module_or_state)
    if "posterior_samples" in card:  # DP-SGLD: every packed sample must fit the spec
        load_ensemble(spec, state, card["posterior_samples"], what="the weights")
    else:
        problem = _describe_mismatch(build_model(spec).state_dict(), state, what="the weights")
        if problem is not None:
            raise InvalidSpecError(problem)
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()
    }
    blob = safetensors.torch.save(tensors, metadata={SPEC_METADATA_KEY: _spec_json(spec)})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_FILE, blob)
    _atomic_write(out / CARD_FILE, card_text.encode("utf-8"))


def load_model(path: str | Path) -> nn.Module:
    """Load a released dpfed model for inference.

    ``path`` is a released model's folder, as the orchestrator writes it with
    :func:`save_model`: it holds ``model.safetensors`` and ``model_card.json``. The module is
    rebuilt from the card's ``"model"`` spec through the closed model zoo, so loading a
    model never runs code from the file (safetensors holds tensors only). The weights must
    match the spec exactly and the spec stored in the weights' metadata must equal the
    card's. The module is returned in eval mode (dropout off).

    It takes float32 rows ``(N, input_dim)``, in the column order of the training dataset's
    features, and returns logits ``(N, num_classes)``::

        import torch
        from common.training.models import load_model

        model = load_model("models/fraud-v3")
        with torch.no_grad():
            logits = model(torch.tensor(rows, dtype=torch.float32))
        predicted = logits.argmax(dim=1)

    The model's privacy guarantee (ε, δ, accountant, per-site spend) is in
    ``model_card.json``; anything computed from the model is post-processing and keeps it.

    Raises:
        NotFoundError: the folder, or one of its two files, does not exist.
        InvalidSpecError: the card is not valid JSON, has no valid ``"model"`` spec, the
            weights file is corrupt, or the weights do not match the spec.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise NotFoundError(f"model folder not found: {folder}")
    card_path = folder / CARD_FILE
    weights_path = folder / WEIGHTS_FILE
    for p in (card_path, weights_path):
        if not p.is_file():
            raise NotFoundError(f"model folder {folder} has no {p.name}")

    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidSpecError(f"model card {card_path} is not valid JSON: {err}") from None
    if not isinstance(card, dict) or "model" not in card:
        raise InvalidSpecError(f'model card {card_path} has no "model" entry with the model spec')
    spec = parse_model_spec(card["model"], source=f"model card {card_path}")

    try:
        with safetensors.safe_open(str(weights_path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise InvalidSpecError(
            f"weights file {weights_path} is not a readable safetensors file: {err}"
        ) from None
    stored = metadata.get(SPEC_METADATA_KEY)
    if stored is not None:
        try:
            stored_data = json.loads(stored)
        except ValueError:
            raise InvalidSpecError(
                f"the model spec in the metadata of {weights_path} is not valid JSON."
            ) from None
        if parse_model_spec(stored_data, source=f"metadata of {weights_path}") != spec:
            raise InvalidSpecError(
                f"{weights_path} was saved for a different model spec than {card_path} describes."
            )

    if "posterior_samples" in card:  # a DP-SGLD ensemble (common.training.sgld)
        return load_ensemble(spec, state, card["posterior_samples"], what=str(weights_path))
    module = build_model(spec)
    load_weights(module, state, what=f"the weights in {weights_path}")
    module.eval()
    return module


def load_ensemble(
    spec: ModelSpec, state: Mapping[str, Tensor], samples: Any, *, what: str
) -> nn.Module:
    """The :class:`~common.training.sgld.PosteriorEnsemble` of the posterior samples packed in
    ``state`` (``samples``: the card's list of them, one entry per sample)."""
    if not isinstance(samples, list) or not samples:
        raise InvalidSpecError(f"the posterior_samples of {what}'s card must be a non-empty list.")
    unpacked = unpack_samples(state, len(samples))
    if sum(len(m) for m in unpacked) != len(state):
        raise InvalidSpecError(
            f"{what} hold tensors outside the {len(samples)} posterior samples its card lists."
        )
    members = []
    for k, member_state in enumerate(unpacked):
        member = build_model(spec)
        load_weights(member, member_state, what=f"posterior sample {k} in {what}")
        members.append(member)
    ensemble = PosteriorEnsemble(members)
    ensemble.eval()
    return ensemble


def load_pipeline(path: str | Path) -> Pipeline:
    """A released model with its feature encoding: ``classes``, ``predict_proba(frame)`` and
    ``predict(frame)`` on a pandas DataFrame of raw rows (:mod:`common.training.pipeline`)."""
    from common.training.pipeline import load_pipeline as load

    return load(path)
