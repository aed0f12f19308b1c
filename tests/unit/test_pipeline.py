"""load_pipeline: a released model with its encoding, predicting on raw rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from common.domain import ColumnInfo
from common.errors import InvalidSpecError
from common.schema.encoding import derive_encoding
from common.schema.table import apply_schema
from common.training.models import (
    build_model,
    load_model,
    load_pipeline,
    parse_model_spec,
    save_model,
)

FEATURES = [
    ColumnInfo("income", "numeric", min=0.0, max=1000.0),
    ColumnInfo("home", "categorical", categories=("owner", "rent")),
]
LABEL = ColumnInfo("status", "categorical", categories=("good", "bad"), nullable=False)
ENCODING = derive_encoding(FEATURES, LABEL)  # width 2 + 4


def _release(tmp_path: Path, card_extra: dict[str, Any] | None = None) -> Path:
    spec = {"kind": "linear", "input_dim": ENCODING.width, "num_classes": 2}
    state = build_model(parse_model_spec(spec)).state_dict()
    state["logits.weight"].zero_()  # "bad" rises with income
    state["logits.bias"].zero_()
    state["logits.weight"][1, 0] = 8.0
    state["logits.bias"][1] = -4.0
    card = {"model": spec, "encoding": ENCODING.to_dict(), **(card_extra or {})}
    save_model(tmp_path / "m", module_or_state=state, card=card)
    return tmp_path / "m"


RAW = pd.DataFrame(
    {
        "status": ["good", "bad", "", "whatever"],  # the label: ignored
        "id": ["a1", "a2", "a3", "a4"],  # an extra column: ignored
        "home": ["rent", "", "castle", "owner"],
        "income": ["100", "", "950.5", "1e9"],
    }
)


def test_predicts_on_raw_rows_with_missing_cells(tmp_path: Path) -> None:
    pipe = load_pipeline(_release(tmp_path))
    assert pipe.classes == ("good", "bad")
    proba = pipe.predict_proba(RAW)
    assert proba.shape == (4, 2) and np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert list(pipe.predict(RAW)) == ["good", "good", "bad", "bad"]
    # the same numbers as the module on the encoded rows
    x = ENCODING.encode(apply_schema(RAW, ENCODING.feature_schema()))
    with torch.no_grad():
        logits = load_model(tmp_path / "m")(torch.from_numpy(x))
    np.testing.assert_allclose(proba, torch.softmax(logits.double(), dim=1).numpy(), rtol=1e-6)


def test_an_empty_frame_gives_empty_predictions(tmp_path: Path) -> None:
    pipe = load_pipeline(_release(tmp_path))
    empty = RAW.iloc[:0]
    assert pipe.predict_proba(empty).shape == (0, 2)
    assert pipe.predict(empty).shape == (0,)


def test_a_missing_feature_column_is_named(tmp_path: Path) -> None:
    pipe = load_pipeline(_release(tmp_path))
    with pytest.raises(InvalidSpecError, match="'home'"):
        pipe.predict(RAW.drop(columns=["home"]))


def test_a_card_without_an_encoding_is_refused(tmp_path: Path) -> None:
    folder = _release(tmp_path)
    card = json.loads((folder / "model_card.json").read_text())
    del card["encoding"]
    (folder / "model_card.json").write_text(json.dumps(card))
    assert load_model(folder) is not None  # the module still loads
    with pytest.raises(InvalidSpecError, match="no feature encoding"):
        load_pipeline(folder)


def test_an_encoding_that_does_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    folder = _release(tmp_path)
    card = json.loads((folder / "model_card.json").read_text())
    card["encoding"]["features"] = card["encoding"]["features"][:1]
    (folder / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(InvalidSpecError, match=r"6 inputs.*2 slots"):
        load_pipeline(folder)
