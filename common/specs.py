"""Declarative job specification: what a data scientist asks the sites to run.

A job is *data*, never code. Everything a site agent needs to build and train the model is in
this closed vocabulary; it is validated with ``extra="forbid"`` on both sides of the wire (the
orchestrator when a job is submitted, every site agent again when a task arrives), so an
unknown key or an out-of-range value is refused with a message naming the field.

A data scientist may leave ``model.input_dim`` and ``model.num_classes`` out: at submit the
orchestrator derives the feature encoding from the sites' declared schemas
(``common.schema.encoding``), writes it under ``encoding`` and fills both from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import InvalidSpecError
from common.schema.encoding import MAX_BINS, FeatureEncoding
from common.synthesis.autoregressive_spec import AutoregressiveSpec

Activation = Literal["relu", "tanh", "gelu", "sigmoid", "elu", "leaky_relu"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinearSpec(_Frozen):
    """Multinomial logistic regression: one affine layer."""

    kind: Literal["linear"]
    input_dim: int | None = Field(default=None, ge=1, le=1_000_000)
    num_classes: int | None = Field(default=None, ge=2, le=100_000)


class MLPSpec(_Frozen):
    """Fully connected network: ``input_dim -> hidden[0] -> ... -> num_classes``."""

    kind: Literal["mlp"]
    input_dim: int | None = Field(default=None, ge=1, le=1_000_000)
    num_classes: int | None = Field(default=None, ge=2, le=100_000)
    hidden: tuple[Annotated[int, Field(ge=1, le=65_536)], ...] = Field(default=(64,), max_length=32)
    activation: Activation = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class ConvLayerSpec(_Frozen):
    channels: int = Field(ge=1, le=4096)
    kernel_size: int = Field(default=3, ge=1, le=31)
    stride: int = Field(default=1, ge=1, le=8)
    pool: int = Field(
        default=1, ge=1, le=8, description="max-pool window after the layer; 1 = none"
    )


class Conv1dSpec(_Frozen):
    """1-D conv net over rows of ``input_dim`` features reshaped to ``(channels, length)``."""

    kind: Literal["cnn1d"]
    input_dim: int | None = Field(default=None, ge=1, le=1_000_000)
    num_classes: int | None = Field(default=None, ge=2, le=100_000)
    input_shape: tuple[int, int] = Field(description="(channels, length); product = input_dim")
    conv: tuple[ConvLayerSpec, ...] = Field(min_length=1, max_length=16)
    hidden: tuple[Annotated[int, Field(ge=1, le=65_536)], ...] = Field(default=(), max_length=8)
    activation: Activation = "relu"
    groupnorm_groups: int = Field(
        default=0, ge=0, le=64, description="GroupNorm after each conv (0 = none); DP-safe"
    )

    @model_validator(mode="after")
    def _shape_matches(self) -> Conv1dSpec:
        c, length = self.input_shape
        if c < 1 or length < 1 or c * length != (self.input_dim or c * length):
            raise ValueError(
                f"input_shape {self.input_shape} does not multiply to input_dim {self.input_dim}"
            )
        return self


class Conv2dSpec(_Frozen):
    """2-D conv net over rows reshaped to ``(channels, height, width)`` (e.g. 1x8x8 digits)."""

    kind: Literal["cnn2d"]
    input_dim: int | None = Field(default=None, ge=1, le=1_000_000)
    num_classes: int | None = Field(default=None, ge=2, le=100_000)
    input_shape: tuple[int, int, int] = Field(description="(channels, height, width)")
    conv: tuple[ConvLayerSpec, ...] = Field(min_length=1, max_length=16)
    hidden: tuple[Annotated[int, Field(ge=1, le=65_536)], ...] = Field(default=(), max_length=8)
    activation: Activation = "relu"
    groupnorm_groups: int = Field(default=0, ge=0, le=64)

    @model_validator(mode="after")
    def _shape_matches(self) -> Conv2dSpec:
        c, h, w = self.input_shape
        if min(c, h, w) < 1 or c * h * w != (self.input_dim or c * h * w):
            raise ValueError(
                f"input_shape {self.input_shape} does not multiply to input_dim {self.input_dim}"
            )
        return self


ModelSpec = Annotated[
    LinearSpec | MLPSpec | Conv1dSpec | Conv2dSpec | AutoregressiveSpec,
    Field(discriminator="kind"),
]


def model_dims(spec: ModelSpec) -> tuple[int, int]:
    """``(input_dim, num_classes)`` of a model spec whose dimensions are known.

    Raises:
        InvalidSpecError: either is unset (a job spec the orchestrator has not completed).
    """
    if spec.input_dim is None or spec.num_classes is None:
        raise InvalidSpecError(
            "model.input_dim and model.num_classes are not set; the orchestrator derives them "
            "from the sites' declared schemas when the job is submitted."
        )
    return spec.input_dim, spec.num_classes


class OptimizerSpec(_Frozen):
    """``sgld``: DP-SGLD (``common.training.sgld``, ``orchestrator.training.posterior``): plain SGD steps
    whose DP noise is the Langevin noise (topped up to ``temperature`` when too small); the
    global models of ``samples`` rounds after ``burn_in`` are kept and released as an
    ensemble."""

    name: Literal["sgd", "adam", "sgld"] = "sgd"
    lr: float = Field(default=0.1, gt=0.0, le=10.0)
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    burn_in: int = Field(default=0, ge=0, le=10_000, description="sgld: rounds before sampling")
    samples: int = Field(default=1, ge=1, le=1000, description="sgld: posterior samples kept")
    temperature: float = Field(default=1.0, gt=0.0, le=1e6, description="sgld: posterior T")


class DPSpec(_Frozen):
    """Sample-level DP-SGD parameters requested for every site.

    Exactly one of ``noise_multiplier`` and ``target_epsilon`` is set. With ``target_epsilon``
    each site's σ is calibrated to its own sample rate so that no site passes the target over
    the planned rounds.
    """

    noise_multiplier: float | None = Field(default=None, ge=0.01, le=1000.0)
    target_epsilon: float | None = Field(default=None, gt=0.0, le=1000.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=1e6)
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _one_of(self) -> DPSpec:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of dp.noise_multiplier and dp.target_epsilon")
        if self.delta >= 0.01:
            raise ValueError(f"dp.delta={self.delta} is not a meaningful guarantee; use < 0.01")
        return self


class SiteDPSpec(_Frozen):
    """Optional site-level DP: DP-FedAvg (McMahan et al. 2018) on top of sample-level DP-SGD.

    The orchestrator clips each site's update to ``clip_norm`` (L2), sums the clipped updates
    with uniform weights, adds Gaussian noise of std ``noise_multiplier · clip_norm`` and divides
    by the number of sites selected for the job. This hides whether any one *site* took part,
    at the price of noise that only many sites can average out. With ``adaptive: true`` the
    clip norm follows the ``target_quantile`` of update norms, estimated with a noised count
    (Andrew et al. 2021), whose noise is accounted for in ``noise_multiplier``.
    """

    noise_multiplier: float = Field(ge=0.01, le=1000.0)
    clip_norm: float = Field(gt=0.0, le=1e6)
    adaptive: bool = False
    target_quantile: float = Field(default=0.5, gt=0.0, lt=1.0)
    clip_learning_rate: float = Field(default=0.2, gt=0.0, le=10.0)
    count_noise_multiplier: float | None = Field(
        default=None, gt=0.0, description="σ_b of the unclipped count; default: sites / 20"
    )


class AggregationSpec(_Frozen):
    """How the orchestrator combines the sites' updates each round (``aggregation:``).

    ``fedavg`` (McMahan et al. 2017) weights each site by the rows it registered, but no one
    site's share of a round's total weight may pass ``max_site_weight`` (a site that claims a
    huge dataset is capped, and the cap is an event on the job). ``trimmed_mean`` and
    ``median`` are coordinate-wise over sites, unweighted (Yin et al. 2018, "Byzantine-Robust
    Distributed Learning"): ``trim`` is the fraction of sites dropped at each end of every
    coordinate. With ``site_dp`` the server-side DP mechanism fixes the aggregation
    (``fedavg`` only).
    """

    method: Literal["fedavg", "trimmed_mean", "median"] = "fedavg"
    trim: float = Field(default=0.2, ge=0.0, lt=0.5, description="trimmed_mean: cut per end")
    max_site_weight: float = Field(
        default=0.5, gt=0.0, le=1.0, description="fedavg: largest share of one site (1 = none)"
    )


class AuditSpec(_Frozen):
    """Optional empirical privacy audit (Steinke, Nasr, Jagielski 2023).

    Each site adds ``canaries`` synthetic records (uniform in its declared feature bounds,
    random labels), each included in training with probability ½ by a coin only the site
    knows. After the last round the sites score their canaries under the model and the
    orchestrator derives an ε lower bound; one above the claimed ε withholds the model.
    """

    canaries: int = Field(default=200, ge=10, le=100_000, description="per site")


class MetricsSpec(_Frozen):
    """When and how the sites report validation metrics (loss, accuracy, ROC AUC).

    Metrics are computed on site data, so they leave a site only through the Gaussian
    mechanism and are charged to the site's ledger like any release. By default they are
    released once, in the final round, where they describe the model that is released; with
    ``every: k`` also in rounds k, 2k, … (each release costs the same). The orchestrator
    pools the sites' noised sums and reports each metric with its standard error
    (``orchestrator.metric_pooling``). ``exact: true`` asks for un-noised metrics; a site
    sends those only when its own policy allows it, and the model card then says they are
    outside the guarantee.
    """

    enabled: bool = True
    noise_multiplier: float = Field(default=10.0, ge=0.01, le=1e6)
    loss_bound: float = Field(default=5.0, gt=0.0, le=1e3, description="per-example loss clip")
    exact: bool = False
    every: int | None = Field(
        default=None, ge=1, le=10_000, description="also release in every k-th round"
    )
    auc_bins: int = Field(
        default=10, ge=2, le=1000, description="score histogram bins for ROC AUC (binary labels)"
    )

    def releases_at(self, round: int, rounds: int) -> bool:
        """Whether round ``round`` (1-based) of a ``rounds``-round job releases metrics."""
        if not self.enabled:
            return False
        return round == rounds or (self.every is not None and round % self.every == 0)

    def release_count(self, rounds: int) -> int:
        """How many of a job's ``rounds`` rounds release metrics."""
        return sum(self.releases_at(r, rounds) for r in range(1, rounds + 1))


class EncodedColumnSpec(_Frozen):
    """One feature column of the encoding, as the orchestrator derived it (wire form of
    ``common.schema.encoding.EncodedFeature``)."""

    name: str = Field(min_length=1, max_length=200)
    type: Literal["numeric", "categorical"]
    nullable: bool = True
    min: float | None = None
    max: float | None = None
    categories: tuple[Annotated[str, Field(max_length=200)], ...] | None = Field(
        default=None, max_length=10_000
    )
    edges: tuple[float, ...] | None = Field(default=None, max_length=MAX_BINS + 1)


class EncodedLabelSpec(_Frozen):
    name: str = Field(min_length=1, max_length=200)
    classes: tuple[Annotated[str, Field(max_length=200)], ...] = Field(
        min_length=2, max_length=100_000
    )


class EncodingSpec(_Frozen):
    """How features are encoded (``encoding:`` in ``job.yaml``).

    The data scientist chooses ``numeric`` (``minmax``: scaling by the declared bounds;
    ``quantile``: piecewise-linear over ``bins`` bins whose edges are DP quantiles across the
    sites, released once per job through noised histograms over ``quantile_grid`` cells with
    noise multiplier ``quantile_noise_multiplier``, charged to the sites and counted in the
    job's ε). ``features`` and ``label`` are filled by the orchestrator from the sites'
    declared schemas; ``edges_released`` says the quantile edges are the DP ones.
    """

    numeric: Literal["minmax", "quantile"] = "minmax"
    bins: int = Field(default=8, ge=2, le=MAX_BINS)
    quantile_grid: int = Field(default=64, ge=8, le=4096)
    quantile_noise_multiplier: float = Field(default=10.0, ge=0.01, le=1e6)
    features: tuple[EncodedColumnSpec, ...] = Field(default=(), max_length=10_000)
    label: EncodedLabelSpec | None = None
    edges_released: bool = False

    @property
    def derived(self) -> bool:
        """The orchestrator filled in the features and the label."""
        return bool(self.features) and self.label is not None

    @property
    def quantile_release(self) -> float | None:
        """The noise multiplier of the job's one release of noised histograms for quantile
        bin edges (``site_agent.handlers.quantiles``), or None when it makes none: numeric encoding
        ``minmax``, or no numeric column to bin (every one constant)."""
        binned = not self.derived or any(f.type == "numeric" and f.edges for f in self.features)
        if self.numeric != "quantile" or not binned:
            return None
        return self.quantile_noise_multiplier

    def feature_encoding(self, *, require_edges: bool = False) -> FeatureEncoding:
        """The encoding to apply (InvalidSpecError if not derived yet or malformed, or, with
        ``require_edges``, if its quantile edges are still the uniform placeholders: they have
        the right width, so admission and policy checks can run on them before the
        orchestrator releases the DP edges ahead of round 1)."""
        if require_edges and self.numeric == "quantile" and not self.edges_released:
            raise InvalidSpecError(
                "The job's quantile bin edges have not been released yet; the orchestrator "
                "computes them before the first round."
            )
        if not self.derived:
            raise InvalidSpecError(
                "The job spec carries no feature encoding; the orchestrator derives it from the "
                "sites' declared schemas when the job is submitted."
            )
        return FeatureEncoding.from_dict(
            {
                "numeric": self.numeric,
                "features": [f.model_dump(exclude_none=True, mode="python") for f in self.features],
                "label": self.label.model_dump() if self.label is not None else None,
            }
        )


class JobSpec(_Frozen):
    """A federated DP training job (``job.yaml``)."""

    kind: Literal["train"] = "train"
    name: str | None = Field(default=None, max_length=200)
    dataset: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    model: ModelSpec
    rounds: int = Field(ge=1, le=10_000)
    local_epochs: float | None = Field(default=1.0, gt=0.0, le=1000.0)
    local_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    batch_size: int = Field(ge=1, le=1_000_000, description="expected (Poisson) batch size")
    optimizer: OptimizerSpec = OptimizerSpec()
    dp: DPSpec
    metrics: MetricsSpec = MetricsSpec()
    encoding: EncodingSpec = EncodingSpec()
    site_dp: SiteDPSpec | None = None
    aggregation: AggregationSpec = AggregationSpec()
    audit: AuditSpec | None = None
    min_sites: int = Field(default=1, ge=1, le=100_000)
    round_timeout_s: float = Field(default=600.0, gt=0.0, le=86_400.0)
    start_timeout_s: float = Field(default=120.0, gt=0.0, le=86_400.0)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)

    @model_validator(mode="before")
    @classmethod
    def _steps_xor_epochs(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("local_steps") is not None:
            data = dict(data)
            if data.get("local_epochs") is not None and "local_epochs" in data:
                raise ValueError("set only one of local_epochs and local_steps")
            data["local_epochs"] = None
        return data

    @model_validator(mode="after")
    def _sgld_fits_rounds(self) -> JobSpec:
        opt = self.optimizer
        if opt.name == "sgld" and opt.burn_in + opt.samples > self.rounds:
            raise ValueError(
                f"optimizer sgld keeps {opt.samples} sample(s) after {opt.burn_in} burn-in "
                f"round(s), which needs at least {opt.burn_in + opt.samples} rounds, not "
                f"{self.rounds}"
            )
        if opt.name == "sgld" and opt.momentum != 0.0:
            raise ValueError("optimizer sgld takes no momentum (Langevin steps are plain SGD)")
        return self

    @model_validator(mode="after")
    def _aggregation_fits_site_dp(self) -> JobSpec:
        if self.site_dp is not None and self.aggregation.method != "fedavg":
            raise ValueError(
                f"aggregation.method {self.aggregation.method!r} cannot be combined with "
                "site_dp, whose noise is calibrated to a clipped uniform average (fedavg)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _dims_from_encoding(cls, data: Any) -> Any:
        """Fill ``model.input_dim``/``num_classes`` from a derived encoding; an explicit value
        that differs is an error naming both."""
        if not isinstance(data, dict) or "encoding" not in data or "model" not in data:
            return data
        try:
            enc = EncodingSpec.model_validate(data["encoding"])
            encoding = enc.feature_encoding(require_edges=False) if enc.derived else None
        except (ValidationError, InvalidSpecError):
            return data  # reported by the field's own validation (or the encoding's use)
        if encoding is None:
            return data
        model = data["model"]
        model = dict(model.model_dump() if isinstance(model, BaseModel) else model)
        for key, derived in (("input_dim", encoding.width), ("num_classes", encoding.num_classes)):
            given = model.get(key)
            if given is None:
                model[key] = derived
            elif given != derived:
                raise ValueError(
                    f"model.{key}={given} but the encoding derived from the sites' declared "
                    f"schemas gives {key}={derived}; leave model.{key} out to use the derived one"
                )
        return {**data, "model": model}

    def feature_encoding(self) -> FeatureEncoding:
        """The job's feature encoding (InvalidSpecError until the orchestrator derived it)."""
        return self.encoding.feature_encoding()


class GmmDPSpec(_Frozen):
    """DP for a mixture job: one σ for every statistic release (or a target ε to calibrate)."""

    noise_multiplier: float | None = Field(default=None, ge=0.01, le=1000.0)
    target_epsilon: float | None = Field(default=None, gt=0.0, le=1000.0)
    delta: float = Field(default=1e-5, gt=0.0, lt=0.01)

    @model_validator(mode="after")
    def _one_of(self) -> GmmDPSpec:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of dp.noise_multiplier and dp.target_epsilon")
        return self


class GmmBootstrapSpec(_Frozen):
    """Optional standard errors of the fitted mixture by a DP Poisson bootstrap.

    After the final model is fitted, every site releases ``replicates`` Poisson(1)-reweighted
    copies of its E-step statistics under that model (weights capped at ``weight_cap``),
    noised by the Gaussian mechanism; the orchestrator runs one M-step per replicate and
    reports the standard deviation over replicates (docs/clustering.md, "DP Poisson bootstrap").
    The release is one more Gaussian mechanism on every site's ledger and in the job's ε.
    ``noise_multiplier`` is set like ``dp.noise_multiplier``; left unset it is the job's σ
    (with ``dp.target_epsilon``, σ is calibrated with this release counted).
    """

    replicates: int = Field(
        default=20,
        ge=5,
        le=200,
        description="more replicates make the standard errors steadier but each one noisier",
    )
    weight_cap: int = Field(default=4, ge=2, le=20, description="cap on a row's Poisson weight")
    noise_multiplier: float | None = Field(default=None, ge=0.01, le=1000.0)


class GmmJobSpec(_Frozen):
    """Federated model-based clustering (``kind: gmm``): DP federated EM of a Gaussian
    mixture over the sites' declared numeric columns, K fixed or chosen by distributed BIC."""

    kind: Literal["gmm"]
    name: str | None = Field(default=None, max_length=200)
    dataset: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    columns: tuple[str, ...] | None = Field(default=None, min_length=1, max_length=64)
    k: int | None = Field(default=None, ge=1, le=50)
    k_range: tuple[int, int] | None = Field(default=None, description="[min, max] for BIC")
    covariance_type: Literal["full", "diag"] = "full"
    method: Literal["federated_em", "one_shot"] = Field(
        default="federated_em",
        description="one_shot: each site fits its own DP mixture, the orchestrator merges them",
    )
    max_rounds: int = Field(default=20, ge=1, le=500)
    tol: float = Field(default=1e-3, gt=0.0, le=1.0)
    dp: GmmDPSpec
    bootstrap: GmmBootstrapSpec | None = Field(
        default=None, description="standard errors by a DP Poisson bootstrap (one more release)"
    )
    min_sites: int = Field(default=1, ge=1, le=100_000)
    round_timeout_s: float = Field(default=600.0, gt=0.0, le=86_400.0)
    start_timeout_s: float = Field(default=120.0, gt=0.0, le=86_400.0)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _k(self) -> GmmJobSpec:
        if (self.k is None) == (self.k_range is None):
            raise ValueError("set exactly one of k and k_range")
        if self.method == "one_shot" and self.k is None:
            raise ValueError("method one_shot needs a fixed k (BIC runs with federated_em)")
        if self.k_range is not None:
            lo, hi = self.k_range
            if not 1 <= lo < hi <= 50:
                raise ValueError("k_range must be [min, max] with 1 <= min < max <= 50")
        return self

    @property
    def k_values(self) -> list[int]:
        if self.k is not None:
            return [self.k]
        assert self.k_range is not None
        return list(range(self.k_range[0], self.k_range[1] + 1))


AnyJobSpec = JobSpec | GmmJobSpec


def parse_any_job_spec(data: Any, *, source: str = "job spec") -> AnyJobSpec:
    """A training job (``kind: train``, the default) or a mixture job (``kind: gmm``)."""
    if isinstance(data, dict) and data.get("kind") == "gmm":
        try:
            return GmmJobSpec.model_validate(data)
        except ValidationError as err:
            raise InvalidSpecError(format_validation_error(err, source=source)) from None
    return parse_job_spec(data, source=source)


def any_job_spec_from_json(text: str) -> AnyJobSpec:
    import json

    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidSpecError("invalid job spec: not valid JSON (or nested too deeply)") from None
    return parse_any_job_spec(data)


def format_validation_error(err: ValidationError, *, source: str) -> str:
    """One line per bad field, naming it by its dotted path (``dp.delta: ...``)."""
    lines = [f"invalid {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"  {loc or '<root>'}: {e['msg']}")
    return "\n".join(lines)


def parse_job_spec(data: Any, *, source: str = "job spec") -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise InvalidSpecError(format_validation_error(err, source=source)) from None


def job_spec_from_json(text: str) -> JobSpec:
    try:
        return JobSpec.model_validate_json(text)
    except ValidationError as err:
        raise InvalidSpecError(format_validation_error(err, source="job spec")) from None


def _read_spec_file(path: str | Path) -> tuple[dict[str, Any], str]:
    """(the YAML mapping in ``path``, how to name it in errors); InvalidSpecError if the file is
    missing, not YAML or not a mapping."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise InvalidSpecError(f"job spec file not found: {p}") from None
    except yaml.YAMLError as err:
        raise InvalidSpecError(f"job spec {p} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise InvalidSpecError(f"job spec {p} must be a YAML mapping, got {type(raw).__name__}")
    return raw, f"job spec {p}"


def load_job_spec(path: str | Path) -> JobSpec:
    """The training job spec in the YAML file ``path``; raises InvalidSpecError."""
    raw, source = _read_spec_file(path)
    return parse_job_spec(raw, source=source)


def load_any_job_spec(path: str | Path) -> AnyJobSpec:
    """``load_job_spec`` for any kind of job (train or gmm)."""
    raw, source = _read_spec_file(path)
    return parse_any_job_spec(raw, source=source)
