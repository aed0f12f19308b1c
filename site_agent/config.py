"""The site's own configuration (``site.yaml``): identity, datasets and privacy policy.

The policy is read from this file only, never from the wire: it is what lets the site refuse
any task the orchestrator sends that would break it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import InvalidSpecError
from common.specs import format_validation_error


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Frozen):
    """One dataset the site exposes: a CSV file with a header row."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    path: Path
    label: str = Field(min_length=1, description="the label column (integers 0..C-1)")
    features: tuple[str, ...] | None = Field(
        default=None, description="feature columns, in order; default: every other column"
    )
    validation_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="rows held out for locally computed metrics"
    )
    max_epsilon: float | None = Field(
        default=None, gt=0.0, description="overrides policy.max_epsilon for this dataset"
    )


class Policy(_Frozen):
    """What this site agrees to run on its data. Enforced by the agent on every task."""

    max_epsilon: float = Field(gt=0.0, le=1000.0, description="per dataset, over all jobs")
    delta: float = Field(gt=0.0, lt=0.01, description="largest δ the site accepts")
    min_noise_multiplier: float = Field(default=0.5, gt=0.0)
    max_rounds: int = Field(default=1000, ge=1)
    max_steps_per_task: int = Field(default=100_000, ge=1)
    allowed_models: tuple[Literal["linear", "mlp", "cnn1d", "cnn2d"], ...] = (
        "linear",
        "mlp",
        "cnn1d",
        "cnn2d",
    )
    max_parameters: int = Field(default=100_000_000, ge=1)
    allow_exact_metrics: bool = Field(
        default=False, description="send un-noised validation metrics (outside the guarantee)"
    )


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

    @model_validator(mode="after")
    def _transport(self) -> SiteConfig:
        if self.tls is not None and self.insecure:
            raise ValueError("set only one of tls and insecure")
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
                d.model_copy(update={"path": (base / d.path).resolve()}) for d in cfg.datasets
            ),
        }
    )
