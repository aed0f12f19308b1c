"""Diagnosis of a failed mTLS connection from this end's own files (validity windows, the
issuer against the CA file) and OpenSSL's reason, and what a server certificate states."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from common.rpc.tls.files import TlsFiles


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
