"""Issuing: the deployment's CA (:func:`init_ca`), a certificate for a name in a role
(:func:`issue`; server certificates name the hosts they serve), and a whole PKI at once
(:func:`init_pki`). Keys are EC P-256, signatures ECDSA with SHA-256."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import InvalidSpecError
from common.rpc.tls.files import (
    BACKDATE,
    CA_CERT,
    CA_KEY,
    CN_MAX,
    DEFAULT_DAYS,
    DEFAULT_HOSTS,
    ROLE_DATA_SCIENTIST,
    ROLE_OPERATOR,
    ROLE_ORCHESTRATOR,
    ROLE_SITE,
    USER_ROLES,
    TlsFiles,
    check_days,
    check_name,
    check_role,
    files_in,
    key_pem,
    load_ca,
    make_private_dir,
    write_file,
)
from common.rpc.tls.revocation import (
    IssuedCert,
    record_issued,
)

_DNS_LABEL_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?")


def init_ca(pki_dir: Path, *, common_name: str = "dpfed CA", days: int = 3650) -> None:
    """Create the deployment's CA: ``pki_dir/ca.pem`` and ``pki_dir/ca.key`` (mode 0600).

    Refuses if ``ca.key`` exists: replacing a CA would invalidate every certificate already
    handed to sites and users, and losing the old key cannot be undone.
    """
    check_days(days)
    if not 1 <= len(common_name) <= CN_MAX:
        raise InvalidSpecError(f"CA common name must be 1 to {CN_MAX} characters")
    key_path = pki_dir / CA_KEY
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
        .not_valid_before(now - BACKDATE)
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

    make_private_dir(pki_dir)
    # O_EXCL claims the CA atomically: of two concurrent init_ca calls, one fails.
    write_file(key_path, key_pem(key), mode=0o600, exclusive=True)
    write_file(pki_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


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
    check_name(name)
    check_role(role)
    check_days(days)
    if role == ROLE_ORCHESTRATOR:
        san = _subject_alt_names(hosts or DEFAULT_HOSTS)
    elif hosts:
        raise InvalidSpecError(f"hosts apply only to the {ROLE_ORCHESTRATOR} certificate")
    ca_cert, ca_key = load_ca(pki_dir)

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
        .not_valid_before(now - BACKDATE)
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
    make_private_dir(files.cert.parent)
    # Key first: a certificate on disk without its key would look usable and is not.
    write_file(files.key, key_pem(key), mode=0o600)
    write_file(files.cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    record_issued(pki_dir, [IssuedCert.of(cert)])
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
        check_name(site)
    for user, role in users:
        check_name(user)
        if role not in USER_ROLES:
            raise InvalidSpecError(
                f"user {user!r} has role {role!r}; a user's role must be one of {USER_ROLES}"
            )
    for label, names in (("site", list(sites)), ("user", [u for u, _ in users])):
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InvalidSpecError(f"duplicate {label} names: {', '.join(dupes)}")
    if not hosts:
        raise InvalidSpecError("the orchestrator certificate needs at least one host")
    _subject_alt_names(hosts)

    check_days(days)

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
