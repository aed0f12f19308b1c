"""Plain domain types exchanged between the orchestrator, the agents and the CLI.

These are what the core works with. ``common.rpc.serde`` is the only place that turns them into
protobuf messages and back; nothing else imports the generated code except the transport.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from common.dp.events import DpEvent


@dataclass(frozen=True)
class ColumnInfo:
    """A column's declared type and bounds (from the site config, never from the data)."""

    name: str
    type: str = "numeric"
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] = ()
    nullable: bool = True
    """Cells may be missing; the encoding adds a missing indicator for a nullable numeric column."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a site discloses about one dataset: schema, size and its privacy spend."""

    name: str
    num_rows: int
    columns: tuple[str, ...]
    label: str
    epsilon_spent: float = 0.0
    max_epsilon: float = 0.0
    policy_delta: float = 0.0
    num_validation_rows: int = 0
    dp_num_rows: float = 0.0
    schema: tuple[ColumnInfo, ...] = ()
    source: str = "csv"
    label_schema: ColumnInfo | None = None
    """The label's declared classes (categorical, in order); None when the site declared none."""


@dataclass(frozen=True)
class PolicySummary:
    """The part of a site's policy it shares so that jobs can be planned against it."""

    max_epsilon: float
    delta: float
    min_noise_multiplier: float
    max_rounds: int
    allowed_models: tuple[str, ...]
    allow_exact_metrics: bool
    max_steps_per_task: int
    max_parameters: int
    secure_noise: bool = False
    """The site draws every DP noise value from a CSPRNG (``common.dp.noise``)."""


@dataclass(frozen=True)
class SiteRegistration:
    site_id: str
    agent_version: str
    datasets: tuple[DatasetInfo, ...]
    policy: PolicySummary


@dataclass(frozen=True)
class TaskAssignment:
    """One round of one job for one site. The spec is data, never code."""

    task_id: str
    job_id: str
    round: int
    rounds: int
    job_spec_json: str
    dataset: str
    noise_multiplier: float
    model_size: int
    model_sha256: str
    deadline_unix: float
    kind: str = "train"
    request_json: str = ""


@dataclass(frozen=True)
class ChargedEvent:
    """A DP event as charged to a site's ledger, with what it paid for."""

    kind: str  # "train" | "metrics"
    event: DpEvent


@dataclass(frozen=True)
class DpReport:
    events: tuple[ChargedEvent, ...]
    max_grad_norm: float
    delta: float
    task_epsilon: float
    job_epsilon: float
    dataset_epsilon: float
    policy_delta: float
    accountant: str
    grad_sample_mode: str = ""

    @property
    def train_event(self) -> DpEvent | None:
        return next((e.event for e in self.events if e.kind == "train"), None)


@dataclass(frozen=True)
class Metrics:
    """Validation metrics a site releases: noised (Gaussian mechanism) unless ``exact``.

    The sums are what the orchestrator pools (``orchestrator.metric_pooling``); ``loss`` and
    ``accuracy`` are the site's own ratios, for display only. Noised metrics carry
    ``num_examples = 0`` (the row count is released only as the noised ``count_sum``).
    """

    loss: float
    accuracy: float
    correct_sum: float
    loss_sum: float
    num_examples: int
    noise_multiplier: float | None
    count_sum: float
    """Number of rows evaluated: noised, or exact when ``exact``."""
    exact: bool = False
    score_histogram: tuple[float, ...] = ()
    """Binary labels only: noised counts of the model's P(class 1) in ``H`` equal bins of
    [0, 1], first the ``H`` bins of the rows labelled 0, then those of the rows labelled 1."""


@dataclass(frozen=True)
class Estimate:
    """A released statistic and its standard error from the DP noise (0: exact; ``inf``:
    undefined, e.g. a noised row count at or below zero)."""

    value: float
    se: float


@dataclass(frozen=True)
class PooledMetrics:
    """Validation metrics pooled over sites from their noised sums (``metric_pooling``)."""

    accuracy: Estimate
    loss: Estimate
    num_examples: Estimate
    """The pooled noised row count."""
    auc: Estimate | None
    """ROC AUC from the pooled score histograms (binary labels only)."""
    sites: int
    exact: bool
    noise_multiplier: float
    """σ of each site's release (0 when exact)."""


@dataclass(frozen=True)
class UpdateMeta:
    site_id: str
    task_id: str
    num_examples: int
    dp_report: DpReport
    metrics: Metrics | None
    total_size: int
    sha256: str
    result_json: str = ""


@dataclass(frozen=True)
class TaskFailure:
    site_id: str
    task_id: str
    code: str
    reason: str


@dataclass(frozen=True)
class RoundSummary:
    round: int
    site_ids: tuple[str, ...]
    loss: float = math.nan
    accuracy: float = math.nan
    num_examples: int = 0
    duration_s: float = 0.0
    epsilon: float = 0.0
    metrics: PooledMetrics | None = None
    """The round's pooled validation metrics with standard errors (None: none released)."""


@dataclass(frozen=True)
class JobEvent:
    time: float
    level: str
    site_id: str
    message: str


@dataclass(frozen=True)
class SiteSpend:
    site_id: str
    num_examples: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    epsilon: float
    dataset_epsilon: float
    events: tuple[ChargedEvent, ...] = ()


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    name: str
    dataset: str
    state: str
    round: int
    rounds: int
    epsilon: float
    delta: float
    accountant: str
    error: str
    history: tuple[RoundSummary, ...]
    sites: tuple[SiteSpend, ...]
    events: tuple[JobEvent, ...]
    created_at: float
    updated_at: float
    job_spec_json: str
    model_released: bool

    @property
    def terminal(self) -> bool:
        return self.state in ("completed", "failed")


@dataclass(frozen=True)
class SiteStatus:
    site_id: str
    datasets: tuple[DatasetInfo, ...]
    last_seen: float
    version: str
    state: str
    policy: PolicySummary | None


@dataclass(frozen=True)
class SitePlan:
    site_id: str
    num_examples: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    projected_epsilon: float
    dataset_epsilon_before: float
    dataset_epsilon_after: float
    max_epsilon: float
    would_refuse: bool
    reason: str = ""


@dataclass(frozen=True)
class Plan:
    sites: tuple[SitePlan, ...]
    epsilon: float
    delta: float
    accountant: str
    feasible: bool
    message: str = ""


@dataclass(frozen=True)
class LedgerRow:
    site_id: str
    dataset: str
    job_id: str
    epsilon: float
    delta: float
    rounds: int
    events: tuple[ChargedEvent, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class SiteEvaluation:
    site_id: str
    metrics: Metrics | None
    epsilon: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class Evaluation:
    """A released model evaluated on the sites' data: pooled noised sums, per-site costs."""

    sites: tuple[SiteEvaluation, ...]
    loss: float
    accuracy: float
    num_examples: int
    epsilon: float
    delta: float
    metrics: PooledMetrics | None = None
    """Pooled estimates with standard errors (and AUC for binary labels)."""
