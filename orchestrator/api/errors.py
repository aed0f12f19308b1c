"""Every ``DpfedError`` becomes ``context.abort(status, message)`` through the table in
``common.errors`` (a ``TryLaterError`` also says when to ask again, in the trailing metadata);
anything else is an INTERNAL error whose details stay in the server log. The decorators also
hold the call's place in its service's ``CallLimiter`` and count every RPC by status.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from common.errors import DpfedError, TryLaterError
from common.rpc.transport import RETRY_AFTER_MS
from orchestrator.metrics import COUNTERS

log = logging.getLogger("dpfed.orchestrator")

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def _mapped_errors(method: str, context: grpc.ServicerContext) -> Iterator[None]:
    """Abort with the status of a DpfedError (INTERNAL for anything else) and count the RPC."""
    try:
        yield
    except DpfedError as err:
        COUNTERS.inc("dpfed_rpcs_total", method=method, status=err.grpc_status)
        if isinstance(err, TryLaterError):
            ms = max(1, round(err.retry_after_s * 1000))
            context.set_trailing_metadata(((RETRY_AFTER_MS, str(ms)),))
        context.abort(grpc.StatusCode[err.grpc_status], str(err))
    except Exception:
        COUNTERS.inc("dpfed_rpcs_total", method=method, status="INTERNAL")
        log.exception("internal error in %s", method)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")
    COUNTERS.inc("dpfed_rpcs_total", method=method, status="OK")


def abort_on_error(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        with _mapped_errors(fn.__name__, context), self.limits.hold(context):
            return fn(self, request, context)

    return wrapper  # type: ignore[return-value]


def abort_on_error_stream(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with _mapped_errors(fn.__name__, context), self.limits.hold(context):
            yield from fn(self, request, context)

    return wrapper  # type: ignore[return-value]
