"""``common.rpc.serde``: every domain type survives the wire, and the wire cannot smuggle garbage in.

Round trips go domain → proto → *bytes* → proto → domain, so they also cover what the
protobuf encoding itself does (int32/int64 ranges, doubles, repeated fields, unset messages).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import pytest
from google.protobuf.message import Message

from common.domain import (
    ChargedEvent,
    ColumnInfo,
    DatasetInfo,
    DpReport,
    Estimate,
    Evaluation,
    JobEvent,
    JobStatus,
    LedgerRow,
    Metrics,
    Plan,
    PolicySummary,
    PooledMetrics,
    RoundSummary,
    SiteEvaluation,
    SitePlan,
    SiteRegistration,
    SiteSpend,
    SiteStatus,
    TaskAssignment,
    TaskFailure,
    UpdateMeta,
)
from common.dp.events import DpEvent
from common.errors import InvalidSpecError
from common.rpc import serde
from protos.dpfed.v1.dpfed_pb2 import Chunk as ProtoChunk
from protos.dpfed.v1.dpfed_pb2 import DatasetInfo as ProtoDatasetInfo
from protos.dpfed.v1.dpfed_pb2 import DpEvent as ProtoDpEvent
from protos.dpfed.v1.dpfed_pb2 import DpReport as ProtoDpReport
from protos.dpfed.v1.dpfed_pb2 import Metrics as ProtoMetrics
from protos.dpfed.v1.dpfed_pb2 import PolicySummary as ProtoPolicySummary
from protos.dpfed.v1.dpfed_pb2 import RegisterRequest as ProtoRegisterRequest
from protos.dpfed.v1.dpfed_pb2 import Task as ProtoTask
from protos.dpfed.v1.dpfed_pb2 import UpdateChunk as ProtoUpdateChunk
from protos.dpfed.v1.dpfed_pb2 import UpdateHeader as ProtoUpdateHeader

T = TypeVar("T")
M = TypeVar("M", bound=Message)
MiB = 1 << 20
CHUNK_OVERHEAD = 64  # tags + varints of offset/total_size/length, generously

# ------------------------------------------------------------------ realistic instances

TRAIN = ChargedEvent(kind="train", event=DpEvent(noise_multiplier=1.1, sample_rate=0.032, steps=32))
METRICS = ChargedEvent(
    kind="metrics", event=DpEvent(noise_multiplier=20.0, sample_rate=1.0, steps=1)
)

CREDIT = DatasetInfo(
    name="credit",
    num_rows=24_000,
    columns=("limit_bal", "sex", "education", "age", "pay_0"),
    label="default",
    epsilon_spent=1.25,
    max_epsilon=10.0,
    policy_delta=1e-5,
    num_validation_rows=2_400,
)
LOANS = DatasetInfo(name="loans", num_rows=3, columns=(), label="y")

POLICY = PolicySummary(
    max_epsilon=10.0,
    delta=1e-5,
    min_noise_multiplier=0.5,
    max_rounds=1000,
    allowed_models=("linear", "mlp"),
    allow_exact_metrics=False,
    max_steps_per_task=100_000,
    max_parameters=100_000_000,
    secure_noise=True,
)

REGISTRATION = SiteRegistration(
    site_id="bank-a", agent_version="0.1.0", datasets=(CREDIT, LOANS), policy=POLICY
)

TASK = TaskAssignment(
    task_id="9f1c2e",
    job_id="job-42",
    round=3,
    rounds=5,
    job_spec_json='{"dataset": "credit", "rounds": 5}',
    dataset="credit",
    noise_multiplier=1.1,
    model_size=2_345_678,
    model_sha256="ab" * 32,
    deadline_unix=1_764_000_000.5,
)

DP_REPORT = DpReport(
    events=(TRAIN, METRICS),
    max_grad_norm=1.0,
    delta=1e-5,
    task_epsilon=0.61,
    job_epsilon=1.37,
    dataset_epsilon=2.9,
    policy_delta=1e-5,
    accountant="prv",
    grad_sample_mode="hooks",
)

NOISED_METRICS = Metrics(
    loss=0.52,
    accuracy=0.81,
    correct_sum=1944.3,
    loss_sum=1248.1,
    num_examples=2400,
    noise_multiplier=20.0,
    count_sum=2403.7,
)
POOLING_METRICS = Metrics(
    loss=0.4,
    accuracy=0.7,
    correct_sum=90.5,
    loss_sum=51.0,
    num_examples=0,
    noise_multiplier=5.0,
    count_sum=128.25,
    score_histogram=(3.5, -1.25, 40.0, 0.0, 2.0, 7.75),
)
POOLED = PooledMetrics(
    accuracy=Estimate(0.81, 0.03),
    loss=Estimate(0.44, 0.05),
    num_examples=Estimate(1203.5, 17.3),
    auc=Estimate(0.88, 0.02),
    sites=3,
    exact=False,
    noise_multiplier=5.0,
)
EXACT_METRICS = Metrics(
    loss=0.5,
    accuracy=0.75,
    correct_sum=3.0,
    loss_sum=2.0,
    num_examples=4,
    noise_multiplier=None,
    count_sum=4.0,
    exact=True,
)

UPDATE = UpdateMeta(
    site_id="bank-a",
    task_id="9f1c2e",
    num_examples=24_000,
    dp_report=DP_REPORT,
    metrics=NOISED_METRICS,
    total_size=2_345_678,
    sha256="cd" * 32,
)

FAILURE = TaskFailure(
    site_id="bank-a",
    task_id="9f1c2e",
    code="FAILED_PRECONDITION",
    reason="projected lifetime ε 10.4 would pass the site's budget 10",
)

ROUND = RoundSummary(
    round=2,
    site_ids=("bank-a", "bank-b"),
    loss=0.6,
    accuracy=0.7,
    num_examples=48_000,
    duration_s=12.5,
    epsilon=1.9,
)

SPEND = SiteSpend(
    site_id="bank-a",
    num_examples=24_000,
    noise_multiplier=1.1,
    sample_rate=0.032,
    steps=64,
    max_grad_norm=1.0,
    epsilon=1.37,
    dataset_epsilon=2.9,
    events=(TRAIN, METRICS),
)

JOB = JobStatus(
    job_id="job-42",
    name="credit-default",
    dataset="credit",
    state="running",
    round=2,
    rounds=5,
    epsilon=1.9,
    delta=1e-5,
    accountant="prv",
    error="",
    history=(RoundSummary(round=1, site_ids=("bank-a",), loss=0.9, accuracy=0.5), ROUND),
    sites=(SPEND, SiteSpend("bank-b", 100, 2.0, 0.64, 4, 0.5, 3.0, 3.5)),
    events=(
        JobEvent(time=1_764_000_000.0, level="info", site_id="", message="job submitted"),
        JobEvent(time=1_764_000_010.0, level="warning", site_id="bank-c", message="refused: σ"),
    ),
    created_at=1_764_000_000.0,
    updated_at=1_764_000_123.25,
    job_spec_json='{"dataset": "credit"}',
    model_released=False,
)

SITE_STATUS = SiteStatus(
    site_id="bank-a",
    datasets=(CREDIT,),
    last_seen=1_764_000_100.0,
    version="0.1.0",
    state="training",
    policy=POLICY,
)

PLAN = Plan(
    sites=(
        SitePlan("bank-a", 24_000, 1.1, 0.032, 160, 1.9, 1.25, 3.2, 10.0, False),
        SitePlan("bank-b", 500, 0.0, 0.0, 0, math.inf, 9.5, math.inf, 10.0, True, "over budget"),
    ),
    epsilon=1.9,
    delta=1e-5,
    accountant="prv",
    feasible=False,
    message="1 site(s) would take the job; it needs min_sites=2",
)

LEDGER = LedgerRow(
    site_id="bank-a",
    dataset="credit",
    job_id="job-42",
    epsilon=1.37,
    delta=1e-5,
    rounds=2,
    events=(TRAIN, METRICS),
)


def through_bytes(msg: M) -> M:
    """Serialise and parse again, as the wire does."""
    out = type(msg)()
    out.ParseFromString(msg.SerializeToString())
    return out


PAIRS: list[tuple[str, Any, Callable[[Any], Message], Callable[[Any], Any]]] = [
    ("train event", TRAIN, serde.dp_event_to_proto, serde.dp_event_from_proto),
    ("metrics event", METRICS, serde.dp_event_to_proto, serde.dp_event_from_proto),
    ("dataset", CREDIT, serde.dataset_info_to_proto, serde.dataset_info_from_proto),
    ("bare dataset", LOANS, serde.dataset_info_to_proto, serde.dataset_info_from_proto),
    (
        "dataset with schema",
        DatasetInfo(
            name="cat",
            num_rows=10,
            columns=("age", "segment"),
            label="y",
            dp_num_rows=11.0,
            schema=(
                ColumnInfo(name="age", min=18.0, max=100.0),
                ColumnInfo(name="segment", type="categorical", categories=("a", "b")),
            ),
            source="parquet",
            label_schema=ColumnInfo(
                name="y", type="categorical", categories=("good", "bad"), nullable=False
            ),
        ),
        serde.dataset_info_to_proto,
        serde.dataset_info_from_proto,
    ),
    (
        "bounded column",
        ColumnInfo(name="x", min=-1.0, max=1.0),
        serde.column_info_to_proto,
        serde.column_info_from_proto,
    ),
    ("free column", ColumnInfo(name="x"), serde.column_info_to_proto, serde.column_info_from_proto),
    (
        "non-nullable column",
        ColumnInfo(name="x", min=0.0, max=1.0, nullable=False),
        serde.column_info_to_proto,
        serde.column_info_from_proto,
    ),
    (
        "evaluation",
        Evaluation(
            sites=(
                SiteEvaluation("a", NOISED_METRICS, epsilon=0.3),
                SiteEvaluation("b", None, error="FAILED_PRECONDITION: refused"),
            ),
            loss=0.5,
            accuracy=0.8,
            num_examples=100,
            epsilon=0.3,
            delta=1e-5,
        ),
        serde.evaluation_to_proto,
        serde.evaluation_from_proto,
    ),
    ("policy", POLICY, serde.policy_to_proto, serde.policy_from_proto),
    ("registration", REGISTRATION, serde.registration_to_proto, serde.registration_from_proto),
    ("task", TASK, serde.task_to_proto, serde.task_from_proto),
    ("dp report", DP_REPORT, serde.dp_report_to_proto, serde.dp_report_from_proto),
    ("noised metrics", NOISED_METRICS, serde.metrics_to_proto, serde.metrics_from_proto),
    ("exact metrics", EXACT_METRICS, serde.metrics_to_proto, serde.metrics_from_proto),
    (
        "metrics with count and histogram",
        POOLING_METRICS,
        serde.metrics_to_proto,
        serde.metrics_from_proto,
    ),
    ("estimate", Estimate(0.5, math.inf), serde.estimate_to_proto, serde.estimate_from_proto),
    ("pooled metrics", POOLED, serde.pooled_metrics_to_proto, serde.pooled_metrics_from_proto),
    (
        "pooled metrics without auc",
        replace(POOLED, auc=None, exact=True, noise_multiplier=0.0),
        serde.pooled_metrics_to_proto,
        serde.pooled_metrics_from_proto,
    ),
    (
        "round with pooled metrics",
        replace(ROUND, metrics=POOLED),
        serde.round_to_proto,
        serde.round_from_proto,
    ),
    (
        "evaluation with pooled metrics",
        Evaluation(
            sites=(SiteEvaluation("a", POOLING_METRICS, epsilon=0.3),),
            loss=0.4,
            accuracy=0.7,
            num_examples=0,
            epsilon=0.3,
            delta=1e-5,
            metrics=POOLED,
        ),
        serde.evaluation_to_proto,
        serde.evaluation_from_proto,
    ),
    ("update", UPDATE, serde.update_meta_to_proto, serde.update_meta_from_proto),
    (
        "update without metrics",
        replace(UPDATE, metrics=None),
        serde.update_meta_to_proto,
        serde.update_meta_from_proto,
    ),
    ("failure", FAILURE, serde.failure_to_proto, serde.failure_from_proto),
    ("round", ROUND, serde.round_to_proto, serde.round_from_proto),
    ("site spend", SPEND, serde.site_spend_to_proto, serde.site_spend_from_proto),
    ("job status", JOB, serde.job_status_to_proto, serde.job_status_from_proto),
    ("site status", SITE_STATUS, serde.site_status_to_proto, serde.site_status_from_proto),
    (
        "site status without policy",
        replace(SITE_STATUS, policy=None),
        serde.site_status_to_proto,
        serde.site_status_from_proto,
    ),
    ("plan", PLAN, serde.plan_to_proto, serde.plan_from_proto),
    ("ledger row", LEDGER, serde.ledger_row_to_proto, serde.ledger_row_from_proto),
]


@pytest.mark.parametrize(
    ("value", "to_proto", "from_proto"), [p[1:] for p in PAIRS], ids=[p[0] for p in PAIRS]
)
def test_round_trip(
    value: T, to_proto: Callable[[T], Message], from_proto: Callable[[Message], T]
) -> None:
    back = from_proto(through_bytes(to_proto(value)))
    assert back == value
    assert type(back) is type(value)


def test_every_serde_pair_is_covered() -> None:
    """A new ``x_to_proto`` without a round-trip case above fails here."""
    covered = {p[2].__name__ for p in PAIRS}
    defined = {n for n in dir(serde) if n.endswith("_to_proto")}
    assert defined - covered == set()
    for name in defined:
        assert hasattr(serde, name.replace("_to_proto", "_from_proto")), name


def test_round_trip_keeps_nan_metrics_of_a_round() -> None:
    # A round without metrics reports NaN loss/accuracy; NaN != NaN, so check it by hand.
    r = RoundSummary(round=1, site_ids=("bank-a",))
    back = serde.round_from_proto(through_bytes(serde.round_to_proto(r)))
    assert math.isnan(back.loss) and math.isnan(back.accuracy)
    assert (back.round, back.site_ids, back.num_examples) == (1, ("bank-a",), 0)


def test_train_event_of_the_report_survives() -> None:
    back = serde.dp_report_from_proto(through_bytes(serde.dp_report_to_proto(DP_REPORT)))
    assert back.train_event == TRAIN.event


# ------------------------------------------------------------------ chunks


def chunks_of(data: bytes, chunk_size: int) -> list[ProtoChunk]:
    return [through_bytes(c) for c in serde.blob_to_chunks(data, chunk_size=chunk_size)]


@pytest.mark.parametrize(
    ("size", "chunk_size", "n_chunks"),
    [(0, 4, 1), (1, 4, 1), (4, 4, 1), (5, 4, 2), (13, 4, 4), (1000, 7, 143)],
)
def test_blob_round_trip(size: int, chunk_size: int, n_chunks: int) -> None:
    data = bytes((i * 31 + 7) % 256 for i in range(size))
    chunks = chunks_of(data, chunk_size)
    assert len(chunks) == n_chunks
    assert all(len(c.data) <= chunk_size for c in chunks)
    assert all(c.total_size == size for c in chunks)
    assert serde.blob_from_chunks(chunks) == data
    assert serde.blob_from_chunks(iter(chunks), expected_size=size) == data


def test_default_chunks_stay_small_on_the_wire() -> None:
    chunk = serde.CHUNK_SIZE
    assert chunk <= 128 << 10  # well under the orchestrator's malloc mmap threshold
    data = bytes(range(256)) * ((5 * chunk + 12345) // 256)
    chunks = list(serde.blob_to_chunks(data))
    assert len(chunks) == 6
    for c in chunks:
        assert c.ByteSize() <= chunk + CHUNK_OVERHEAD
        # As sent in a push stream, wrapped in its oneof.
        assert ProtoUpdateChunk(chunk=c).ByteSize() <= chunk + CHUNK_OVERHEAD
    assert serde.blob_from_chunks(chunks) == data


def test_streams_of_older_agents_with_1_mib_chunks_still_assemble() -> None:
    data = bytes(range(256)) * ((3 * MiB + 999) // 256)
    chunks = list(serde.blob_to_chunks(data, chunk_size=MiB))
    assert len(chunks) == 4
    assert serde.blob_from_chunks(iter(chunks), expected_size=len(data)) == data


@pytest.mark.parametrize("expected", [True, False])
def test_receiving_a_blob_makes_no_second_full_copy(expected: bool) -> None:
    """Peak memory while assembling is the blob plus about one chunk, not twice the blob."""
    import tracemalloc

    size = 24 * MiB + 777
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    chunks = [through_bytes(c) for c in serde.blob_to_chunks(data)]

    tracemalloc.start()
    try:
        out = serde.blob_from_chunks(iter(chunks), expected_size=size if expected else None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert type(out) is bytes
    assert out == data
    assert peak <= size + 4 * serde.CHUNK_SIZE, f"peak {peak / size:.2f}x the blob"


def _blob_chunks() -> list[ProtoChunk]:
    return chunks_of(b"0123456789abcdef", 4)  # offsets 0, 4, 8, 12; total 16


@pytest.mark.parametrize(
    ("name", "edit", "match"),
    [
        ("gap", lambda cs: [cs[0], cs[2], cs[3]], "offset"),
        (
            "overlap",
            lambda cs: [
                cs[0],
                cs[1],
                ProtoChunk(data=b"XXXX", offset=6, total_size=16),
                cs[2],
                cs[3],
            ],
            "offset",
        ),
        ("repeat", lambda cs: [cs[0], cs[1], cs[1], cs[2], cs[3]], "offset"),
        ("reordered", lambda cs: [cs[1], cs[0], cs[2], cs[3]], "offset"),
        ("truncated", lambda cs: cs[:3], "ended after 12 of 16"),
        ("no chunks after header", lambda cs: [], None),
        (
            "changing total",
            lambda cs: [cs[0], ProtoChunk(data=cs[1].data, offset=4, total_size=20), cs[2], cs[3]],
            "total size",
        ),
        (
            "longer than announced",
            lambda cs: [*cs, ProtoChunk(data=b"!", offset=16, total_size=16)],
            "larger",
        ),
        (
            "oversized chunk",
            lambda cs: [ProtoChunk(data=b"x" * 17, offset=0, total_size=16)],
            "larger",
        ),
        ("negative total", lambda cs: [ProtoChunk(data=b"", offset=0, total_size=-1)], None),
    ],
)
def test_blob_from_chunks_rejects_bad_streams(name: str, edit: Any, match: str | None) -> None:
    bad = edit(_blob_chunks())
    with pytest.raises(InvalidSpecError, match=match):
        serde.blob_from_chunks(bad, expected_size=16 if name == "no chunks after header" else None)


def test_blob_from_chunks_checks_the_size_announced_in_the_header() -> None:
    chunks = _blob_chunks()
    with pytest.raises(InvalidSpecError):
        serde.blob_from_chunks(chunks, expected_size=15)
    with pytest.raises(InvalidSpecError):
        serde.blob_from_chunks(chunks, expected_size=17)
    assert serde.blob_from_chunks(chunks, expected_size=16) == b"0123456789abcdef"


def test_blob_from_chunks_refuses_more_than_the_cap() -> None:
    huge = serde.MAX_BLOB_SIZE + 1
    with pytest.raises(InvalidSpecError):
        serde.blob_from_chunks([ProtoChunk(data=b"x", offset=0, total_size=huge)])


# ------------------------------------------------------------------ values from the wire

NON_FINITE = [math.nan, math.inf, -math.inf]


def _event(**kw: Any) -> ProtoDpEvent:
    base = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "kind": "train"}
    return ProtoDpEvent(**{**base, **kw})


@pytest.mark.parametrize(
    "fields",
    [
        {"noise_multiplier": 0.0},
        {"noise_multiplier": -1.0},
        {"noise_multiplier": math.nan},
        {"noise_multiplier": math.inf},
        {"sample_rate": 0.0},
        {"sample_rate": 1.5},
        {"sample_rate": -0.1},
        {"sample_rate": math.nan},
        {"steps": 0},
        {"steps": -5},
        {"kind": "gradient"},
        {"kind": ""},
    ],
    ids=repr,
)
def test_bad_dp_events_are_rejected(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidSpecError):
        serde.dp_event_from_proto(_event(**fields))


def test_a_bad_event_inside_an_update_header_is_rejected() -> None:
    msg = serde.update_meta_to_proto(UPDATE)
    msg.dp_report.events.append(_event(sample_rate=2.0))
    with pytest.raises(InvalidSpecError):
        serde.update_meta_from_proto(through_bytes(msg))


@pytest.mark.parametrize("x", NON_FINITE, ids=repr)
@pytest.mark.parametrize(
    "field",
    ["max_grad_norm", "delta", "task_epsilon", "job_epsilon", "dataset_epsilon", "policy_delta"],
)
def test_non_finite_dp_report_is_rejected(field: str, x: float) -> None:
    msg = serde.dp_report_to_proto(DP_REPORT)
    setattr(msg, field, x)
    with pytest.raises(InvalidSpecError, match=field):
        serde.dp_report_from_proto(msg)


@pytest.mark.parametrize("x", NON_FINITE, ids=repr)
@pytest.mark.parametrize("field", ["loss", "accuracy", "correct_sum", "loss_sum"])
def test_non_finite_metrics_are_rejected(field: str, x: float) -> None:
    header = serde.update_meta_to_proto(UPDATE)
    setattr(header.metrics, field, x)
    with pytest.raises(InvalidSpecError, match=field):
        serde.update_meta_from_proto(header)
    with pytest.raises(InvalidSpecError, match=field):
        serde.metrics_from_proto(header.metrics)


@pytest.mark.parametrize("x", NON_FINITE, ids=repr)
def test_non_finite_count_and_histogram_are_rejected(x: float) -> None:
    msg = serde.metrics_to_proto(POOLING_METRICS)
    msg.count_sum = x
    with pytest.raises(InvalidSpecError, match="count_sum"):
        serde.metrics_from_proto(msg)
    msg = serde.metrics_to_proto(POOLING_METRICS)
    msg.score_histogram[2] = x
    with pytest.raises(InvalidSpecError, match="score_histogram"):
        serde.metrics_from_proto(msg)


def test_an_overlong_histogram_is_rejected() -> None:
    msg = serde.metrics_to_proto(POOLING_METRICS)
    msg.score_histogram.extend([0.0] * serde.MAX_HISTOGRAM)
    with pytest.raises(InvalidSpecError, match="more than"):
        serde.metrics_from_proto(msg)


@pytest.mark.parametrize("x", NON_FINITE, ids=repr)
@pytest.mark.parametrize("field", ["epsilon_spent", "max_epsilon", "policy_delta"])
def test_non_finite_dataset_info_is_rejected(field: str, x: float) -> None:
    msg = serde.dataset_info_to_proto(CREDIT)
    setattr(msg, field, x)
    with pytest.raises(InvalidSpecError, match=field):
        serde.dataset_info_from_proto(msg)
    reg = serde.registration_to_proto(REGISTRATION)
    reg.datasets[0].CopyFrom(msg)
    with pytest.raises(InvalidSpecError, match=field):
        serde.registration_from_proto(reg)


@pytest.mark.parametrize("x", NON_FINITE, ids=repr)
def test_non_finite_task_noise_multiplier_is_rejected(x: float) -> None:
    msg = serde.task_to_proto(TASK)
    msg.noise_multiplier = x
    with pytest.raises(InvalidSpecError, match="noise_multiplier"):
        serde.task_from_proto(msg)


@pytest.mark.parametrize("x", NON_FINITE, ids=repr)
@pytest.mark.parametrize("field", ["max_epsilon", "delta", "min_noise_multiplier"])
def test_non_finite_policy_summary_is_rejected(field: str, x: float) -> None:
    msg = serde.policy_to_proto(POLICY)
    setattr(msg, field, x)
    reg = ProtoRegisterRequest(site_id="bank-a", agent_version="0.1.0", policy=msg)
    with pytest.raises(InvalidSpecError, match=field):
        serde.registration_from_proto(reg)


@pytest.mark.parametrize("field", ["num_rows", "num_validation_rows"])
def test_negative_row_counts_are_rejected(field: str) -> None:
    msg = ProtoDatasetInfo(name="credit", num_rows=10, label="y")
    setattr(msg, field, -1)
    with pytest.raises(InvalidSpecError, match="negative"):
        serde.dataset_info_from_proto(msg)


@pytest.mark.parametrize("n", [0, -3])
def test_update_header_needs_positive_num_examples(n: int) -> None:
    msg = serde.update_meta_to_proto(UPDATE)
    msg.num_examples = n
    with pytest.raises(InvalidSpecError, match="num_examples"):
        serde.update_meta_from_proto(msg)


def test_registration_needs_a_site_id() -> None:
    with pytest.raises(InvalidSpecError, match="site_id"):
        serde.registration_from_proto(ProtoRegisterRequest(site_id="", policy=ProtoPolicySummary()))


def test_empty_messages_decode_to_empty_values() -> None:
    """What an old or minimal peer sends: unset optional parts stay unset, not invented."""
    header = serde.update_meta_from_proto(
        ProtoUpdateHeader(site_id="s", task_id="t", num_examples=1, dp_report=ProtoDpReport())
    )
    assert header.metrics is None
    assert header.dp_report.events == ()
    assert header.dp_report.train_event is None
    m = serde.metrics_from_proto(ProtoMetrics(loss=1.0, num_examples=2))
    assert m.noise_multiplier is None
    task = serde.task_from_proto(ProtoTask(task_id="t", noise_multiplier=1.0))
    assert task.round == 0 and task.model_size == 0


def test_failure_reason_is_capped() -> None:
    msg = serde.failure_to_proto(TaskFailure("s", "t", "INTERNAL", "x" * 100_000))
    assert len(serde.failure_from_proto(msg).reason) <= 4000


def test_vanishing_noise_multiplier_on_the_wire_is_refused() -> None:
    from protos.dpfed.v1.dpfed_pb2 import DpEvent as ProtoDpEvent

    msg = ProtoDpEvent(noise_multiplier=1e-300, sample_rate=0.1, steps=10, kind="train")
    with pytest.raises(InvalidSpecError, match="noise multiplier"):
        serde.dp_event_from_proto(msg)


def test_chunks_read_from_elsewhere_equal_chunks_of_the_bytes() -> None:
    data = bytes(range(256)) * 1500
    reads: list[tuple[int, int]] = []

    def read(offset: int, size: int) -> bytes:
        reads.append((offset, size))
        return data[offset : offset + size]

    chunks = list(serde.blob_to_chunks(read, len(data), chunk_size=50_000))
    assert chunks == list(serde.blob_to_chunks(data, chunk_size=50_000))
    assert max(size for _, size in reads) == 50_000  # one chunk at a time, never the whole
    assert serde.blob_from_chunks(chunks) == data
    assert [c.data for c in serde.blob_to_chunks(read, 0)] == [b""]
    with pytest.raises(ValueError, match="total size"):
        list(serde.blob_to_chunks(read))


def test_absent_schema_fields_decode_to_the_protocols_defaults() -> None:
    """dpfed.proto: an absent ``nullable`` means nullable, an absent ``label_schema`` means the
    site declared no label classes."""
    msg = ProtoDatasetInfo(name="credit", num_rows=10, label="y")
    msg.schema.add(name="x", type="numeric", has_bounds=True, min=0.0, max=1.0)
    info = serde.dataset_info_from_proto(msg)
    assert info.label_schema is None
    assert info.schema == (ColumnInfo(name="x", min=0.0, max=1.0, nullable=True),)
    explicit = serde.column_info_to_proto(ColumnInfo(name="x", nullable=False))
    assert explicit.HasField("nullable") and not explicit.nullable


def test_a_label_schema_with_an_unknown_type_is_rejected() -> None:
    msg = ProtoDatasetInfo(name="credit", num_rows=10, label="y")
    msg.label_schema.name = "y"
    msg.label_schema.type = "text"
    with pytest.raises(InvalidSpecError, match="unknown type"):
        serde.dataset_info_from_proto(msg)
