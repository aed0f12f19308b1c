"""dpfed's PKI for mutual TLS: who may dial the orchestrator, and who the caller is.

Trust model
-----------
* **One private CA per deployment**, created by the operator with :func:`init_ca`. Its
  certificate (``ca.pem``) is the only root either end trusts: public CAs are never trusted,
  so a certificate bought elsewhere for the same name is worthless here. The CA key
  (``ca.key``, mode 0600) signs everything and should stay with the operator; :func:`init_ca`
  refuses to overwrite it, because a new CA silently invalidates every certificate in use.
* **The orchestrator** holds a server certificate (extended key usage ``serverAuth``) whose
  subject alternative names list the hosts clients dial (by default ``127.0.0.1``, ``::1`` and
  ``localhost``). Clients verify the chain *and* the host name, so they need no overrides.
* **Each site** holds a client certificate (``clientAuth``) whose subject CommonName *is* the
  site id. The orchestrator requires a client certificate on every connection
  (``require_client_auth=True``) and takes the caller's identity from the verified certificate
  (:func:`peer_identity`), never from a field in a request: a site that could name itself
  in a message could spend another site's privacy budget or read its tasks.
* **Each CLI user** holds a client certificate with the role ``operator`` or
  ``data-scientist`` (or ``monitor``, read-only, like the orchestrator's own health probe);
  the orchestrator decides what a caller may do from that role.
* **Revocation.** Every certificate :func:`issue` signs is recorded in ``issued.json``;
  :func:`revoke` (by name: every certificate issued to it; or by serial) adds it to
  ``crl.pem``, an X.509 CRL signed by the CA. The orchestrator checks each caller's serial
  against it on every call (:class:`RevocationList`; gRPC's Python API has no CRL option, so
  the handshake alone would let a revoked certificate in). Certificates are valid for
  :data:`DEFAULT_DAYS` unless told otherwise; rotating is re-issuing, then revoking the old
  serial once the holder uses the new one (``docs/site-operator-guide.md``).

The role is the subject OrganizationalUnitName (OU); the name is the CommonName (CN).
Keys are EC P-256 and signatures ECDSA with SHA-256 (RSA CA keys are also accepted when
signing, with PKCS#1 v1.5 and SHA-256). Names are limited to 64 characters because RFC 5280
bounds CommonName at 64 (``ub-common-name``) and ``cryptography`` enforces that bound.

Layout written under a ``pki_dir``::

    ca.pem  ca.key                    the deployment's CA
    issued.json  crl.pem              what was issued, what is revoked
    server/orchestrator.pem/.key      ROLE_ORCHESTRATOR
    sites/<site-id>.pem/.key          ROLE_SITE
    users/<user>.pem/.key             ROLE_OPERATOR, ROLE_DATA_SCIENTIST
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import InvalidSpecError, PermissionDeniedError

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

_ROLE_FOLDER: Final[dict[str, str]] = {
    ROLE_SITE: "sites",
    ROLE_OPERATOR: "users",
    ROLE_DATA_SCIENTIST: "users",
    ROLE_ORCHESTRATOR: "server",
    ROLE_MONITOR: "users",
}
_USER_ROLES: Final = (ROLE_OPERATOR, ROLE_DATA_SCIENTIST, ROLE_MONITOR)

# No slashes, so a name can never leave its folder; fullmatch, so no trailing newline sneaks in.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_CN_MAX: Final = 64  # RFC 5280, ub-common-name
_DNS_LABEL_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?")

# Tolerates clocks a little behind the one that issued the certificate.
_BACKDATE: Final = dt.timedelta(minutes=5)

_CA_CERT: Final = "ca.pem"
_CA_KEY: Final = "ca.key"
CRL_FILE: Final = "crl.pem"
ISSUED_FILE: Final = "issued.json"
_SERIAL_RE: Final = re.compile(r"(?:[0-9A-Fa-f]:?){16,}")  # 16+ hex digits, colons allowed


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


# --------------------------------------------------------------------------- issuing


def init_ca(pki_dir: Path, *, common_name: str = "dpfed CA", days: int = 3650) -> None:
    """Create the deployment's CA: ``pki_dir/ca.pem`` and ``pki_dir/ca.key`` (mode 0600).

    Refuses if ``ca.key`` exists: replacing a CA would invalidate every certificate already
    handed to sites and users, and losing the old key cannot be undone.
    """
    _check_days(days)
    if not 1 <= len(common_name) <= _CN_MAX:
        raise InvalidSpecError(f"CA common name must be 1 to {_CN_MAX} characters")
    key_path = pki_dir / _CA_KEY
    if key_path.exists():
        raise InvalidSpecError(f"refusing to overwrite the existing CA key {key_path}")

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dpfed"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        # path_length=0: this CA signs end-entity certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )

    _mkdir(pki_dir)
    # O_EXCL claims the CA atomically: of two concurrent init_ca calls, one fails.
    _write(key_path, _key_pem(key), mode=0o600, exclusive=True)
    _write(pki_dir / _CA_CERT, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def issue(
    pki_dir: Path, *, name: str, role: str, hosts: Sequence[str] = (), days: int = DEFAULT_DAYS
) -> TlsFiles:
    """Sign a certificate for ``name`` in ``role`` with the CA in ``pki_dir``.

    Writes ``pki_dir/<sites|users|server>/<name>.pem`` and ``.key`` (0600), replacing an
    earlier certificate for the same name and role (re-issuing is how a key is rotated).
    For :data:`ROLE_ORCHESTRATOR` the certificate is for ``serverAuth`` with ``hosts`` (by
    default :data:`DEFAULT_HOSTS`) as subject alternative names, IP addresses as IP entries
    and anything else as DNS names; for every other role it is for ``clientAuth``, and
    ``hosts`` must be empty because a client certificate names no host. The validity is
    capped at the CA's own. Everything is checked before anything is written. The certificate
    is recorded in ``issued.json``; the one it replaces stays valid until :func:`revoke`.
    """
    _check_name(name)
    _check_role(role)
    _check_days(days)
    if role == ROLE_ORCHESTRATOR:
        san = _subject_alt_names(hosts or DEFAULT_HOSTS)
    elif hosts:
        raise InvalidSpecError(f"hosts apply only to the {ROLE_ORCHESTRATOR} certificate")
    ca_cert, ca_key = _load_ca(pki_dir)

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise InvalidSpecError(f"the CA in {pki_dir} has expired; create a new PKI")
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [
                    ExtendedKeyUsageOID.SERVER_AUTH
                    if role == ROLE_ORCHESTRATOR
                    else ExtendedKeyUsageOID.CLIENT_AUTH
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if role == ROLE_ORCHESTRATOR:
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())

    files = files_in(pki_dir, name=name, role=role)
    _mkdir(files.cert.parent)
    # Key first: a certificate on disk without its key would look usable and is not.
    _write(files.key, _key_pem(key), mode=0o600)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    _record_issued(pki_dir, [IssuedCert.of(cert)])
    return files


def init_pki(
    pki_dir: Path,
    *,
    sites: Sequence[str],
    users: Sequence[tuple[str, str]] = (
        ("operator", ROLE_OPERATOR),
        ("analyst", ROLE_DATA_SCIENTIST),
    ),
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = DEFAULT_DAYS,
) -> dict[str, TlsFiles]:
    """A whole deployment's PKI: the CA, the orchestrator, every site and every user.

    Returns ``{"orchestrator": ..., "site:<id>": ..., "user:<name>": ...}``. All names,
    roles and hosts are checked before the CA is created, so a typo leaves nothing behind.
    """
    for site in sites:
        _check_name(site)
    for user, role in users:
        _check_name(user)
        if role not in _USER_ROLES:
            raise InvalidSpecError(
                f"user {user!r} has role {role!r}; a user's role must be one of {_USER_ROLES}"
            )
    for label, names in (("site", list(sites)), ("user", [u for u, _ in users])):
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InvalidSpecError(f"duplicate {label} names: {', '.join(dupes)}")
    if not hosts:
        raise InvalidSpecError("the orchestrator certificate needs at least one host")
    _subject_alt_names(hosts)

    _check_days(days)

    init_ca(pki_dir)
    out = {
        "orchestrator": issue(
            pki_dir, name="orchestrator", role=ROLE_ORCHESTRATOR, hosts=hosts, days=days
        )
    }
    for site in sites:
        out[f"site:{site}"] = issue(pki_dir, name=site, role=ROLE_SITE, days=days)
    for user, role in users:
        out[f"user:{user}"] = issue(pki_dir, name=user, role=role, days=days)
    return out


def files_in(pki_dir: Path, *, name: str, role: str) -> TlsFiles:
    """The files :func:`issue` writes for ``name`` in ``role``, for loading them later."""
    _check_name(name)
    _check_role(role)
    folder = pki_dir / _ROLE_FOLDER[role]
    return TlsFiles(ca=pki_dir / _CA_CERT, cert=folder / f"{name}.pem", key=folder / f"{name}.key")


# --------------------------------------------------------------------------- identities


def identity_from_pem(cert_pem: bytes) -> Identity:
    """The identity in a certificate (CN and OU), for a certificate TLS has already verified.

    This does not verify the certificate; :func:`server_credentials` makes the TLS layer do
    that before any handler runs. Anything ambiguous (no CN, two OUs, an unknown role) is
    refused rather than guessed at, since the answer decides what the caller may do.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise PermissionDeniedError("the client certificate cannot be parsed") from None
    name = _single(cert.subject, NameOID.COMMON_NAME, "CommonName")
    role = _single(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME, "OrganizationalUnitName")
    if not _NAME_RE.fullmatch(name):
        raise PermissionDeniedError(f"certificate name {name!r} is malformed")
    if role not in ROLES:
        raise PermissionDeniedError(f"certificate role {role!r} is not a dpfed role")
    return Identity(name=name, role=role, serial=cert.serial_number)


def peer_identity(context: grpc.ServicerContext) -> Identity:
    """The verified identity of the caller of an RPC, from its TLS client certificate."""
    certs = context.auth_context().get("x509_pem_cert")
    if not certs:
        raise PermissionDeniedError("no client certificate")
    return identity_from_pem(certs[0])


# --------------------------------------------------------------------------- revocation


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
    """Every certificate recorded in ``issued.json`` plus the ones on disk (a PKI made before
    the record existed), oldest record first."""
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
    for folder in sorted(set(_ROLE_FOLDER.values())):
        for pem in sorted((pki_dir / folder).glob("*.pem")):
            try:
                c = IssuedCert.of(x509.load_pem_x509_certificate(pem.read_bytes()))
            except (OSError, ValueError, PermissionDeniedError):
                continue
            out.setdefault(c.serial, c)
    return list(out.values())


def _record_issued(pki_dir: Path, certs: Sequence[IssuedCert]) -> None:
    known = {c.serial: c for c in issued(pki_dir)}
    for c in certs:
        known[c.serial] = c
    body = {
        "certificates": [
            {"serial": c.serial_hex, "name": c.name, "role": c.role, "not_after": c.not_after}
            for c in known.values()
        ]
    }
    _write(pki_dir / ISSUED_FILE, json.dumps(body, indent=1).encode(), mode=0o644)


def revoked_serials(pki_dir: Path) -> set[int]:
    """The serials in ``pki_dir/crl.pem`` (empty when there is none); checks its signature."""
    crl = _load_crl(pki_dir / CRL_FILE, pki_dir / _CA_CERT)
    return set() if crl is None else {r.serial_number for r in crl}


def revoke(pki_dir: Path, target: str) -> list[IssuedCert]:
    """Revoke ``target``: every certificate issued to that name, or the one with that serial
    (hex, colons allowed). Rewrites ``crl.pem``, signed by the CA (so this needs ``ca.key``),
    and returns what it newly revoked. A serial the record does not know is revoked as given
    (a certificate from a copy of the CA); an unknown name is an error (likely a typo)."""
    ca_cert, ca_key = _load_ca(pki_dir)
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
    old = _load_crl(pki_dir / CRL_FILE, pki_dir / _CA_CERT)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(ca_cert.not_valid_after_utc)
    )
    for r in old or ():
        builder = builder.add_revoked_certificate(r)
    for c in new:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(c.serial).revocation_date(now).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    _write(pki_dir / CRL_FILE, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
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


# --------------------------------------------------------------------------- diagnosis


def explain_tls_failure(files: TlsFiles, details: str, *, host: str = "") -> str | None:
    """The likely cause of a connection that failed over mTLS, or None if it is not TLS's.

    gRPC reports a handshake the server refused only as "Socket closed", so this end checks
    its own files: its certificate's validity window, its issuer against the CA file (another
    deployment's certificate), the CA's own expiry. A refusal of the server's certificate
    comes with OpenSSL's reason (``CERTIFICATE_VERIFY_FAILED: ...``), which is translated.
    """
    now = dt.datetime.now(dt.UTC)
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    except (OSError, ValueError):
        return None  # TlsFiles.read already named unreadable files at start-up
    if now < cert.not_valid_before_utc:
        return (
            f"your certificate {files.cert} is not valid yet (from "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC): check this machine's clock"
        )
    if now > cert.not_valid_after_utc:
        return (
            f"your certificate {files.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d} "
            "UTC: ask the deployment's operator for a new one"
        )
    if now > ca.not_valid_after_utc:
        return f"the CA certificate {files.ca} expired on {ca.not_valid_after_utc:%Y-%m-%d} UTC"
    low = details.lower()
    # This end refused the server's certificate (gRPC passes OpenSSL's reason on).
    if "certificate_verify_failed" in low or "certificate verify failed" in low:
        if "expired" in low:
            return "the orchestrator's certificate has expired: its operator must re-issue it"
        if "not yet valid" in low:
            return "the orchestrator's certificate is not valid yet: check the clocks"
        return (
            f"the orchestrator's certificate is not signed by the CA in {files.ca} (you have "
            "another deployment's CA, or this is not your orchestrator)"
        )
    if not _issued_by(cert, ca):
        return (
            f"your certificate {files.cert} was not issued by the CA in {files.ca} (a "
            "certificate of another deployment?): the orchestrator refuses it"
        )
    if "peer name" in low or "hostname" in low:
        name = host.rsplit(":", 1)[0] if host.rsplit(":", 1)[-1].isdigit() else host
        return (
            f"the orchestrator's certificate does not name the host {name or 'you dialled'}: "
            "dial a name it lists, or have it re-issued with --host"
        )
    if "socket closed" in low or "handshake" in low:
        return (
            "the orchestrator closed the connection during the TLS handshake: it does not "
            f"accept your certificate {files.cert} (is its CA another deployment's?), or it "
            "does not speak TLS"
        )
    return None


def expires_in(cert_pem: bytes) -> dt.timedelta:
    """How long until the certificate expires (negative once it has)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.not_valid_after_utc - dt.datetime.now(dt.UTC)


def server_hosts(cert_pem: bytes) -> tuple[str, ...]:
    """The host names and addresses a server certificate was issued for (its SANs)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return (*ips, *san.get_values_for_type(x509.DNSName))


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --------------------------------------------------------------------------- gRPC


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server TLS that *requires* a client certificate signed by the deployment's CA."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Client TLS that trusts only the deployment's CA and presents this end's certificate."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


# --------------------------------------------------------------------------- helpers


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidSpecError(f"name {name!r} must match [A-Za-z0-9_.-]{{1,128}}")
    if len(name) > _CN_MAX:
        raise InvalidSpecError(
            f"name {name!r} is {len(name)} characters; a certificate CommonName holds at most "
            f"{_CN_MAX} (RFC 5280)"
        )
    if name.strip(".") == "":
        raise InvalidSpecError(f"name {name!r} must not be only dots")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise InvalidSpecError(f"role {role!r} is not one of {ROLES}")


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise InvalidSpecError(f"days must be a positive integer, not {days!r}")


def _subject_alt_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        labels = host.removesuffix(".").split(".")
        if len(host) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
            raise InvalidSpecError(f"host {host!r} is neither an IP address nor a DNS name")
        entries.append(x509.DNSName(host.lower()))
    return x509.SubjectAlternativeName(entries)


def _load_ca(
    pki_dir: Path,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((pki_dir / _CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((pki_dir / _CA_KEY).read_bytes(), password=None)
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
        raise InvalidSpecError(f"{_CA_KEY} and {_CA_CERT} in {pki_dir} do not belong together")
    return cert, key


def _single(name: x509.Name, oid: x509.ObjectIdentifier, label: str) -> str:
    attrs = name.get_attributes_for_oid(oid)
    if len(attrs) != 1 or not isinstance(attrs[0].value, str):
        raise PermissionDeniedError(f"the client certificate must have exactly one {label}")
    return attrs[0].value


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted: the services start unattended; the file's mode (0600) protects the key.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _mkdir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write(path: Path, data: bytes, *, mode: int, exclusive: bool = False) -> None:
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
