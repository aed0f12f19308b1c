"""The declarative spec of the autoregressive synthesizer (``model: {kind: autoregressive}``).

A job names the model by data, never code: the spec lists the encoded columns in the
encoding's order (``common.schema.encoding``), so the orchestrator and every site build the
same network from it (:mod:`common.synthesis.autoregressive`). ``orchestrator synth
--method autoregressive`` fills it from the sites' agreed declared schema
(:func:`columns_of`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.schema.encoding import FeatureEncoding


class ARColumnSpec(BaseModel):
    """One encoded feature column: its type, value slots and whether it has a missing slot.

    ``slots`` counts the value slots: 1 for a min/max-scaled number, ``T`` for ``T``
    quantile bins, ``K + 2`` for a categorical column (declared categories, "other",
    "missing"). A nullable numeric column has one more slot, its missing indicator.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    type: Literal["numeric", "categorical"]
    slots: int = Field(ge=1, le=100_002)
    nullable: bool = True

    @property
    def width(self) -> int:
        """Encoded slots of the column (its share of ``input_dim``)."""
        return self.slots + (1 if self.type == "numeric" and self.nullable else 0)


class AutoregressiveSpec(BaseModel):
    """An autoregressive generative model of (features, label) in the encoding's order.

    Each column given the columns before it, then the label given all of them.
    Each conditional is a one-hidden-layer network (``hidden`` units) on the encoded slots
    before the column. Numeric columns get a discretised density on their declared range:
    ``bins`` equal bins of the encoded position with a uniform density inside each bin (plus
    a "missing" outcome when nullable); categorical columns a softmax over their slots.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["autoregressive"]
    input_dim: int | None = Field(default=None, ge=1, le=1_000_000)
    num_classes: int | None = Field(default=None, ge=2, le=100_000)
    columns: tuple[ARColumnSpec, ...] = Field(min_length=1, max_length=10_000)
    hidden: int = Field(default=32, ge=1, le=4096)
    bins: int = Field(default=32, ge=2, le=1024)

    @model_validator(mode="after")
    def _width_matches(self) -> AutoregressiveSpec:
        width = sum(c.width for c in self.columns)
        if self.input_dim is not None and self.input_dim != width:
            raise ValueError(
                f"model.input_dim={self.input_dim} but the autoregressive columns take "
                f"{width} encoded slots"
            )
        return self


_Columns = tuple[Annotated[ARColumnSpec, Field()], ...]


def columns_of(encoding: FeatureEncoding) -> _Columns:
    """The autoregressive columns of a feature encoding, in its order."""
    out = []
    for f in encoding.features:
        c = f.column
        if c.type == "categorical":
            slots = len(c.categories) + 2
        else:
            slots = len(f.edges) - 1 if f.edges else 1
        out.append(ARColumnSpec(name=c.name, type=c.type, slots=slots, nullable=c.nullable))  # type: ignore[arg-type]
    return tuple(out)


def layout_disagreement(spec: AutoregressiveSpec, encoding: FeatureEncoding) -> str | None:
    """Why ``spec`` cannot model rows of ``encoding`` (None when its columns are the
    encoding's, in order, with the same slots)."""
    want = columns_of(encoding)
    if spec.columns == want:
        return None
    for i, (a, b) in enumerate(zip(spec.columns, want, strict=False)):
        if a != b:
            return f"column {i} is {a.model_dump()} in the model but {b.model_dump()} encoded"
    return f"the model has {len(spec.columns)} columns, the encoding {len(want)}"
