"""The model zoo builds DP-trainable modules, and released models round-trip exactly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from common.errors import InvalidSpecError, NotFoundError
from common.specs import Conv1dSpec, Conv2dSpec, ConvLayerSpec, LinearSpec, MLPSpec, ModelSpec
from common.training.models import (
    CARD_FILE,
    SPEC_METADATA_KEY,
    WEIGHTS_FILE,
    build_model,
    count_parameters,
    count_spec_parameters,
    load_model,
    load_weights,
    save_model,
)

SPECS: dict[str, ModelSpec] = {
    "linear": LinearSpec(kind="linear", input_dim=12, num_classes=3),
    "mlp": MLPSpec(kind="mlp", input_dim=12, num_classes=3, hidden=(16, 8), dropout=0.25),
    "mlp-gelu": MLPSpec(kind="mlp", input_dim=5, num_classes=2, hidden=(), activation="gelu"),
    "cnn1d": Conv1dSpec(
        kind="cnn1d",
        input_dim=24,
        num_classes=4,
        input_shape=(2, 12),
        conv=(ConvLayerSpec(channels=6, kernel_size=5, pool=2), ConvLayerSpec(channels=4)),
        hidden=(10,),
        groupnorm_groups=2,
        activation="elu",
    ),
    "cnn2d": Conv2dSpec(
        kind="cnn2d",
        input_dim=64,
        num_classes=10,
        input_shape=(1, 8, 8),
        conv=(
            ConvLayerSpec(channels=8, kernel_size=3, pool=2),
            ConvLayerSpec(channels=8, kernel_size=4, stride=2),
        ),
        hidden=(16,),
        groupnorm_groups=4,
        activation="leaky_relu",
    ),
    "cnn2d-plain": Conv2dSpec(
        kind="cnn2d",
        input_dim=3 * 7 * 5,
        num_classes=2,
        input_shape=(3, 7, 5),
        conv=(ConvLayerSpec(channels=2, kernel_size=1),),
        activation="sigmoid",
    ),
}


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # These models are tiny: a second intra-op thread only adds synchronisation, which on a
    # loaded CI machine can stall every small op. Restored afterwards for other tests.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_kind_builds_validates_and_has_the_right_output_shape(name: str) -> None:
    spec = SPECS[name]
    model = build_model(spec, seed=0)
    ModuleValidator.validate(model, strict=True)  # raises if Opacus cannot train it
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for n in (0, 1, 5):
        out = model(torch.randn(n, spec.input_dim))
        assert out.shape == (n, spec.num_classes)
        assert out.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(SPECS))
def test_count_spec_parameters_matches_the_built_module(name: str) -> None:
    spec = SPECS[name]
    assert count_spec_parameters(spec) == count_parameters(build_model(spec))


def test_state_dict_keys_are_named_after_the_layers() -> None:
    mlp = build_model(SPECS["mlp"])
    assert list(mlp.state_dict()) == [
        "fc0.weight",
        "fc0.bias",
        "fc1.weight",
        "fc1.bias",
        "logits.weight",
        "logits.bias",
    ]
    assert list(build_model(SPECS["linear"]).state_dict()) == ["logits.weight", "logits.bias"]
    cnn_keys = list(build_model(SPECS["cnn2d"]).state_dict())
    assert cnn_keys[:4] == ["conv0.weight", "conv0.bias", "conv_norm0.weight", "conv_norm0.bias"]
    assert cnn_keys[-2:] == ["logits.weight", "logits.bias"]


def test_seed_fixes_the_initial_weights_without_touching_the_global_rng() -> None:
    spec = SPECS["cnn2d"]
    a, b, c = (build_model(spec, seed=s).state_dict() for s in (7, 7, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(spec, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_unbuildable_specs_are_refused_with_a_clear_message() -> None:
    bad_groups = Conv1dSpec(
        kind="cnn1d",
        input_dim=8,
        num_classes=2,
        input_shape=(1, 8),
        conv=(ConvLayerSpec(channels=6),),
        groupnorm_groups=4,
    )
    with pytest.raises(InvalidSpecError, match="groupnorm_groups=4 does not divide"):
        build_model(bad_groups)
    shrinks = Conv2dSpec(
        kind="cnn2d",
        input_dim=16,
        num_classes=2,
        input_shape=(1, 4, 4),
        conv=(ConvLayerSpec(channels=2, pool=4), ConvLayerSpec(channels=2, pool=2)),
    )
    with pytest.raises(InvalidSpecError, match=r"model\.conv\[1\] shrinks the input"):
        build_model(shrinks)
    with pytest.raises(InvalidSpecError):
        count_spec_parameters(shrinks)


def _card(spec: ModelSpec) -> dict[str, object]:
    return {"model": spec.model_dump(mode="json"), "epsilon": 3.2, "delta": 1e-5}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_save_load_round_trip_gives_identical_outputs(name: str, tmp_path: Path) -> None:
    spec = SPECS[name]
    model = build_model(spec, seed=1).eval()
    save_model(tmp_path / "m", module_or_state=model, card=_card(spec))
    loaded = load_model(tmp_path / "m")
    assert not loaded.training
    x = torch.randn(9, spec.input_dim)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_files_hold_the_card_and_the_spec_metadata(tmp_path: Path) -> None:
    spec = SPECS["mlp"]
    card = _card(spec)
    save_model(tmp_path, module_or_state=build_model(spec).state_dict(), card=card)
    assert json.loads((tmp_path / CARD_FILE).read_text()) == card
    with safetensors.safe_open(str(tmp_path / WEIGHTS_FILE), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta[SPEC_METADATA_KEY]) == spec.model_dump(mode="json")
    assert load_model(str(tmp_path)) is not None  # str paths work too


def test_save_accepts_an_opacus_wrapped_module(tmp_path: Path) -> None:
    spec = SPECS["mlp"]
    model = build_model(spec, seed=3)
    wrapped = GradSampleModule(model)
    assert any(k.startswith("_module.") for k in wrapped.state_dict())
    save_model(tmp_path, module_or_state=wrapped, card=_card(spec))
    loaded = load_model(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_save_refuses_weights_that_do_not_match_the_card(tmp_path: Path) -> None:
    other = build_model(SPECS["linear"]).state_dict()
    with pytest.raises(InvalidSpecError, match="missing tensors"):
        save_model(tmp_path, module_or_state=other, card=_card(SPECS["mlp"]))
    with pytest.raises(InvalidSpecError, match='"model" entry'):
        save_model(tmp_path, module_or_state=other, card={"epsilon": 1.0})
    with pytest.raises(InvalidSpecError, match="not JSON-serialisable"):
        save_model(
            tmp_path,
            module_or_state=other,
            card={**_card(SPECS["linear"]), "when": object()},
        )
    assert not (tmp_path / WEIGHTS_FILE).exists()


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="model folder not found"):
        load_model(tmp_path / "nope")

    spec = SPECS["mlp"]
    good = tmp_path / "good"
    save_model(good, module_or_state=build_model(spec), card=_card(spec))

    (tmp_path / "no_card").mkdir()
    (tmp_path / "no_card" / WEIGHTS_FILE).write_bytes((good / WEIGHTS_FILE).read_bytes())
    with pytest.raises(NotFoundError, match=f"has no {CARD_FILE}"):
        load_model(tmp_path / "no_card")

    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / CARD_FILE).write_text((good / CARD_FILE).read_text())
    with pytest.raises(NotFoundError, match=f"has no {WEIGHTS_FILE}"):
        load_model(tmp_path / "no_weights")

    (good / WEIGHTS_FILE).write_bytes(b"definitely not safetensors")
    with pytest.raises(InvalidSpecError, match="not a readable safetensors file"):
        load_model(good)

    (good / CARD_FILE).write_text("{not json")
    with pytest.raises(InvalidSpecError, match="not valid JSON"):
        load_model(good)

    (good / CARD_FILE).write_text(json.dumps({"model": {"kind": "transformer"}}))
    with pytest.raises(InvalidSpecError, match="invalid model card"):
        load_model(good)


def test_load_refuses_weights_of_another_shape(tmp_path: Path) -> None:
    spec = SPECS["mlp"]
    wider = spec.model_copy(update={"hidden": (17, 8)})
    # Weights for a wider net, under a card (and metadata) claiming the original spec.
    blob = safetensors.torch.save(
        dict(build_model(wider).state_dict()),
        metadata={SPEC_METADATA_KEY: json.dumps(spec.model_dump(mode="json"))},
    )
    (tmp_path / WEIGHTS_FILE).write_bytes(blob)
    (tmp_path / CARD_FILE).write_text(json.dumps(_card(spec)))
    with pytest.raises(InvalidSpecError, match=r"tensor 'fc0.weight' has shape \(17, 12\)"):
        load_model(tmp_path)


def test_load_refuses_a_card_that_disagrees_with_the_weights_metadata(tmp_path: Path) -> None:
    spec = SPECS["mlp"]
    save_model(tmp_path, module_or_state=build_model(spec), card=_card(spec))
    # Same tensor shapes, different spec: only the metadata can tell.
    tanh = spec.model_copy(update={"activation": "tanh"})
    (tmp_path / CARD_FILE).write_text(json.dumps(_card(tanh)))
    with pytest.raises(InvalidSpecError, match="different model spec"):
        load_model(tmp_path)


def test_load_weights_names_the_missing_tensor() -> None:
    model = build_model(SPECS["linear"])
    state = dict(model.state_dict())
    del state["logits.bias"]
    with pytest.raises(InvalidSpecError, match=r"missing tensors \['logits.bias'\]"):
        load_weights(model, state)


def test_docstring_example_runs(tmp_path: Path) -> None:
    spec = SPECS["cnn2d"]
    save_model(tmp_path / "fraud-v3", module_or_state=build_model(spec), card=_card(spec))
    rows = [[0.5] * spec.input_dim, [0.1] * spec.input_dim]

    model = load_model(tmp_path / "fraud-v3")
    with torch.no_grad():
        logits = model(torch.tensor(rows, dtype=torch.float32))
    predicted = logits.argmax(dim=1)
    assert predicted.shape == (2,)
