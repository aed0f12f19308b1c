"""The privacy ledger's SQLite schema: its tables, their append-only triggers, the version
check and the upgrade from version 1 (``site_agent.boundary.ledger`` holds the contract)."""

from __future__ import annotations

import math
import os
import sqlite3
from pathlib import Path
from typing import Final

from common.errors import PrivacyAccountingError

SCHEMA_VERSION: Final = 2
_UPGRADABLE: Final = (1,)

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS schema_version (
        version INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS charges (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        dataset          TEXT    NOT NULL CHECK (length(dataset) > 0),
        job_id           TEXT    NOT NULL CHECK (length(job_id) > 0),
        round            INTEGER NOT NULL CHECK (round >= 0),
        task_id          TEXT    NOT NULL CHECK (length(task_id) > 0),
        kind             TEXT    NOT NULL CHECK (length(kind) > 0),
        noise_multiplier REAL    NOT NULL CHECK (noise_multiplier > 0),
        sample_rate      REAL    NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
        steps            INTEGER NOT NULL CHECK (steps >= 1),
        delta            REAL    NOT NULL CHECK (delta > 0 AND delta < 1),
        created_at       REAL    NOT NULL,
        budget           TEXT    NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX IF NOT EXISTS charges_by_dataset ON charges (dataset, id)",
    "CREATE INDEX IF NOT EXISTS charges_by_job ON charges (job_id, id)",
    """CREATE TRIGGER IF NOT EXISTS charges_no_update BEFORE UPDATE ON charges
    BEGIN
        SELECT RAISE(ABORT, 'the privacy ledger is append-only: charges cannot be updated');
    END""",
    """CREATE TRIGGER IF NOT EXISTS charges_no_delete BEFORE DELETE ON charges
    BEGIN
        SELECT RAISE(ABORT, 'the privacy ledger is append-only: charges cannot be deleted');
    END""",
    """CREATE TABLE IF NOT EXISTS reservations (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        grant_id         TEXT    NOT NULL CHECK (length(grant_id) > 0),
        dataset          TEXT    NOT NULL CHECK (length(dataset) > 0),
        budget           TEXT    NOT NULL CHECK (length(budget) > 0),
        job_id           TEXT    NOT NULL CHECK (length(job_id) > 0),
        kind             TEXT    NOT NULL CHECK (length(kind) > 0),
        noise_multiplier REAL    NOT NULL CHECK (noise_multiplier > 0),
        sample_rate      REAL    NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
        steps            INTEGER NOT NULL CHECK (steps >= 1),
        rounds           INTEGER NOT NULL CHECK (rounds >= 1),
        delta            REAL    NOT NULL CHECK (delta > 0 AND delta < 1),
        created_at       REAL    NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS reservation_ends (
        grant_id   TEXT NOT NULL PRIMARY KEY,
        reason     TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS reservations_by_job ON reservations (job_id, id)",
    *(
        f"""CREATE TRIGGER IF NOT EXISTS {table}_no_{verb} BEFORE {verb.upper()} ON {table}
    BEGIN
        SELECT RAISE(ABORT, 'the privacy ledger is append-only');
    END"""
        for table in ("reservations", "reservation_ends")
        for verb in ("update", "delete")
    ),
)


def setup_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Switch ``conn`` to WAL with full sync, and create or upgrade the schema in one
    transaction; refuse a ledger written by an unknown schema version."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise PrivacyAccountingError(
            f"The privacy ledger {path} could not be switched to WAL journaling "
            f"(got {mode!r}); refusing to run without a durable ledger."
        )
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        has_version = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        rows = conn.execute("SELECT version FROM schema_version").fetchall() if has_version else []
        found = [r[0] for r in rows]
        if rows and found != [SCHEMA_VERSION] and not (len(found) == 1 and found[0] in _UPGRADABLE):
            listed = ", ".join(str(v) for v in found)
            raise PrivacyAccountingError(
                f"The privacy ledger {path} has schema version {listed}, but this agent "
                f"understands only version {SCHEMA_VERSION}; refusing to read or write it."
            )
        for statement in _SCHEMA:
            conn.execute(statement)
        columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(charges)")}
        if "budget" not in columns:  # a version-1 ledger: its charges match by name
            conn.execute("ALTER TABLE charges ADD COLUMN budget TEXT NOT NULL DEFAULT ''")
        if not rows:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif found != [SCHEMA_VERSION]:
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def check_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"The ledger needs a non-empty string for {name}, got {value!r}.")
    return value


def fsync_dir(path: Path) -> None:
    """Make a newly created file's directory entry durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_delta(delta: object) -> None:
    if isinstance(delta, bool) or not isinstance(delta, int | float):
        raise ValueError(f"δ must be a number, got {delta!r}.")
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"δ must be in (0, 1), got {delta}.")
