"""Revocation: the record of what the CA issued (``issued.json``), the signed CRL
(``crl.pem``) that :func:`revoke` writes, and :class:`RevocationList`, which the orchestrator
checks on every call (gRPC's Python API has no CRL option, so the handshake alone would let a
revoked certificate in). A CRL that cannot be read or verified refuses every caller."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from common.errors import InvalidSpecError, PermissionDeniedError
from common.rpc.tls.credentials import identity_from_pem
from common.rpc.tls.files import (
    BACKDATE,
    CA_CERT,
    CRL_FILE,
    ISSUED_FILE,
    ROLE_FOLDER,
    Identity,
    load_ca,
    write_file,
)

_SERIAL_RE: Final = re.compile(r"(?:[0-9A-Fa-f]:?){16,}")  # 16+ hex digits, colons allowed


@dataclass(frozen=True)
class IssuedCert:
    """One line of ``issued.json``: a certificate the CA signed."""

    serial: int
    name: str
    role: str
    not_after: float  # Unix time

    @staticmethod
    def of(cert: x509.Certificate) -> IssuedCert:
        ident = identity_from_pem(cert.public_bytes(serialization.Encoding.PEM))
        return IssuedCert(
            serial=cert.serial_number,
            name=ident.name,
            role=ident.role,
            not_after=cert.not_valid_after_utc.timestamp(),
        )

    @property
    def serial_hex(self) -> str:
        return format_serial(self.serial)


def format_serial(serial: int) -> str:
    """A serial as the CLI prints and takes it: upper-case hex without separators."""
    return f"{serial:X}"


def issued(pki_dir: Path) -> list[IssuedCert]:
    """Every certificate recorded in ``issued.json``, oldest record first, then any certificate
    under ``pki_dir`` the record lacks (:func:`issue` writes the certificate before recording
    it, so a crash in between leaves one that must still be listed and revocable by name)."""
    out: dict[int, IssuedCert] = {}
    path = pki_dir / ISSUED_FILE
    if path.exists():
        try:
            for item in json.loads(path.read_text())["certificates"]:
                c = IssuedCert(
                    serial=int(item["serial"], 16),
                    name=str(item["name"]),
                    role=str(item["role"]),
                    not_after=float(item["not_after"]),
                )
                out[c.serial] = c
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidSpecError(f"cannot read {path}: {exc}") from None
    for folder in sorted(set(ROLE_FOLDER.values())):
        for pem in sorted((pki_dir / folder).glob("*.pem")):
            try:
                c = IssuedCert.of(x509.load_pem_x509_certificate(pem.read_bytes()))
            except (OSError, ValueError, PermissionDeniedError):
                continue
            out.setdefault(c.serial, c)
    return list(out.values())


def record_issued(pki_dir: Path, certs: Sequence[IssuedCert]) -> None:
    known = {c.serial: c for c in issued(pki_dir)}
    for c in certs:
        known[c.serial] = c
    body = {
        "certificates": [
            {"serial": c.serial_hex, "name": c.name, "role": c.role, "not_after": c.not_after}
            for c in known.values()
        ]
    }
    write_file(pki_dir / ISSUED_FILE, json.dumps(body, indent=1).encode(), mode=0o644)


def revoked_serials(pki_dir: Path) -> set[int]:
    """The serials in ``pki_dir/crl.pem`` (empty when there is none); checks its signature."""
    crl = _load_crl(pki_dir / CRL_FILE, pki_dir / CA_CERT)
    return set() if crl is None else {r.serial_number for r in crl}


def revoke(pki_dir: Path, target: str) -> list[IssuedCert]:
    """Revoke ``target``: every certificate issued to that name, or the one with that serial
    (hex, colons allowed). Rewrites ``crl.pem``, signed by the CA (so this needs ``ca.key``),
    and returns what it newly revoked. A serial the record does not know is revoked as given
    (a certificate from a copy of the CA); an unknown name is an error (likely a typo)."""
    ca_cert, ca_key = load_ca(pki_dir)
    known = issued(pki_dir)
    by_name = [c for c in known if c.name == target]
    hits = by_name
    if not hits and _SERIAL_RE.fullmatch(target):
        serial = int(target.replace(":", ""), 16)
        hits = [c for c in known if c.serial == serial] or [
            IssuedCert(serial=serial, name="?", role="?", not_after=0.0)
        ]
    if not hits:
        raise InvalidSpecError(
            f"{target!r} is neither a name nor a serial the CA in {pki_dir} issued "
            "(`orchestrator certs list` shows them)"
        )
    already = revoked_serials(pki_dir)
    new = [c for c in hits if c.serial not in already]
    now = dt.datetime.now(dt.UTC)
    old = _load_crl(pki_dir / CRL_FILE, pki_dir / CA_CERT)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - BACKDATE)
        .next_update(ca_cert.not_valid_after_utc)
    )
    for r in old or ():
        builder = builder.add_revoked_certificate(r)
    for c in new:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(c.serial).revocation_date(now).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    write_file(pki_dir / CRL_FILE, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return new


def _load_crl(path: Path, ca_path: Path) -> x509.CertificateRevocationList | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PermissionDeniedError(f"cannot read the revocation list {path}: {exc}") from None
    try:
        crl = x509.load_pem_x509_crl(data)
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        public_key = ca.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise ValueError("the CA key is neither EC nor RSA")
        valid = crl.is_signature_valid(public_key)
    except (OSError, ValueError) as exc:
        raise PermissionDeniedError(f"the revocation list {path} is unreadable: {exc}") from None
    if not valid or crl.issuer != ca.subject:
        raise PermissionDeniedError(f"the revocation list {path} is not signed by {ca_path}")
    return crl


class RevocationList:
    """The serials revoked in a ``crl.pem``, re-read whenever the file changes.

    :meth:`check` refuses a revoked caller. A list that exists but cannot be read or is not
    signed by the CA refuses every caller (fail closed) until it is fixed: otherwise damaging
    the file would un-revoke everyone. No file means nothing is revoked.
    """

    def __init__(self, path: Path, ca: Path) -> None:
        self.path, self.ca = path, ca
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[int] = frozenset()
        self._error: str = ""

    def check(self, ident: Identity) -> None:
        serials, error = self._current()
        if error:
            raise PermissionDeniedError(f"{error}; every certificate is refused until it is fixed")
        if ident.serial in serials:
            raise PermissionDeniedError(
                f"the certificate of {ident.name} (role {ident.role}, serial "
                f"{format_serial(ident.serial)}) has been revoked"
            )

    def _current(self) -> tuple[frozenset[int], str]:
        try:
            st = self.path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp or self._error:
                try:
                    crl = _load_crl(self.path, self.ca)
                    self._serials = frozenset(r.serial_number for r in crl or ())
                    self._error = ""
                except PermissionDeniedError as err:
                    self._serials, self._error = frozenset(), str(err)
                self._stamp = stamp
            return self._serials, self._error
