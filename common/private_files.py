"""Files only their owner reads: state directories 0700, databases 0600 (issue 17).

A party's state (the orchestrator's database, checkpoints and models; a site's ledger, split
key and canaries) holds what other users of the machine must not read. The directory's mode
is what protects what is written into it later by any module; databases are made 0600 before
SQLite opens them, because SQLite creates the WAL and shared-memory files with the database's
mode (``unixOpen``: "the permissions of the database file").
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if needed and make it 0700."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)


def private_sqlite_files(db: Path) -> None:
    """Make a SQLite database 0600 before SQLite opens it (creating it empty if needed), and
    its WAL and shared-memory files if they exist (from an earlier version)."""
    if not db.parent.exists():
        private_dir(db.parent)
    os.close(os.open(db, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if p.exists():
            os.chmod(p, FILE_MODE)
