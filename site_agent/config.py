"""The site's own configuration (``site.yaml``): identity, datasets and privacy policy.

The policy is read from this file only, never from the wire: it is what lets the site refuse
any task the orchestrator sends that would break it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.domain import ColumnInfo
from common.errors import InvalidSpecError
from common.schema.table import FLOAT32_MAX
from common.specs import format_validation_error
from site_agent.device import check_available as check_device


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnSpec(_Frozen):
    """Declared type and bounds of a column: the contract between the raw data and everything
    else (``common.schema.table.apply_schema``). At load time numeric values are clipped to
    ``[min, max]`` and categorical values outside ``categories`` become "other"; empty cells
    and ``NA``/``NaN`` are missing. The declaration is public schema; the values never leave
    the site and never appear in an error."""

    type: Literal["numeric", "categorical"] = "numeric"
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] | None = Field(default=None, min_length=1, max_length=10_000)
    nullable: bool = Field(
        default=True, description="cells may be missing (the encoding adds an indicator)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ColumnSpec:
        if self.type == "numeric":
            if self.categories is not None:
                raise ValueError("a numeric column has min/max, not categories")
            if (self.min is None) != (self.max is None):
                raise ValueError("give both min and max, or neither")
            if self.min is not None and self.max is not None:
                _check_bounds(self.min, self.max)
        elif self.categories is None:
            raise ValueError("a categorical column needs its categories")
        elif len(set(self.categories)) != len(self.categories):
            raise ValueError("categories must be distinct")
        return self

    def info(self, name: str) -> ColumnInfo:
        """This declaration as the schema type every other module reads."""
        return ColumnInfo(
            name=name,
            type=self.type,
            min=self.min,
            max=self.max,
            categories=tuple(self.categories or ()),
            nullable=self.nullable,
        )


def _check_bounds(low: float, high: float) -> None:
    for value in (low, high):
        if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise ValueError(f"bounds must be finite numbers within float32's range, got {value}")
    if not low < high:
        raise ValueError(f"min {low} must be below max {high}")


class DatasetConfig(_Frozen):
    """One dataset the site exposes: a CSV or Parquet file, or a SQL query (SQLAlchemy URL)."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    path: Path | None = Field(default=None, description="CSV or Parquet file")
    format: Literal["csv", "parquet", "sql"] | None = Field(
        default=None, description="default: from the file suffix, or sql when url is set"
    )
    url: str | None = Field(
        default=None,
        description="SQLAlchemy URL, e.g. sqlite:///data.db or "
        "postgresql+psycopg://reader@db.internal/warehouse",
    )
    query: str | None = Field(default=None, max_length=100_000, description="SELECT ...")
    chunk_rows: int = Field(default=100_000, ge=100, description="rows per chunk when streaming")
    columns: dict[str, ColumnSpec] = Field(default_factory=dict, description="types and bounds")
    label: str = Field(
        min_length=1,
        description="the label column, declared under columns as categorical (its categories "
        "are the classes, in order), or integers 0..C-1 declared by num_classes",
    )
    features: tuple[str, ...] | None = Field(
        default=None, description="feature columns, in order; default: every other column"
    )
    feature_bounds: tuple[float, float] | None = Field(
        default=None,
        description="[min, max] of every feature not declared under columns (numeric, never "
        "missing)",
    )
    num_classes: int | None = Field(
        default=None,
        ge=2,
        le=100_000,
        description="an undeclared integer label has classes 0..num_classes-1",
    )
    validation_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="expected share of rows held out for locally computed metrics (each "
        "record's side is drawn from a keyed hash of the record)",
    )
    max_epsilon: float | None = Field(
        default=None, gt=0.0, description="overrides policy.max_epsilon for this dataset"
    )
    storage: Literal["memory", "disk"] = Field(
        default="memory",
        description="disk: never load the table; train from an encoded, memory-mapped row "
        "cache in the state dir, built once per data version (CSV or Parquet; "
        "site_agent.data.row_store)",
    )
    engine: Literal["local", "dask"] = Field(
        default="local",
        description="dask: the site's Dask cluster (dask_scheduler) computes the exact "
        "statistics the site releases over the Parquet partitions; noise and charge stay in "
        "the agent (site_agent.dask_engine)",
    )

    @model_validator(mode="after")
    def _source(self) -> DatasetConfig:
        fmt = self.source_format()
        if fmt == "sql":
            if not self.url or not self.query:
                raise ValueError("a sql dataset needs url and query")
            if self.path is not None:
                raise ValueError("a sql dataset has url and query, not path")
        elif self.path is None:
            raise ValueError("a file dataset needs path")
        if fmt == "sql" and self.storage == "disk":
            raise ValueError("storage: disk reads a CSV or Parquet file, not a SQL query")
        if self.engine == "dask" and fmt != "parquet":
            raise ValueError("engine: dask reads Parquet (a file or a folder of .parquet files)")
        return self

    @model_validator(mode="after")
    def _declarations(self) -> DatasetConfig:
        if self.feature_bounds is not None:
            _check_bounds(*self.feature_bounds)
        spec = self.columns.get(self.label)
        if spec is not None:
            if spec.type != "categorical":
                raise ValueError(
                    f"the label column {self.label!r} must be declared categorical, its "
                    "categories being the classes in order"
                )
            if self.num_classes is not None:
                raise ValueError(
                    f"the label column {self.label!r} is declared under columns; drop "
                    "num_classes (its categories are the classes)"
                )
            if len(spec.categories or ()) < 2:
                raise ValueError(f"the label column {self.label!r} needs at least 2 classes")
        return self

    def label_schema(self) -> ColumnInfo | None:
        """The label's declared classes, in order; None when the label is not declared."""
        spec = self.columns.get(self.label)
        if spec is not None:
            return spec.info(self.label)
        if self.num_classes is not None:
            return ColumnInfo(
                name=self.label,
                type="categorical",
                categories=tuple(str(i) for i in range(self.num_classes)),
                nullable=True,
            )
        return None

    def feature_schema(self, names: Sequence[str]) -> tuple[ColumnInfo, ...]:
        """Each feature's declaration: from ``columns``, else numeric within
        ``feature_bounds`` and never missing, else numeric without bounds (undeclared)."""
        out = []
        for name in names:
            spec = self.columns.get(name)
            if spec is not None:
                out.append(spec.info(name))
            elif self.feature_bounds is not None:
                low, high = self.feature_bounds
                out.append(ColumnInfo(name=name, min=low, max=high, nullable=False))
            else:
                out.append(ColumnInfo(name=name))
        return tuple(out)

    def undeclared(self, names: Sequence[str]) -> list[str]:
        """The columns among ``names`` (features) and the label that a model cannot train on
        because they lack a declaration (numeric bounds, categories or the label's classes)."""
        missing = [
            c.name
            for c in self.feature_schema(names)
            if c.type == "numeric" and (c.min is None or c.max is None)
        ]
        if self.label_schema() is None:
            missing.append(self.label)
        return missing

    def source_format(self) -> str:
        if self.format is not None:
            return self.format
        if self.url is not None:
            return "sql"
        if self.path is not None and self.path.suffix.lower() in (".parquet", ".pq"):
            return "parquet"
        return "csv"


class Policy(_Frozen):
    """What this site agrees to run on its data. Enforced by the agent on every task."""

    max_epsilon: float = Field(gt=0.0, le=1000.0, description="per dataset, over all jobs")
    delta: float = Field(gt=0.0, lt=0.01, description="largest δ the site accepts")
    min_noise_multiplier: float = Field(default=0.5, gt=0.0)
    max_rounds: int = Field(default=1000, ge=1)
    max_steps_per_task: int = Field(default=100_000, ge=1)
    allowed_models: tuple[Literal["linear", "mlp", "cnn1d", "cnn2d", "autoregressive"], ...] = (
        "linear",
        "mlp",
        "cnn1d",
        "cnn2d",
        "autoregressive",  # the DP synthesizer (issue 20): trained by the same DP-SGD
    )
    max_parameters: int = Field(default=100_000_000, ge=1)
    allow_exact_metrics: bool = Field(
        default=False, description="send un-noised validation metrics (outside the guarantee)"
    )
    catalog_noise_multiplier: float = Field(
        default=20.0,
        gt=0.0,
        description="σ of the Gaussian noise on row counts shown to data scientists "
        "(charged once per dataset, then cached)",
    )
    secure_noise: bool = Field(
        default=False,
        description="draw every DP noise value from a ChaCha20 CSPRNG with Opacus' "
        "secure-mode countermeasure to floating-point attacks (common/dp/noise.py); slower",
    )
    disclose_row_counts: bool = Field(
        default=True,
        description="false: no exact row count leaves the site. It registers the catalog's "
        "DP count (charged, catalog_noise_multiplier) as its size; sample rates, steps, "
        "the DP-SGD normalisation and every reported example count derive from that public "
        "count, and without one (withheld) the dataset serves no task (issue 16.9)",
    )

    @model_validator(mode="after")
    def _counts(self) -> Policy:
        if not self.disclose_row_counts and self.allow_exact_metrics:
            raise ValueError(
                "allow_exact_metrics sends exact validation counts and metrics, which "
                "disclose_row_counts: false forbids; set only one of them"
            )
        return self


class TlsConfig(_Frozen):
    """The site's mTLS material, issued by the deployment's CA (``orchestrator certs``)."""

    ca: Path
    cert: Path
    key: Path


class SiteConfig(_Frozen):
    site_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    orchestrator: str = Field(min_length=3, description="host:port the agent dials")
    state_dir: Path
    datasets: tuple[DatasetConfig, ...] = Field(min_length=1)
    policy: Policy
    tls: TlsConfig | None = Field(
        default=None,
        description="mTLS files; default pki/ca.pem, pki/sites/<site_id>.pem/.key beside site.yaml",
    )
    insecure: bool = Field(
        default=False, description="plaintext gRPC instead of mTLS (loopback only, for development)"
    )
    poll_seconds: float = Field(default=10.0, gt=0.0, le=300.0)
    heartbeat_seconds: float = Field(default=5.0, gt=0.0, le=300.0)
    threads: int | None = Field(default=None, ge=1, le=256, description="torch threads")
    dask_scheduler: str | None = Field(
        default=None,
        min_length=3,
        description="the site's Dask scheduler (tcp://host:8786) for datasets with engine: "
        "dask; 'synchronous' runs the same map in the agent's process (tests, debugging)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="where training runs: auto (CUDA when present), cpu, or cuda "
        "(an error on a machine without CUDA); site_agent.device",
    )

    @model_validator(mode="after")
    def _device(self) -> SiteConfig:
        check_device(self.device)
        return self

    @model_validator(mode="after")
    def _transport(self) -> SiteConfig:
        if self.tls is not None and self.insecure:
            raise ValueError("set only one of tls and insecure")
        return self

    @model_validator(mode="after")
    def _engines(self) -> SiteConfig:
        dask = [d.name for d in self.datasets if d.engine == "dask"]
        if dask and self.dask_scheduler is None:
            raise ValueError(f"dataset(s) {dask} have engine: dask; set dask_scheduler")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> SiteConfig:
        names = [d.name for d in self.datasets]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"dataset names must be unique; repeated: {sorted(dup)}")
        return self

    def dataset(self, name: str) -> DatasetConfig | None:
        return next((d for d in self.datasets if d.name == name), None)

    def max_epsilon_for(self, name: str) -> float:
        ds = self.dataset(name)
        if ds is not None and ds.max_epsilon is not None:
            return min(ds.max_epsilon, self.policy.max_epsilon)
        return self.policy.max_epsilon


def load_site_config(path: str | Path) -> SiteConfig:
    """Read ``site.yaml``; relative dataset paths and state_dir resolve against its folder."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise InvalidSpecError(f"site config not found: {p}") from None
    except yaml.YAMLError as err:
        raise InvalidSpecError(f"site config {p} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise InvalidSpecError(f"site config {p} must be a YAML mapping")
    try:
        cfg = SiteConfig.model_validate(raw)
    except ValidationError as err:
        raise InvalidSpecError(format_validation_error(err, source=f"site config {p}")) from None
    base = p.resolve().parent
    tls = cfg.tls
    if tls is None and not cfg.insecure:
        tls = TlsConfig(
            ca=Path("pki/ca.pem"),
            cert=Path(f"pki/sites/{cfg.site_id}.pem"),
            key=Path(f"pki/sites/{cfg.site_id}.key"),
        )
    if tls is not None:
        tls = TlsConfig(
            ca=(base / tls.ca).resolve(),
            cert=(base / tls.cert).resolve(),
            key=(base / tls.key).resolve(),
        )
    return cfg.model_copy(
        update={
            "tls": tls,
            "state_dir": (base / cfg.state_dir).resolve(),
            "datasets": tuple(
                d.model_copy(update={"path": (base / d.path).resolve()})
                if d.path is not None
                else d.model_copy(update={"url": _resolve_sqlite(d.url, base)})
                for d in cfg.datasets
            ),
        }
    )


def _resolve_sqlite(url: str | None, base: Path) -> str | None:
    """A relative SQLite file in a URL is relative to site.yaml, like every other path."""
    prefix = "sqlite:///"
    if url is None or not url.startswith(prefix) or url.startswith(prefix + "/"):
        return url
    rest = url[len(prefix) :]
    if not rest or rest.startswith(":memory:"):
        return url
    return prefix + str((base / rest).resolve())
