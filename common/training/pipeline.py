"""Raw rows in, class probabilities out: a released model with the encoding it was trained on.

A released model's card carries its feature encoding (``"encoding"``, the
:class:`~common.schema.encoding.FeatureEncoding` every site applied). :func:`load_pipeline`
rebuilds it next to the module, so a data scientist predicts on rows as a bank stores them::

    import pandas as pd
    from common.training.models import load_pipeline

    pipe = load_pipeline("models/credit-v1")
    rows = pd.read_csv("applications.csv")           # strings, empty cells, extra columns
    proba = pipe.predict_proba(rows)                 # (N, C), columns in pipe.classes order
    labels = pipe.predict(rows)                      # the classes' names

Rows pass through the same declared schema as at the sites (``common.schema.table``: numbers
clipped to the declared bounds, unknown categories as "other", empty cells as missing) and the
same encoding; columns the encoding does not name (the label, an id) are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from torch import nn

from common.errors import InvalidSpecError
from common.schema.encoding import FeatureEncoding
from common.schema.table import apply_schema
from common.specs import model_dims


@dataclass(frozen=True, eq=False)
class Pipeline:
    """A released model and its feature encoding (see the module docstring)."""

    module: nn.Module
    encoding: FeatureEncoding

    @property
    def classes(self) -> tuple[str, ...]:
        """The label's declared categories, in the order of the model's outputs."""
        return self.encoding.classes

    def transform(self, frame: pd.DataFrame) -> npt.NDArray[np.float32]:
        """The encoded rows ``(N, width)`` the model takes.

        Raises:
            InvalidSpecError: a feature column of the encoding is not in ``frame`` (named).
        """
        return self.encoding.encode(apply_schema(frame, self.encoding.feature_schema()))

    def predict_proba(self, frame: pd.DataFrame) -> npt.NDArray[np.float64]:
        """Class probabilities ``(N, C)``, columns in :attr:`classes` order."""
        x = torch.from_numpy(self.transform(frame))
        self.module.eval()
        with torch.no_grad():
            logits = self.module(x)
        return torch.softmax(logits.to(torch.float64), dim=1).numpy()

    def predict(self, frame: pd.DataFrame) -> npt.NDArray[np.str_]:
        """The most probable class of each row, by name."""
        proba = self.predict_proba(frame)
        names = np.asarray(self.classes, dtype=np.str_)
        return names[proba.argmax(axis=1)] if len(proba) else names[:0]


def card_encoding(card: object, *, source: str) -> FeatureEncoding:
    """The feature encoding a model card carries.

    Raises:
        InvalidSpecError: the card has none (a model released before encodings, or by hand)
            or it is malformed.
    """
    if not isinstance(card, dict) or not isinstance(card.get("encoding"), dict):
        raise InvalidSpecError(
            f"{source} carries no feature encoding, so raw rows cannot be encoded for it; "
            "load_model gives the module, which takes encoded float32 rows."
        )
    return FeatureEncoding.from_dict(card["encoding"])


def load_pipeline(path: str | Path) -> Pipeline:
    """The released model in folder ``path`` with its encoding (see the module docstring).

    Raises:
        NotFoundError: the folder or one of its files does not exist.
        InvalidSpecError: the card or the weights are invalid, the card carries no encoding,
            or the encoding does not fit the model (width, classes).
    """
    from common.training.models import CARD_FILE, load_model, parse_model_spec

    module = load_model(path)  # checks the folder, the card's spec and the weights
    card_path = Path(path) / CARD_FILE
    card = json.loads(card_path.read_text(encoding="utf-8"))
    encoding = card_encoding(card, source=f"model card {card_path}")
    input_dim, num_classes = model_dims(parse_model_spec(card["model"]))
    if (input_dim, num_classes) != (encoding.width, encoding.num_classes):
        raise InvalidSpecError(
            f"model card {card_path}: the model takes {input_dim} inputs and gives "
            f"{num_classes} classes, but its encoding has {encoding.width} slots and "
            f"{encoding.num_classes} classes."
        )
    return Pipeline(module=module, encoding=encoding)
