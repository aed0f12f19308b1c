"""Which feature encoding a site trains or evaluates on, checked against its own declaration.

A job carries one :class:`~common.schema.encoding.FeatureEncoding`, derived by the
orchestrator from the sites' declared schemas (issue 15.2). A site never trusts it: every
column it names must be one of the dataset's features, declared here with the same type,
bounds, categories and nullability, and the label must be the dataset's label with the same
classes in the same order. Otherwise the task is refused with a message naming the columns,
so that a model never trains on features that mean different things at different sites.
Everything here reads the site's configuration and the task only, never the data.
"""

from __future__ import annotations

from common.domain import ColumnInfo
from common.errors import InvalidSpecError
from common.schema.encoding import FeatureEncoding, derive_encoding
from site_agent.config import DatasetConfig

__all__ = ["checked_encoding"]


def checked_encoding(
    cfg: DatasetConfig,
    feature_names: tuple[str, ...],
    job_encoding: FeatureEncoding | None,
    *,
    what: str,
) -> FeatureEncoding:
    """The encoding ``what`` (a train or evaluate task) runs on dataset ``cfg``.

    ``job_encoding`` is the task's own; None means the task carries none (a spec written
    by hand), and the site derives the min/max encoding of its own declaration.

    Raises:
        InvalidSpecError: a column the model needs is not declared here (named), or the
            task's encoding disagrees with this site's declaration (columns named).
    """
    declared = {c.name: c for c in cfg.feature_schema(feature_names)}
    label = cfg.label_schema()
    where = f"dataset {cfg.name!r}"
    if job_encoding is None:
        missing = cfg.undeclared(feature_names)
        if missing:
            raise InvalidSpecError(
                f"This site cannot run {what} on {where}: the column(s) "
                f"{', '.join(repr(n) for n in missing)} have no declared type and bounds "
                "(numeric min/max, categories, or the label's classes) in site.yaml; declare "
                "them under the dataset's columns, or set feature_bounds / num_classes."
            )
        assert label is not None
        return derive_encoding(tuple(declared[n] for n in feature_names), label)

    if label is None:
        raise InvalidSpecError(
            f"This site cannot run {what} on {where}: its label column {cfg.label!r} has no "
            "declared classes in site.yaml; declare it under columns (categorical) or set "
            "num_classes."
        )
    if job_encoding.label.name != cfg.label or job_encoding.classes != label.categories:
        raise InvalidSpecError(
            f"This site refuses {what} on {where}: the job's label "
            f"{job_encoding.label.name!r} with classes {list(job_encoding.classes)} differs "
            f"from this site's label {cfg.label!r} with classes {list(label.categories)}."
        )
    unknown: list[str] = []
    undeclared: list[str] = []
    different: list[str] = []
    for col in job_encoding.feature_schema():
        mine = declared.get(col.name)
        if mine is None:
            unknown.append(col.name)
        elif mine.type == "numeric" and (mine.min is None or mine.max is None):
            undeclared.append(col.name)
        elif not _same(mine, col):
            different.append(col.name)
    if unknown:
        raise InvalidSpecError(
            f"This site refuses {what} on {where}: the job encodes the column(s) "
            f"{', '.join(repr(n) for n in unknown)}, which are not features of this dataset."
        )
    if undeclared:
        raise InvalidSpecError(
            f"This site refuses {what} on {where}: the column(s) "
            f"{', '.join(repr(n) for n in undeclared)} have no declared bounds in this site's "
            "site.yaml."
        )
    if different:
        raise InvalidSpecError(
            f"This site refuses {what} on {where}: the job's encoding declares the column(s) "
            f"{', '.join(repr(n) for n in different)} differently from this site's site.yaml "
            "(type, bounds, categories or nullable); the sites' schemas must agree."
        )
    return job_encoding


def _same(mine: ColumnInfo, theirs: ColumnInfo) -> bool:
    if mine.type != theirs.type or mine.nullable != theirs.nullable:
        return False
    if mine.type == "categorical":
        return tuple(mine.categories) == tuple(theirs.categories)
    return mine.min == theirs.min and mine.max == theirs.max
