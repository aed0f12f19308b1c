"""Names, roles and files of dpfed's PKI: who a certificate says its holder is (CN = name,
OU = role), where each holder's certificate and key lie under a ``pki_dir``, and the checks
every name and file write goes through (names bounded by RFC 5280's ``ub-common-name``; keys
written 0600 from the first byte, certificates replaced atomically)."""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from common.errors import InvalidSpecError

ROLE_SITE: Final = "site"
ROLE_OPERATOR: Final = "operator"
ROLE_DATA_SCIENTIST: Final = "data-scientist"
ROLE_ORCHESTRATOR: Final = "orchestrator"
ROLE_MONITOR: Final = "monitor"
"""Read-only: job, site and ledger views, nothing that submits, cancels or downloads."""
ROLES: Final[tuple[str, ...]] = (
    ROLE_SITE,
    ROLE_OPERATOR,
    ROLE_DATA_SCIENTIST,
    ROLE_ORCHESTRATOR,
    ROLE_MONITOR,
)

DEFAULT_DAYS: Final = 365
"""Validity of a certificate :func:`issue` signs unless told otherwise: a key
that leaks without anyone noticing stops working within a year even if nobody revokes it."""

DEFAULT_HOSTS: Final[tuple[str, ...]] = ("127.0.0.1", "::1", "localhost")
"""Where the orchestrator listens unless told otherwise: this machine only."""

ROLE_FOLDER: Final[dict[str, str]] = {
    ROLE_SITE: "sites",
    ROLE_OPERATOR: "users",
    ROLE_DATA_SCIENTIST: "users",
    ROLE_ORCHESTRATOR: "server",
    ROLE_MONITOR: "users",
}
USER_ROLES: Final = (ROLE_OPERATOR, ROLE_DATA_SCIENTIST, ROLE_MONITOR)

# No slashes, so a name can never leave its folder; fullmatch, so no trailing newline sneaks in.
NAME_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
CN_MAX: Final = 64  # RFC 5280, ub-common-name

# Tolerates clocks a little behind the one that issued the certificate.
BACKDATE: Final = dt.timedelta(minutes=5)

CA_CERT: Final = "ca.pem"
CA_KEY: Final = "ca.key"
CRL_FILE: Final = "crl.pem"
ISSUED_FILE: Final = "issued.json"


@dataclass(frozen=True)
class Identity:
    """Who a certificate says its holder is: ``name`` from the CN, ``role`` from the OU;
    ``serial`` is the certificate's (for revocation; not part of equality)."""

    name: str
    role: str
    serial: int = field(default=0, compare=False)


@dataclass(frozen=True)
class TlsFiles:
    """The three files one end needs: the CA to trust, its own certificate and its key."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """``(ca_pem, cert_pem, key_pem)``; a missing or unreadable file is named in the error."""
        out: list[bytes] = []
        for what, path in (
            ("CA certificate", self.ca),
            ("certificate", self.cert),
            ("key", self.key),
        ):
            try:
                out.append(path.read_bytes())
            except FileNotFoundError:
                raise InvalidSpecError(f"TLS {what} file {path} does not exist") from None
            except OSError as exc:
                raise InvalidSpecError(f"cannot read TLS {what} file {path}: {exc}") from None
        return out[0], out[1], out[2]


def files_in(pki_dir: Path, *, name: str, role: str) -> TlsFiles:
    """The files :func:`issue` writes for ``name`` in ``role``, for loading them later."""
    check_name(name)
    check_role(role)
    folder = pki_dir / ROLE_FOLDER[role]
    return TlsFiles(ca=pki_dir / CA_CERT, cert=folder / f"{name}.pem", key=folder / f"{name}.key")


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidSpecError(f"name {name!r} must match [A-Za-z0-9_.-]{{1,128}}")
    if len(name) > CN_MAX:
        raise InvalidSpecError(
            f"name {name!r} is {len(name)} characters; a certificate CommonName holds at most "
            f"{CN_MAX} (RFC 5280)"
        )
    if name.strip(".") == "":
        raise InvalidSpecError(f"name {name!r} must not be only dots")


def check_role(role: str) -> None:
    if role not in ROLES:
        raise InvalidSpecError(f"role {role!r} is not one of {ROLES}")


def check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise InvalidSpecError(f"days must be a positive integer, not {days!r}")


def load_ca(
    pki_dir: Path,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((pki_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((pki_dir / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise InvalidSpecError(
            f"no CA in {pki_dir} ({exc.filename} is missing); run init_ca first"
        ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidSpecError(f"cannot load the CA in {pki_dir}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InvalidSpecError(f"the CA key in {pki_dir} is neither EC nor RSA")
    # A mismatched pair would sign certificates that nobody can verify.
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise InvalidSpecError(f"{CA_KEY} and {CA_CERT} in {pki_dir} do not belong together")
    return cert, key


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted: the services start unattended; the file's mode (0600) protects the key.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_file(path: Path, data: bytes, *, mode: int, exclusive: bool = False) -> None:
    """Write ``data`` with ``mode`` from the first byte (no window where a key is readable).

    ``exclusive`` fails if ``path`` exists; otherwise the file is replaced atomically, so a
    reader never sees half a certificate.
    """
    target = path if exclusive else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(target, flags, mode)
    except FileExistsError:
        raise InvalidSpecError(f"refusing to overwrite {target}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # the umask may have narrowed it; set it exactly
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if not exclusive:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
