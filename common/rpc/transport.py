"""gRPC settings shared by both ends (message limits, keepalive) and address checks."""

from __future__ import annotations

import ipaddress
import math

from common.errors import InvalidSpecError

# Chunks are 128 KiB (``common.rpc.serde.CHUNK_SIZE``); anything much larger than that on the
# wire is malformed or hostile.
MAX_MESSAGE_BYTES = 8 << 20

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


# An upload waits for the orchestrator's go before sending its bytes: the agent sends the
# update's header, then holds its chunks until ``PushUpdate``'s initial metadata carries
# UPLOAD_GATE, which the orchestrator sends once the upload has a place in its round
# (``Broker.wait_for_capacity``). Until then the update's bytes stay at the site instead of
# filling the orchestrator's HTTP/2 receive windows (up to ~4 MiB per stream once gRPC's
# bandwidth-delay probing has grown them, i.e. about one whole 1M-parameter model per waiting
# site).
UPLOAD_GATE: tuple[str, str] = ("dpfed-upload-gate", "1")

# Transfers take turns at the agent, not in the orchestrator: when there is no room for a
# download or an upload yet, the orchestrator answers RESOURCE_EXHAUSTED with RETRY_AFTER_MS
# (milliseconds) in the trailing metadata and keeps the transfer's place in line
# (``orchestrator.core.turns``); the agent asks again after that long. No server thread is
# held by a waiting site.
RETRY_AFTER_MS = "dpfed-retry-after-ms"


def retry_after_s(err: BaseException) -> float | None:
    """The wait an orchestrator asked for when it refused a transfer for now, else None."""
    code = getattr(err, "code", None)
    trailing = getattr(err, "trailing_metadata", None)
    if not callable(code) or not callable(trailing):
        return None
    if getattr(code(), "name", None) != "RESOURCE_EXHAUSTED":
        return None
    for key, value in trailing() or ():
        if key == RETRY_AFTER_MS:
            try:
                ms = float(value)
            except ValueError:
                return None
            if not math.isfinite(ms):  # "nan" would make the caller's sleep raise
                return None
            return min(max(ms, 0.0), 60_000.0) / 1000.0
    return None


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidSpecError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback(address: str) -> bool:
    host, _ = split_address(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_loopback_for_plaintext(address: str) -> None:
    """Plaintext gRPC is for one machine only; across a network the traffic must be TLS."""
    if not is_loopback(address):
        raise InvalidSpecError(
            f"refusing plaintext gRPC on non-loopback address {address}: "
            "plaintext is only allowed on 127.0.0.1/::1/localhost"
        )
