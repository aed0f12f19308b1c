"""One error hierarchy for dpfed, with the gRPC status and CLI exit code of each error.

The core raises these; the transport maps them to gRPC statuses (by *name*, so this module
does not import grpc) and the CLIs to exit codes, through :data:`ERROR_TABLE`.
"""

from __future__ import annotations


class DpfedError(Exception):
    """Base of every error dpfed raises on purpose. The message is for the user."""

    grpc_status: str = "INTERNAL"
    exit_code: int = 1


class InvalidSpecError(DpfedError):
    """A job spec, site config or request is malformed; the message names the bad field."""

    grpc_status = "INVALID_ARGUMENT"
    exit_code = 2


class NotFoundError(DpfedError):
    """An unknown job, site, dataset or model."""

    grpc_status = "NOT_FOUND"
    exit_code = 3


class PolicyRefusal(DpfedError):
    """A site's own policy refuses a task (budget, σ, δ, architecture, rounds)."""

    grpc_status = "FAILED_PRECONDITION"
    exit_code = 4

    def __init__(self, message: str, *, site_id: str | None = None) -> None:
        super().__init__(message)
        self.site_id = site_id


class JobFailedError(DpfedError):
    """A job ended without releasing a model; the message says why and which sites."""

    grpc_status = "ABORTED"
    exit_code = 5


class PermissionDeniedError(DpfedError):
    """The caller's identity may not do this."""

    grpc_status = "PERMISSION_DENIED"
    exit_code = 6


class UnavailableError(DpfedError):
    """The orchestrator (or a site) cannot be reached."""

    grpc_status = "UNAVAILABLE"
    exit_code = 7


class TryLaterError(DpfedError):
    """A transfer has no turn yet: ask again after ``retry_after_s`` (its place is kept)."""

    grpc_status = "RESOURCE_EXHAUSTED"
    exit_code = 7

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidUpdateError(DpfedError):
    """An update from a site does not match its task (names, shapes, dtypes, finiteness)."""

    grpc_status = "INVALID_ARGUMENT"
    exit_code = 2


class PrivacyAccountingError(DpfedError):
    """The accountant could not give a sound bound; nothing is released."""

    grpc_status = "INTERNAL"
    exit_code = 8


ERROR_TABLE: dict[type[DpfedError], tuple[str, int]] = {
    cls: (cls.grpc_status, cls.exit_code)
    for cls in (
        DpfedError,
        InvalidSpecError,
        NotFoundError,
        PolicyRefusal,
        JobFailedError,
        PermissionDeniedError,
        UnavailableError,
        TryLaterError,
        InvalidUpdateError,
        PrivacyAccountingError,
    )
}
"""Error → (gRPC status name, CLI exit code)."""

_BY_STATUS: dict[str, type[DpfedError]] = {
    "INVALID_ARGUMENT": InvalidSpecError,
    "NOT_FOUND": NotFoundError,
    "FAILED_PRECONDITION": PolicyRefusal,
    "ABORTED": JobFailedError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "UNAUTHENTICATED": PermissionDeniedError,
    "UNAVAILABLE": UnavailableError,
    "RESOURCE_EXHAUSTED": TryLaterError,
    "DEADLINE_EXCEEDED": UnavailableError,
}


def error_from_status(status_name: str, message: str) -> DpfedError:
    """The error a client raises for a gRPC status received from a server."""
    return _BY_STATUS.get(status_name, DpfedError)(message)
