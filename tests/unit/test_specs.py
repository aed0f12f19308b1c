"""Job specs (``common.specs``) and site configs (``site_agent.config``) at the edge.

Both are closed vocabularies: the README examples parse, anything unknown or out of range is
refused with an :class:`InvalidSpecError` whose message names the field by its dotted path,
and no input, however odd, escapes as another exception type.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import InvalidSpecError
from common.specs import (
    Conv1dSpec,
    Conv2dSpec,
    JobSpec,
    MLPSpec,
    job_spec_from_json,
    load_job_spec,
    parse_job_spec,
)
from site_agent.config import SiteConfig, load_site_config

SITE_YAML = """\
site_id: bank-a
orchestrator: 127.0.0.1:50051
state_dir: ./state/bank-a
datasets:
  - name: credit
    path: data/credit.csv
    label: default
policy:
  max_epsilon: 10.0
  delta: 1.0e-5
  min_noise_multiplier: 0.5
"""

JOB_YAML = """\
dataset: credit
model: {kind: mlp, input_dim: 30, num_classes: 2, hidden: [64, 64], activation: relu}
rounds: 5
local_epochs: 1
batch_size: 64
optimizer: {name: sgd, lr: 0.1}
dp: {noise_multiplier: 1.0, max_grad_norm: 1.0, delta: 1.0e-5}
min_sites: 3
"""


def job_dict(**overrides: Any) -> dict[str, Any]:
    """The example job as a fresh dict, with top-level keys replaced (None deletes)."""
    data: dict[str, Any] = yaml.safe_load(JOB_YAML)
    for key, value in overrides.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def site_dict() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(SITE_YAML)
    return data


def write_yaml(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def spec_error(data: Any) -> str:
    with pytest.raises(InvalidSpecError) as info:
        parse_job_spec(data)
    return str(info.value)


CNN1D = {
    "kind": "cnn1d",
    "input_dim": 30,
    "num_classes": 2,
    "input_shape": [3, 10],
    "conv": [{"channels": 4}],
}
CNN2D = {
    "kind": "cnn2d",
    "input_dim": 64,
    "num_classes": 10,
    "input_shape": [1, 8, 8],
    "conv": [{"channels": 8, "kernel_size": 3, "pool": 2}],
}


# ------------------------------------------------------------------ job spec: valid


def test_example_job_yaml_parses(tmp_path: Path) -> None:
    spec = load_job_spec(write_yaml(tmp_path / "job.yaml", JOB_YAML))

    assert spec.dataset == "credit"
    assert isinstance(spec.model, MLPSpec)
    assert spec.model.input_dim == 30
    assert spec.model.num_classes == 2
    assert spec.model.hidden == (64, 64)
    assert spec.model.activation == "relu"
    assert spec.rounds == 5
    assert spec.local_epochs == 1.0
    assert spec.local_steps is None
    assert spec.batch_size == 64
    assert spec.optimizer.name == "sgd"
    assert spec.optimizer.lr == 0.1
    assert spec.dp.noise_multiplier == 1.0
    assert spec.dp.target_epsilon is None
    assert spec.dp.max_grad_norm == 1.0
    assert spec.dp.delta == 1e-5
    assert spec.min_sites == 3
    # Defaults that the example leaves out.
    assert spec.kind == "train"
    assert spec.metrics.enabled is True
    assert spec.metrics.exact is False


def test_load_and_parse_agree(tmp_path: Path) -> None:
    assert load_job_spec(write_yaml(tmp_path / "job.yaml", JOB_YAML)) == parse_job_spec(job_dict())


def test_json_round_trip_is_identity() -> None:
    spec = parse_job_spec(job_dict())
    assert job_spec_from_json(spec.model_dump_json()) == spec


def test_spec_is_frozen() -> None:
    spec = parse_job_spec(job_dict())
    with pytest.raises(Exception, match="frozen"):
        spec.rounds = 7  # type: ignore[misc]


def test_local_steps_alone_clears_the_default_epochs() -> None:
    spec = parse_job_spec(job_dict(local_epochs=None, local_steps=20))
    assert spec.local_steps == 20
    assert spec.local_epochs is None


def test_target_epsilon_instead_of_noise_multiplier() -> None:
    spec = parse_job_spec(job_dict(dp={"target_epsilon": 3.0, "delta": 1e-6}))
    assert spec.dp.target_epsilon == 3.0
    assert spec.dp.noise_multiplier is None


@pytest.mark.parametrize(
    ("model", "cls"), [(CNN1D, Conv1dSpec), (CNN2D, Conv2dSpec)], ids=["cnn1d", "cnn2d"]
)
def test_conv_models_with_matching_shape_parse(model: dict[str, Any], cls: type) -> None:
    spec = parse_job_spec(job_dict(model=model))
    assert isinstance(spec.model, cls)
    assert spec.model.input_dim == model["input_dim"]


# ------------------------------------------------------------------ job spec: refused


@pytest.mark.parametrize(
    ("path", "mutate"),
    [
        ("dp.foo", lambda d: d["dp"].update(foo=1)),
        ("model.mlp.bar", lambda d: d["model"].update(bar=2)),
        ("optimizer.nesterov", lambda d: d["optimizer"].update(nesterov=True)),
        ("metrics.period", lambda d: d.update(metrics={"period": 3})),
        ("learning_rate", lambda d: d.update(learning_rate=0.1)),
        (
            "model.cnn1d.conv.0.padding",
            lambda d: d.update(model={**CNN1D, "conv": [{"channels": 4, "padding": 1}]}),
        ),
    ],
)
def test_unknown_keys_are_refused_by_dotted_path(path: str, mutate: Any) -> None:
    data = job_dict()
    mutate(data)
    msg = spec_error(data)
    assert f"{path}:" in msg
    assert "Extra inputs are not permitted" in msg


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("dp.delta", {"dp": {"noise_multiplier": 1.0, "delta": 1.0}}),
        ("dp.delta", {"dp": {"noise_multiplier": 1.0, "delta": 2.5}}),
        ("dp.delta", {"dp": {"noise_multiplier": 1.0, "delta": 0.0}}),
        ("batch_size", {"batch_size": 0}),
        ("rounds", {"rounds": -1}),
        ("rounds", {"rounds": 0}),
        ("local_epochs", {"local_epochs": 0}),
        ("min_sites", {"min_sites": 0}),
        ("dataset", {"dataset": "../etc/passwd"}),
        ("model.mlp.input_dim", {"model": {"kind": "mlp", "input_dim": 0, "num_classes": 2}}),
        (
            "model.mlp.dropout",
            {"model": {"kind": "mlp", "input_dim": 3, "num_classes": 2, "dropout": 1.0}},
        ),
        ("optimizer.name", {"optimizer": {"name": "lbfgs"}}),
        ("optimizer.lr", {"optimizer": {"lr": -0.1}}),
        ("dp.max_grad_norm", {"dp": {"noise_multiplier": 1.0, "max_grad_norm": 0}}),
        ("dp.noise_multiplier", {"dp": {"noise_multiplier": 0.0}}),
        ("model", {"model": {"kind": "transformer", "input_dim": 3, "num_classes": 2}}),
        ("dp", {"dp": None}),
    ],
)
def test_out_of_range_values_name_the_field(field: str, overrides: dict[str, Any]) -> None:
    msg = spec_error(job_dict(**overrides))
    assert f"  {field}:" in msg, msg


def test_required_dp_missing_names_dp() -> None:
    msg = spec_error(job_dict(dp=None))
    assert "  dp:" in msg
    assert "required" in msg.lower()


def test_delta_above_a_percent_is_not_a_guarantee() -> None:
    msg = spec_error(job_dict(dp={"noise_multiplier": 1.0, "delta": 0.05}))
    assert "dp" in msg
    assert "delta" in msg


@pytest.mark.parametrize(
    "dp",
    [
        {"noise_multiplier": 1.0, "target_epsilon": 3.0},
        {"max_grad_norm": 1.0},
    ],
    ids=["both", "neither"],
)
def test_exactly_one_of_noise_multiplier_and_target_epsilon(dp: dict[str, Any]) -> None:
    msg = spec_error(job_dict(dp=dp))
    assert "  dp:" in msg
    assert "dp.noise_multiplier" in msg
    assert "dp.target_epsilon" in msg


def test_local_steps_with_local_epochs_is_refused() -> None:
    msg = spec_error(job_dict(local_epochs=2, local_steps=10))
    assert "local_steps" in msg
    assert "local_epochs" in msg


@pytest.mark.parametrize(
    "model",
    [
        {**CNN1D, "input_shape": [3, 11]},
        {**CNN1D, "input_shape": [0, 30]},
        {**CNN2D, "input_shape": [1, 8, 7]},
        {**CNN2D, "input_shape": [2, 8, 8]},
    ],
)
def test_conv_input_shape_must_multiply_to_input_dim(model: dict[str, Any]) -> None:
    msg = spec_error(job_dict(model=model))
    assert f"  model.{model['kind']}" in msg
    assert "input_shape" in msg
    assert "input_dim" in msg


def test_every_bad_field_is_reported_at_once() -> None:
    msg = spec_error(job_dict(batch_size=0, rounds=-3))
    assert "  batch_size:" in msg
    assert "  rounds:" in msg


@pytest.mark.parametrize("data", [[1, 2], "credit", 3, None])
def test_parse_refuses_a_non_mapping(data: Any) -> None:
    spec_error(data)


def test_job_spec_from_bad_json_is_invalid_spec() -> None:
    with pytest.raises(InvalidSpecError):
        job_spec_from_json("{not json")
    with pytest.raises(InvalidSpecError, match="batch_size"):
        job_spec_from_json(json.dumps(job_dict(batch_size=0)))


# ------------------------------------------------------------------ job spec: files


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", ""])
def test_load_job_spec_refuses_yaml_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = write_yaml(tmp_path / "job.yaml", text)
    with pytest.raises(InvalidSpecError, match="must be a YAML mapping") as info:
        load_job_spec(path)
    assert str(path) in str(info.value)


def test_load_job_spec_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(InvalidSpecError, match="not found") as info:
        load_job_spec(path)
    assert str(path) in str(info.value)


def test_load_job_spec_invalid_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "job.yaml", "dataset: [unclosed\n")
    with pytest.raises(InvalidSpecError, match="not valid YAML"):
        load_job_spec(path)


def test_load_job_spec_names_the_file_and_field(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "job.yaml", job_dict(batch_size=0))
    with pytest.raises(InvalidSpecError) as info:
        load_job_spec(path)
    assert str(path) in str(info.value)
    assert "  batch_size:" in str(info.value)


# ------------------------------------------------------------------ site config


def test_example_site_yaml_parses_and_resolves_paths_against_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_yaml(tmp_path / "conf" / "site.yaml", SITE_YAML)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must not depend on the working directory

    cfg = load_site_config(path)

    base = (tmp_path / "conf").resolve()
    assert cfg.site_id == "bank-a"
    assert cfg.orchestrator == "127.0.0.1:50051"
    assert cfg.state_dir == base / "state" / "bank-a"
    assert cfg.state_dir.is_absolute()
    (ds,) = cfg.datasets
    assert ds.name == "credit"
    assert ds.label == "default"
    assert ds.path == base / "data" / "credit.csv"
    assert cfg.policy.max_epsilon == 10.0
    assert cfg.policy.delta == 1e-5
    assert cfg.policy.min_noise_multiplier == 0.5
    assert cfg.dataset("credit") == ds
    assert cfg.dataset("other") is None
    assert cfg.max_epsilon_for("credit") == 10.0


def test_site_config_keeps_absolute_paths(tmp_path: Path) -> None:
    data = site_dict()
    data["state_dir"] = str(tmp_path / "abs-state")
    data["datasets"][0]["path"] = str(tmp_path / "abs" / "credit.csv")
    cfg = load_site_config(write_yaml(tmp_path / "conf" / "site.yaml", data))
    assert cfg.state_dir == (tmp_path / "abs-state").resolve()
    assert cfg.datasets[0].path == (tmp_path / "abs" / "credit.csv").resolve()


def test_dataset_budget_override_never_exceeds_the_policy(tmp_path: Path) -> None:
    data = site_dict()
    data["datasets"][0]["max_epsilon"] = 50.0
    data["datasets"].append({"name": "loans", "path": "l.csv", "label": "y", "max_epsilon": 2.0})
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", data))
    assert cfg.max_epsilon_for("credit") == 10.0
    assert cfg.max_epsilon_for("loans") == 2.0


def test_duplicate_dataset_names_are_refused(tmp_path: Path) -> None:
    data = site_dict()
    data["datasets"].append({"name": "credit", "path": "other.csv", "label": "y"})
    with pytest.raises(InvalidSpecError, match="unique") as info:
        load_site_config(write_yaml(tmp_path / "site.yaml", data))
    assert "credit" in str(info.value)


@pytest.mark.parametrize(
    ("path", "mutate"),
    [
        ("policy.max_budget", lambda d: d["policy"].update(max_budget=3)),
        ("datasets.0.sep", lambda d: d["datasets"][0].update(sep=";")),
        ("token", lambda d: d.update(token="secret")),
    ],
)
def test_site_config_unknown_keys_named(tmp_path: Path, path: str, mutate: Any) -> None:
    data = site_dict()
    mutate(data)
    with pytest.raises(InvalidSpecError) as info:
        load_site_config(write_yaml(tmp_path / "site.yaml", data))
    assert f"  {path}:" in str(info.value)


@pytest.mark.parametrize(
    ("path", "mutate"),
    [
        ("policy.delta", lambda d: d["policy"].update(delta=0.5)),
        ("policy.max_epsilon", lambda d: d["policy"].update(max_epsilon=0)),
        ("policy.allowed_models", lambda d: d["policy"].update(allowed_models=["gpt"])),
        ("datasets", lambda d: d.update(datasets=[])),
        ("site_id", lambda d: d.update(site_id="bank a/../b")),
        ("policy", lambda d: d.pop("policy")),
    ],
)
def test_site_config_bad_values_named(tmp_path: Path, path: str, mutate: Any) -> None:
    data = site_dict()
    mutate(data)
    with pytest.raises(InvalidSpecError) as info:
        load_site_config(write_yaml(tmp_path / "site.yaml", data))
    assert f"  {path}" in str(info.value)


def test_site_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    with pytest.raises(InvalidSpecError, match="not found") as info:
        load_site_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["- a\n", "hello\n", ""])
def test_site_config_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = write_yaml(tmp_path / "site.yaml", text)
    with pytest.raises(InvalidSpecError, match="must be a YAML mapping"):
        load_site_config(path)


def test_site_config_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpecError, match="not valid YAML"):
        load_site_config(write_yaml(tmp_path / "site.yaml", "site_id: [x\n"))


def test_site_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_site_config(write_yaml(tmp_path / "site.yaml", SITE_YAML))
    assert isinstance(cfg, SiteConfig)
    with pytest.raises(Exception, match="frozen"):
        cfg.policy.max_epsilon = 1e9  # type: ignore[misc]


# ------------------------------------------------------------------ fuzz

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["mlp", "linear", "cnn1d", "cnn2d", "sgd", "adam", "relu", "credit"])
)
json_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    [
        *JobSpec.model_fields,
        "model.kind",
        "model.input_shape",
        "model.conv",
        "dp.delta",
        "dp.target_epsilon",
        "dp.noise_multiplier",
        "metrics.exact",
        "optimizer.lr",
    ]
) | st.text(max_size=8)


@st.composite
def mutated_jobs(draw: st.DrawFn) -> dict[str, Any]:
    """The example (or a conv variant) with a few fields replaced by arbitrary JSON."""
    base = draw(st.sampled_from([job_dict(), job_dict(model=CNN1D), job_dict(model=CNN2D)]))
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        key = draw(_keys)
        value = draw(json_values)
        head, _, tail = key.partition(".")
        if tail and isinstance(data.get(head), dict):
            data[head][tail] = value
        else:
            data[key] = value
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=8) | mutated_jobs())
def test_fuzz_parse_job_spec_raises_only_invalid_spec(data: dict[str, Any]) -> None:
    try:
        spec = parse_job_spec(data)
    except InvalidSpecError as err:
        assert str(err).startswith("invalid job spec:")
    else:
        # Whatever parses is a consistent spec that survives the wire.
        assert (spec.dp.noise_multiplier is None) != (spec.dp.target_epsilon is None)
        assert spec.local_steps is None or spec.local_epochs is None
        assert job_spec_from_json(spec.model_dump_json()) == spec


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200) | json_values.map(json.dumps))
def test_fuzz_job_spec_from_json_raises_only_invalid_spec(text: str) -> None:
    try:
        job_spec_from_json(text)
    except InvalidSpecError:
        pass
