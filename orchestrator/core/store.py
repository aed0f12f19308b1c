"""The orchestrator's durable state: sites, jobs, rounds, the job ledger (SQLAlchemy).

SQLite in the state directory is the embedded default; the URL can point at PostgreSQL. Model
checkpoints and released models are files next to the database (``checkpoints/``,
``models/``), written atomically (temp file + rename). The state directory and its folders are
0700, the SQLite database (and so its WAL and shared-memory files, which SQLite creates with
the database's mode) and every file written here 0600 (``common.private_files``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from common.errors import NotFoundError
from common.private_files import private_dir, private_sqlite_files


class Base(DeclarativeBase):
    pass


class SiteRow(Base):
    __tablename__ = "sites"
    site_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), default="")
    session_id: Mapped[str] = mapped_column(String(64), default="")
    registered_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_seen: Mapped[float] = mapped_column(Float, default=0.0)
    state: Mapped[str] = mapped_column(String(32), default="idle")
    datasets: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)


class JobRow(Base):
    __tablename__ = "jobs"
    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    dataset: Mapped[str] = mapped_column(String(200))
    spec_json: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(32), default="pending")
    round: Mapped[int] = mapped_column(Integer, default=0)
    rounds: Mapped[int] = mapped_column(Integer)
    epsilon: Mapped[float] = mapped_column(Float, default=0.0)
    delta: Mapped[float] = mapped_column(Float)
    accountant: Mapped[str] = mapped_column(String(32), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    model_released: Mapped[bool] = mapped_column(Boolean, default=False)
    # site_id -> resolved noise multiplier; fixed when the job starts
    participants: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    # site-level DP (DP-FedAvg): the clip norm for the next round (adaptive clipping moves it)
    site_clip_norm: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the certificate name that submitted the job: it may cancel it
    submitted_by: Mapped[str] = mapped_column(String(128), default="", server_default="")


class RoundRow(Base):
    __tablename__ = "rounds"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.job_id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    site_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    num_examples: Mapped[int] = mapped_column(Integer, default=0)
    duration_s: Mapped[float] = mapped_column(Float, default=0.0)
    epsilon: Mapped[float] = mapped_column(Float, default=0.0)
    metrics_exact: Mapped[bool] = mapped_column(Boolean, default=False)
    # pooled metrics with standard errors (orchestrator.metric_pooling.pooled_to_dict)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class JobEventRow(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.job_id"), index=True)
    time: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String(16))
    site_id: Mapped[str] = mapped_column(String(128), default="")
    message: Mapped[str] = mapped_column(Text)


class ChargeRow(Base):
    """What a site reported it charged for one accepted update (the job ledger)."""

    __tablename__ = "charges"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.job_id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    site_id: Mapped[str] = mapped_column(String(128), index=True)
    dataset: Mapped[str] = mapped_column(String(200))
    task_id: Mapped[str] = mapped_column(String(64), unique=True)
    num_examples: Mapped[int] = mapped_column(Integer)
    max_grad_norm: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    dataset_epsilon: Mapped[float] = mapped_column(Float)
    policy_delta: Mapped[float] = mapped_column(Float)
    events: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    grad_sample_mode: Mapped[str] = mapped_column(String(32), default="")


class GmmStateRow(Base):
    """A mixture job's resumable state (``orchestrator.clustering.runner``), as JSON text.

    ``checkpoint``: everything needed to continue after the last committed round (written with
    that round). What each site was charged is in the job ledger (``ChargeRow``, written
    before each dispatch), like every job kind's.
    """

    __tablename__ = "gmm_state"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.job_id"), primary_key=True)
    checkpoint: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)


@dataclass(frozen=True)
class StorePaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def spool(self) -> Path:
        """Uploads waiting for their round's fold, in anonymous files (``orchestrator.core.spool``)."""
        return self.root / "spool"

    def checkpoint(self, job_id: str, round_: int) -> Path:
        return self.checkpoints / job_id / f"round-{round_:05d}.safetensors"

    def model_dir(self, job_id: str) -> Path:
        return self.models / job_id


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()


class Store:
    """Thread-safe access to the orchestrator's state."""

    def __init__(self, state_dir: Path, *, url: str | None = None) -> None:
        private_dir(state_dir)
        self.paths = StorePaths(state_dir)
        private_dir(self.paths.checkpoints)
        private_dir(self.paths.models)
        self.url = url or f"sqlite:///{state_dir / 'orchestrator.db'}"
        sqlite_file = make_url(self.url).database if self.url.startswith("sqlite") else None
        if sqlite_file and sqlite_file != ":memory:":
            private_sqlite_files(Path(sqlite_file))
        self.engine = create_engine(
            self.url,
            connect_args={"check_same_thread": False} if self.url.startswith("sqlite") else {},
        )
        if self.url.startswith("sqlite"):
            _sqlite_pragmas(self.engine)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock = threading.RLock()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._lock, self._sessions() as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------- sites

    def upsert_site(
        self,
        *,
        site_id: str,
        version: str,
        session_id: str,
        datasets: list[dict[str, Any]],
        policy: dict[str, Any],
    ) -> None:
        now = time.time()
        with self.session() as s:
            row = s.get(SiteRow, site_id)
            if row is None:
                row = SiteRow(site_id=site_id, registered_at=now)
                s.add(row)
            row.version = version
            row.session_id = session_id
            row.last_seen = now
            row.state = "idle"
            row.datasets = datasets
            row.policy = policy

    def touch_site(
        self, site_id: str, *, state: str, datasets: list[dict[str, Any]] | None = None
    ) -> None:
        with self.session() as s:
            row = s.get(SiteRow, site_id)
            if row is None:
                return
            row.last_seen = time.time()
            row.state = state
            if datasets is not None:
                row.datasets = datasets

    def set_site_enabled(self, site_id: str, enabled: bool) -> None:
        with self.session() as s:
            row = s.get(SiteRow, site_id)
            if row is None:
                row = SiteRow(site_id=site_id, registered_at=0.0, datasets=[], policy={})
                s.add(row)
            row.enabled = enabled

    def sites(self) -> list[SiteRow]:
        with self.session() as s:
            return list(s.scalars(select(SiteRow).order_by(SiteRow.site_id)))

    def each_site(self, page: int = 64) -> Iterator[SiteRow]:
        """Every site's row, ``page`` at a time, each page read in its own session: a caller
        that keeps only what it needs of each row (one dataset, say) holds no more than a
        page of decoded column schemas, whatever the number of sites, and the store's lock
        is free between pages."""
        after = ""
        while True:
            with self.session() as s:
                rows = list(
                    s.scalars(
                        select(SiteRow)
                        .where(SiteRow.site_id > after)
                        .order_by(SiteRow.site_id)
                        .limit(page)
                    )
                )
            yield from rows
            if len(rows) < page:
                return
            after = rows[-1].site_id
            del rows

    def site_policies(self) -> dict[str, dict[str, Any]]:
        """Each site's policy summary, without reading the datasets' column schemas."""
        with self.session() as s:
            return {
                sid: dict(pol or {})
                for sid, pol in s.execute(select(SiteRow.site_id, SiteRow.policy))
            }

    def site(self, site_id: str) -> SiteRow | None:
        with self.session() as s:
            return s.get(SiteRow, site_id)

    # ---------------------------------------------------------------- jobs

    def add_job(self, row: JobRow) -> None:
        with self.session() as s:
            s.add(row)

    def job(self, job_id: str) -> JobRow:
        with self.session() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFoundError(f"no job with id {job_id!r}")
            return row

    def jobs(self) -> list[JobRow]:
        with self.session() as s:
            return list(s.scalars(select(JobRow).order_by(JobRow.created_at)))

    def update_job(self, job_id: str, **fields: Any) -> None:
        with self.session() as s:
            _update_job_row(s, job_id, fields)

    def add_event(self, job_id: str, level: str, message: str, *, site_id: str = "") -> None:
        with self.session() as s:
            s.add(
                JobEventRow(
                    job_id=job_id, time=time.time(), level=level, site_id=site_id, message=message
                )
            )

    def events(self, job_id: str) -> list[JobEventRow]:
        with self.session() as s:
            q = select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id)
            return list(s.scalars(q))

    def commit_round(self, rnd: RoundRow, charges: list[ChargeRow], **job_fields: Any) -> None:
        """Record a finished round, its charges and the job's progress in one transaction."""
        with self.session() as s:
            s.merge(rnd)
            for c in charges:
                s.add(c)
            _update_job_row(s, rnd.job_id, job_fields)

    # ---------------------------------------------------------------- mixture jobs

    def gmm_state(self, job_id: str) -> GmmStateRow | None:
        with self.session() as s:
            return s.get(GmmStateRow, job_id)

    def _set_gmm_state(self, s: Session, job_id: str, *, checkpoint: str) -> None:
        row = s.get(GmmStateRow, job_id)
        if row is None:
            row = GmmStateRow(job_id=job_id, checkpoint="")
            s.add(row)
        row.checkpoint = checkpoint
        row.updated_at = time.time()

    def save_gmm_state(self, job_id: str, *, checkpoint: str, **job_fields: Any) -> None:
        """Write a mixture job's checkpoint (and job fields) at once."""
        with self.session() as s:
            self._set_gmm_state(s, job_id, checkpoint=checkpoint)
            _update_job_row(s, job_id, job_fields)

    def commit_gmm_round(self, rnd: RoundRow, checkpoint: str, **job_fields: Any) -> None:
        """Record a mixture job's finished round with the checkpoint after it, atomically."""
        with self.session() as s:
            s.merge(rnd)
            self._set_gmm_state(s, rnd.job_id, checkpoint=checkpoint)
            _update_job_row(s, rnd.job_id, job_fields)

    def add_charges(self, charges: list[ChargeRow]) -> None:
        with self.session() as s:
            for c in charges:
                s.add(c)

    def rounds(self, job_id: str) -> list[RoundRow]:
        with self.session() as s:
            q = select(RoundRow).where(RoundRow.job_id == job_id).order_by(RoundRow.round)
            return list(s.scalars(q))

    def charges(self, job_id: str | None = None, *, after_id: int = 0) -> list[ChargeRow]:
        """Charge rows in the order written; ``after_id``: only those written after that row
        (what an incremental reader has not seen yet)."""
        with self.session() as s:
            q = select(ChargeRow).order_by(ChargeRow.id)
            if job_id is not None:
                q = q.where(ChargeRow.job_id == job_id)
            if after_id:
                q = q.where(ChargeRow.id > after_id)
            return list(s.scalars(q))


def atomic_write(path: Path, data: bytes) -> None:
    """Write-then-rename, fsynced: a crash leaves the old file or the new one, never half.
    The file is 0600 from its first byte."""
    private_dir(path.parent)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def _update_job_row(s: Session, job_id: str, fields: dict[str, Any]) -> None:
    """Set ``fields`` on the job's row in session ``s`` and stamp it updated."""
    row = s.get(JobRow, job_id)
    if row is None:
        raise NotFoundError(f"no job with id {job_id!r}")
    for k, v in fields.items():
        setattr(row, k, v)
    row.updated_at = time.time()
