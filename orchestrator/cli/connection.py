"""The connection options every command that talks to a running orchestrator shares.

``--server HOST:PORT`` (``$DPFED_SERVER``, default 127.0.0.1:50051) and either mutual TLS
(``--ca``, ``--cert``, ``--key`` or ``$DPFED_CA``, ``$DPFED_CERT``, ``$DPFED_KEY``) or, on
loopback only, plaintext (``--insecure``). A command declares one ``conn: Connection``
parameter and is wrapped by :func:`connected`, which puts the five options in its place.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from common.errors import InvalidSpecError
from common.rpc.tls import TlsFiles
from orchestrator.client import ControlClient

DEFAULT_SERVER = "127.0.0.1:50051"

ServerOpt = Annotated[
    str,
    typer.Option("--server", "-s", envvar="DPFED_SERVER", help="orchestrator HOST:PORT"),
]
CaOpt = Annotated[Path | None, typer.Option("--ca", envvar="DPFED_CA", help="CA certificate (PEM)")]
CertOpt = Annotated[
    Path | None, typer.Option("--cert", envvar="DPFED_CERT", help="your certificate (PEM)")
]
KeyOpt = Annotated[
    Path | None, typer.Option("--key", envvar="DPFED_KEY", help="your private key (PEM)")
]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure", envvar="DPFED_INSECURE", help="plaintext, loopback only (development)"
    ),
]

_KW = inspect.Parameter.KEYWORD_ONLY
_OPTIONS = (
    inspect.Parameter("server", _KW, default=DEFAULT_SERVER, annotation=ServerOpt),
    inspect.Parameter("ca", _KW, default=None, annotation=CaOpt),
    inspect.Parameter("cert", _KW, default=None, annotation=CertOpt),
    inspect.Parameter("key", _KW, default=None, annotation=KeyOpt),
    inspect.Parameter("insecure", _KW, default=False, annotation=InsecureOpt),
)


@dataclass(frozen=True)
class Connection:
    """Where the orchestrator is and how to prove who this user is."""

    server: str
    ca: Path | None
    cert: Path | None
    key: Path | None
    insecure: bool

    def client(self) -> ControlClient:
        """A client of the control service; InvalidSpecError when TLS files are missing and
        ``insecure`` is not set (plaintext is refused off loopback by the client itself)."""
        if self.insecure:
            return ControlClient(self.server)
        if self.ca is None or self.cert is None or self.key is None:
            raise InvalidSpecError(
                "mutual TLS needs --ca, --cert and --key (or DPFED_CA, DPFED_CERT, DPFED_KEY); "
                "use --insecure only for a plaintext orchestrator on loopback"
            )
        return ControlClient(self.server, tls=TlsFiles(ca=self.ca, cert=self.cert, key=self.key))


R = TypeVar("R")


def connected(command: Callable[..., R]) -> Callable[..., R]:
    """``command`` with its ``conn: Connection`` parameter replaced, at the same place in its
    signature (and so in its ``--help``), by the options ``--server``, ``--ca``, ``--cert``,
    ``--key`` and ``--insecure``; the wrapper builds the :class:`Connection` from them.

    The parameters after ``conn`` must be keyword-only (declare ``*, conn: Connection``).
    """
    sig = inspect.signature(command, eval_str=True)
    if "conn" not in sig.parameters:
        raise TypeError(f"{command.__name__} has no conn parameter")
    params: list[inspect.Parameter] = []
    for p in sig.parameters.values():
        params.extend(_OPTIONS if p.name == "conn" else (p,))
    names = [p.name for p in _OPTIONS]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        conn = Connection(**{n: kwargs.pop(n) for n in names})
        return command(*args, conn=conn, **kwargs)

    # typer reads the options from the signature (inspect.signature honours __signature__)
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    wrapper.__annotations__["return"] = sig.return_annotation
    return wrapper
