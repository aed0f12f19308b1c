"""One agent per state directory: an exclusive, advisory lock held for the agent's lifetime.

Two agents on one state directory would share one ledger, one catalog cache and one set of
canary secrets; the ledger's transactions keep its budget sound, but the rest is not meant to
be shared, and an operator who starts a second agent by mistake should hear so at once.
``flock`` (POSIX) is released by the kernel when the process dies, so a crashed agent never
leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from common.errors import InvalidSpecError

LOCK_NAME = "agent.lock"


class StateDirLock:
    """Holds ``state_dir/agent.lock`` exclusively until :meth:`release` (or process exit)."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            holder = f" (pid {pid})" if pid.isdigit() else ""
            raise InvalidSpecError(
                f"Another site agent{holder} already runs on the state directory "
                f"{state_dir}; one agent owns a state directory (its ledger, catalog and "
                "canaries). Stop it, or give this agent its own state_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd: int | None = fd

    def release(self) -> None:
        """Let go of the lock. Idempotent."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateDirLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
