"""What TLS gives gRPC: credentials for each end (the server requires a client certificate
signed by the deployment's CA) and the verified identity of a caller, taken from its
certificate, never from a field it sends."""

from __future__ import annotations

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from common.errors import PermissionDeniedError
from common.rpc.tls.files import (
    NAME_RE,
    ROLES,
    Identity,
    TlsFiles,
)


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
    if not NAME_RE.fullmatch(name):
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


def _single(name: x509.Name, oid: x509.ObjectIdentifier, label: str) -> str:
    attrs = name.get_attributes_for_oid(oid)
    if len(attrs) != 1 or not isinstance(attrs[0].value, str):
        raise PermissionDeniedError(f"the client certificate must have exactly one {label}")
    return attrs[0].value
