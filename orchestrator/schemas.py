"""The sites' declared schemas of a dataset → one agreed schema → the job's feature encoding.

A job never trains on features that mean different things at different sites. The sites that
hold a dataset each declare its columns (type, bounds, categories, nullability) and its
label's classes; the declaration held by most of the sites taking part is the job's, and a
site that declares anything else is excluded from the job with a reason naming the
difference (issue 17 item 7: one site registering a dataset name with another schema must not
block everyone). No declaration held by a strict plurality (a tie) is an error that names the
sites on each side. Only online, enabled sites are counted; offline or disabled sites never
block a job (a job submitted while every holder is offline uses their last declarations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.domain import ColumnInfo, DatasetInfo
from common.errors import InvalidSpecError
from common.schema.encoding import FeatureEncoding, derive_encoding, uniform_edges
from common.specs import JobSpec, model_dims, parse_job_spec

__all__ = [
    "Agreement",
    "agree",
    "declared_schema",
    "disagreement",
    "job_disagreement",
    "with_encoding",
]


@dataclass(frozen=True)
class Agreement:
    """The agreed declaration of a dataset, who holds it, and who was left out and why."""

    features: tuple[ColumnInfo, ...]
    label: ColumnInfo
    sites: tuple[str, ...]
    excluded: Mapping[str, str]


def _names(names: Sequence[str], limit: int = 5) -> str:
    """``'a', 'b', 'c'`` (at most ``limit`` names, then how many more)."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def describe(c: ColumnInfo) -> str:
    """A column's declaration in a few words (for messages)."""
    missing = " or missing" if c.nullable else ""
    if c.type == "categorical":
        return f"categorical [{', '.join(c.categories)}]{missing}"
    return f"{c.type} in [{c.min:g}, {c.max:g}]{missing}" if c.min is not None else c.type


def declared_schema(d: DatasetInfo) -> tuple[tuple[ColumnInfo, ...], ColumnInfo] | str:
    """The feature columns (in the site's order) and the label a site declares, or why its
    declaration cannot be trained on (a feature without type and bounds, no label classes)."""
    by_name = {c.name: c for c in d.schema}
    undeclared = [
        n
        for n in d.columns
        if n not in by_name
        or (by_name[n].type == "numeric" and (by_name[n].min is None or by_name[n].max is None))
        or by_name[n].type not in ("numeric", "categorical")
    ]
    if undeclared:
        return (
            f"it declares no type and bounds for the column(s) {_names(undeclared)} "
            "(site.yaml: columns, or feature_bounds)"
        )
    label = d.label_schema
    if label is None or label.type != "categorical" or len(label.categories) < 2:
        return (
            f"it declares no classes for the label {d.label!r} (site.yaml: the label as a "
            "categorical column, or num_classes)"
        )
    if not d.columns:
        return "it declares no feature columns"
    return tuple(by_name[n] for n in d.columns), label


def _key(features: Sequence[ColumnInfo], label: ColumnInfo) -> tuple[Any, ...]:
    cols = tuple(sorted((c.name, c.type, c.min, c.max, c.categories, c.nullable) for c in features))
    return cols, (label.name, label.categories)


def _difference(
    theirs: tuple[tuple[ColumnInfo, ...], ColumnInfo],
    agreed: tuple[tuple[ColumnInfo, ...], ColumnInfo],
    holders: Sequence[str],
) -> str:
    """How one declaration differs from the agreed one, column by column."""
    at = f"at {', '.join(holders[:3])}{' and others' if len(holders) > 3 else ''}"
    mine = {c.name: c for c in theirs[0]}
    ours = {c.name: c for c in agreed[0]}
    parts = []
    absent = [n for n in ours if n not in mine]
    extra = [n for n in mine if n not in ours]
    if absent:
        parts.append(f"it lacks the column(s) {_names(absent)} declared {at}")
    if extra:
        parts.append(f"its column(s) {_names(extra)} are not declared {at}")
    differ = [n for n, c in mine.items() if n in ours and c != ours[n]]
    for name in differ[:3]:
        parts.append(
            f"column {name!r} is {describe(mine[name])} here but {describe(ours[name])} {at}"
        )
    if len(differ) > 3:
        parts.append(f"{len(differ) - 3} more column(s) differ")
    lab, agreed_lab = theirs[1], agreed[1]
    if lab.name != agreed_lab.name or lab.categories != agreed_lab.categories:
        parts.append(
            f"its label {lab.name!r} has classes [{', '.join(lab.categories)}] but "
            f"{agreed_lab.name!r} has [{', '.join(agreed_lab.categories)}] {at}"
        )
    return "its schema disagrees with the other sites': " + "; ".join(parts)


def agree(dataset: str, holders: Sequence[tuple[str, DatasetInfo]]) -> Agreement:
    """The declaration most of ``holders`` (site id, its dataset) share; the others excluded.

    Raises:
        InvalidSpecError: no holder declares a schema that can be trained on (each site's
            reason named), or two or more declarations are held by equally many sites.
    """
    excluded: dict[str, str] = {}
    groups: dict[tuple[Any, ...], list[str]] = {}
    declared: dict[str, tuple[tuple[ColumnInfo, ...], ColumnInfo]] = {}
    for sid, d in sorted(holders, key=lambda h: h[0]):
        schema = declared_schema(d)
        if isinstance(schema, str):
            excluded[sid] = schema
            continue
        declared[sid] = schema
        groups.setdefault(_key(*schema), []).append(sid)
    if not groups:
        raise InvalidSpecError(
            f"No site declares a schema of dataset {dataset!r} that a model can be trained on: "
            + "; ".join(f"at {sid}, {why}" for sid, why in sorted(excluded.items()))
            + ". Training needs every feature and the label declared in site.yaml."
        )
    ranked = sorted(groups.values(), key=len, reverse=True)
    if len(ranked) > 1 and len(ranked[0]) == len(ranked[1]):
        tied = [g for g in ranked if len(g) == len(ranked[0])]
        raise InvalidSpecError(
            f"The sites holding dataset {dataset!r} declare different schemas and none is "
            f"held by more sites than the others: "
            + " versus ".join("{" + ", ".join(g) + "}" for g in tied)
            + ". "
            + _difference(declared[tied[1][0]], declared[tied[0][0]], tied[0])
            + ". An operator can disable the sites whose declaration is wrong."
        )
    winners = ranked[0]
    agreed = declared[winners[0]]
    for group in ranked[1:]:
        for sid in group:
            excluded[sid] = _difference(declared[sid], agreed, winners)
    return Agreement(features=agreed[0], label=agreed[1], sites=tuple(winners), excluded=excluded)


def disagreement(encoding: FeatureEncoding, d: DatasetInfo) -> str | None:
    """Why a site's declared dataset cannot take part in a job with ``encoding`` (None if
    it can): its declaration must be exactly the one the encoding was derived from."""
    schema = declared_schema(d)
    if isinstance(schema, str):
        return schema
    agreed = (encoding.feature_schema(), encoding.label_schema())
    if _key(*schema) == _key(*agreed):
        return None
    return _difference(schema, agreed, ["the job's other sites"])


def job_encoding(spec: JobSpec, agreement: Agreement) -> FeatureEncoding:
    """The encoding of ``agreement`` with the job's options; quantile columns get uniform
    placeholder edges (right width) until the DP edges are released before round 1."""
    opts = spec.encoding
    edges = None
    if opts.numeric == "quantile":
        edges = {
            c.name: uniform_edges(c.min, c.max, opts.bins)
            for c in agreement.features
            if c.type == "numeric" and c.min is not None and c.max is not None
        }
    return derive_encoding(agreement.features, agreement.label, numeric=opts.numeric, edges=edges)


def with_encoding(spec: JobSpec, agreement: Agreement) -> JobSpec:
    """``spec`` with its encoding derived from ``agreement`` and the model's dimensions
    filled from it.

    Raises:
        InvalidSpecError: the spec already carries derived features (they are the
            orchestrator's to fill), or an explicit ``model.input_dim``/``num_classes``
            differs from the derived one (both named).
    """
    if spec.encoding.features or spec.encoding.label is not None:
        raise InvalidSpecError(
            "encoding.features and encoding.label are derived by the orchestrator from the "
            "sites' declared schemas; leave them out of the job spec."
        )
    encoding = job_encoding(spec, agreement)
    derived = {"input_dim": encoding.width, "num_classes": encoding.num_classes}
    for key, value in derived.items():
        given = getattr(spec.model, key)
        if given is not None and given != value:
            raise InvalidSpecError(
                f"model.{key}={given}, but the encoding derived from the declared schema of "
                f"dataset {spec.dataset!r} gives {key}={value} "
                f"({_explain(encoding) if key == 'input_dim' else _classes(encoding)}); "
                f"leave model.{key} out to use the derived value."
            )
    data = spec.model_dump(mode="json")
    data["model"] = {**data["model"], **derived}
    data["encoding"] = {**data["encoding"], **encoding.to_dict(), "edges_released": False}
    out = parse_job_spec(data)
    assert model_dims(out.model) == (encoding.width, encoding.num_classes)
    return out


def _explain(encoding: FeatureEncoding) -> str:
    return ", ".join(f"{f.name}: {f.width}" for f in encoding.features)


def _classes(encoding: FeatureEncoding) -> str:
    return f"label {encoding.label.name!r}: {', '.join(encoding.classes)}"


def job_disagreement(spec: JobSpec, d: DatasetInfo) -> str | None:
    """Why a site's dataset cannot take part in job ``spec`` (None if it can, or if the spec
    carries no derived encoding)."""
    if not spec.encoding.derived:
        return None
    return disagreement(spec.encoding.feature_encoding(require_edges=False), d)
