"""``common.rpc.tls``: the PKI issues what the trust model says, and real gRPC mTLS enforces it.

The gRPC cases start a TLS server on 127.0.0.1:0 with the deployment's server certificate
and check who gets in: a site with its certificate (and is seen as that site), but not a
client without a certificate, with a certificate from another CA, or without TLS at all.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.errors import InvalidSpecError, PermissionDeniedError
from common.rpc import tls

SITES = ("bank-a", "bank-b")
WHOAMI = "/dpfed.test.Whoami/Get"
TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tls.TlsFiles]]:
    root = tmp_path_factory.mktemp("pki")
    return root, tls.init_pki(root, sites=SITES)


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.TlsFiles]:
    """A second deployment: same names, different CA."""
    return tls.init_pki(tmp_path_factory.mktemp("other-pki"), sites=SITES)


def _cert(files: tls.TlsFiles) -> x509.Certificate:
    return x509.load_pem_x509_certificate(files.cert.read_bytes())


# --------------------------------------------------------------------------- issuing


def test_init_pki_issues_every_identity(pki: tuple[Path, dict[str, tls.TlsFiles]]) -> None:
    root, files = pki
    assert set(files) == {
        "orchestrator",
        "site:bank-a",
        "site:bank-b",
        "user:operator",
        "user:analyst",
    }
    expected = {
        "orchestrator": tls.Identity("orchestrator", tls.ROLE_ORCHESTRATOR),
        "site:bank-a": tls.Identity("bank-a", tls.ROLE_SITE),
        "site:bank-b": tls.Identity("bank-b", tls.ROLE_SITE),
        "user:operator": tls.Identity("operator", tls.ROLE_OPERATOR),
        "user:analyst": tls.Identity("analyst", tls.ROLE_DATA_SCIENTIST),
    }
    for key, want in expected.items():
        assert tls.identity_from_pem(files[key].cert.read_bytes()) == want
        assert files[key] == tls.files_in(root, name=want.name, role=want.role)
        assert files[key].ca == root / "ca.pem"
    assert files["site:bank-a"].cert == root / "sites" / "bank-a.pem"
    assert files["user:analyst"].key == root / "users" / "analyst.key"
    assert files["orchestrator"].cert == root / "server" / "orchestrator.pem"


def test_certificates_chain_to_the_ca_with_the_right_usages(
    pki: tuple[Path, dict[str, tls.TlsFiles]],
) -> None:
    root, files = pki
    ca = x509.load_pem_x509_certificate((root / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key, leaf_files in files.items():
        leaf = _cert(leaf_files)
        leaf.verify_directly_issued_by(ca)
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert leaf.signature_hash_algorithm is not None
        assert leaf.signature_hash_algorithm.name == "sha256"
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        want = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if key == "orchestrator"
            else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        assert list(eku) == [want]
    san = _cert(files["orchestrator"]).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]


def test_key_files_are_private(pki: tuple[Path, dict[str, tls.TlsFiles]]) -> None:
    root, files = pki
    keys = [root / "ca.key", *(f.key for f in files.values())]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert not list(root.rglob("*.tmp"))


def test_never_overwrites_a_ca(tmp_path: Path) -> None:
    tls.init_ca(tmp_path)
    before = (tmp_path / "ca.key").read_bytes(), (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(InvalidSpecError, match="overwrite"):
        tls.init_ca(tmp_path)
    with pytest.raises(InvalidSpecError, match="overwrite"):
        tls.init_pki(tmp_path, sites=["bank-c"])
    assert ((tmp_path / "ca.key").read_bytes(), (tmp_path / "ca.pem").read_bytes()) == before
    assert not (tmp_path / "sites").exists()


@pytest.mark.parametrize(
    "name",
    ["", "../evil", "a/b", "has space", "bank-a\n", "é", "..", "x" * 65, "x" * 129],
)
def test_bad_names_are_rejected(tmp_path: Path, name: str) -> None:
    tls.init_ca(tmp_path)
    with pytest.raises(InvalidSpecError):
        tls.issue(tmp_path, name=name, role=tls.ROLE_SITE)
    with pytest.raises(InvalidSpecError):
        tls.files_in(tmp_path, name=name, role=tls.ROLE_SITE)
    assert not (tmp_path / "sites").exists()


@pytest.mark.parametrize("role", ["", "admin", "Site", "sites"])
def test_bad_roles_are_rejected(tmp_path: Path, role: str) -> None:
    tls.init_ca(tmp_path)
    with pytest.raises(InvalidSpecError, match="role"):
        tls.issue(tmp_path, name="bank-a", role=role)


def test_init_pki_checks_everything_before_writing(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpecError):
        tls.init_pki(tmp_path / "a", sites=["ok", "not ok"])
    with pytest.raises(InvalidSpecError, match="role"):
        tls.init_pki(tmp_path / "b", sites=["ok"], users=[("eve", tls.ROLE_SITE)])
    with pytest.raises(InvalidSpecError, match="duplicate"):
        tls.init_pki(tmp_path / "c", sites=["ok", "ok"])
    with pytest.raises(InvalidSpecError, match="host"):
        tls.init_pki(tmp_path / "d", sites=["ok"], hosts=["not a host"])
    assert not any(tmp_path.iterdir())


def test_issue_checks_its_inputs(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpecError, match="init_ca"):
        tls.issue(tmp_path, name="bank-a", role=tls.ROLE_SITE)
    tls.init_ca(tmp_path)
    with pytest.raises(InvalidSpecError, match="hosts"):
        tls.issue(tmp_path, name="bank-a", role=tls.ROLE_SITE, hosts=["localhost"])
    with pytest.raises(InvalidSpecError, match="days"):
        tls.issue(tmp_path, name="bank-a", role=tls.ROLE_SITE, days=0)
    with pytest.raises(InvalidSpecError, match="host"):
        tls.issue(tmp_path, name="orch", role=tls.ROLE_ORCHESTRATOR, hosts=["-bad-.example"])


def test_issue_caps_validity_at_the_ca_and_reissues(tmp_path: Path) -> None:
    tls.init_ca(tmp_path, days=30)
    first = tls.issue(tmp_path, name="bank-a", role=tls.ROLE_SITE, days=825)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    assert _cert(first).not_valid_after_utc <= ca.not_valid_after_utc
    old_key = first.key.read_bytes()
    again = tls.issue(tmp_path, name="bank-a", role=tls.ROLE_SITE)
    assert again == first and again.key.read_bytes() != old_key
    assert stat.S_IMODE(again.key.stat().st_mode) == 0o600


def test_custom_hosts_become_sans(tmp_path: Path) -> None:
    tls.init_ca(tmp_path)
    files = tls.issue(
        tmp_path, name="orchestrator", role=tls.ROLE_ORCHESTRATOR, hosts=["10.0.0.5", "Orch.Lan"]
    )
    san = _cert(files).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert san.get_values_for_type(x509.DNSName) == ["orch.lan"]


def test_tls_files_read_names_the_missing_file(pki: tuple[Path, dict[str, tls.TlsFiles]]) -> None:
    root, files = pki
    ca, cert, key = files["site:bank-a"].read()
    assert ca.startswith(b"-----BEGIN CERTIFICATE-----")
    assert cert.startswith(b"-----BEGIN CERTIFICATE-----")
    assert key.startswith(b"-----BEGIN PRIVATE KEY-----")
    missing = tls.files_in(root, name="nobody", role=tls.ROLE_SITE)
    with pytest.raises(InvalidSpecError, match=r"nobody\.pem"):
        missing.read()


# --------------------------------------------------------------------------- identities


def _self_signed(subject: list[x509.NameAttribute[str]]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(subject)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    "subject",
    [
        [x509.NameAttribute(NameOID.COMMON_NAME, "bank-a")],
        [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, tls.ROLE_SITE)],
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "root"),
            x509.NameAttribute(NameOID.COMMON_NAME, "bank-a"),
        ],
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, tls.ROLE_SITE),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, tls.ROLE_OPERATOR),
            x509.NameAttribute(NameOID.COMMON_NAME, "bank-a"),
        ],
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, tls.ROLE_SITE),
            x509.NameAttribute(NameOID.COMMON_NAME, "bank a/../b"),
        ],
    ],
    ids=["no-ou", "no-cn", "unknown-role", "two-roles", "bad-name"],
)
def test_identity_refuses_anything_ambiguous(subject: list[x509.NameAttribute[str]]) -> None:
    with pytest.raises(PermissionDeniedError):
        tls.identity_from_pem(_self_signed(subject))


def test_identity_refuses_garbage() -> None:
    with pytest.raises(PermissionDeniedError):
        tls.identity_from_pem(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


class _FakeContext:
    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


def test_peer_identity_without_a_certificate() -> None:
    with pytest.raises(PermissionDeniedError, match="no client certificate"):
        tls.peer_identity(_FakeContext({}))
    with pytest.raises(PermissionDeniedError, match="no client certificate"):
        tls.peer_identity(_FakeContext({"x509_pem_cert": []}))


# --------------------------------------------------------------------------- real mTLS


@contextmanager
def _mtls_server(server_files: tls.TlsFiles, seen: list[tls.Identity]) -> Iterator[int]:
    """A TLS server with the health service and a ``Whoami`` method that records callers."""

    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        ident = tls.peer_identity(context)
        seen.append(ident)
        return f"{ident.name}|{ident.role}".encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    try:
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "dpfed.test.Whoami", {"Get": grpc.unary_unary_rpc_method_handler(whoami)}
                ),
            )
        )
        port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(server_files))
        assert port > 0
        server.start()
        yield port
    finally:
        server.stop(0)


def _call(channel: grpc.Channel) -> bytes:
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    result: bytes = channel.unary_unary(WHOAMI)(b"", timeout=TIMEOUT_S)
    return result


def _fails_with(make_channel: Callable[[], grpc.Channel]) -> Any:
    with make_channel() as channel, pytest.raises(grpc.RpcError) as info:
        _call(channel)
    return info.value.code()


@pytest.mark.parametrize(
    ("key", "want"),
    [
        ("site:bank-a", tls.Identity("bank-a", tls.ROLE_SITE)),
        ("site:bank-b", tls.Identity("bank-b", tls.ROLE_SITE)),
        ("user:analyst", tls.Identity("analyst", tls.ROLE_DATA_SCIENTIST)),
    ],
)
def test_mtls_client_is_seen_as_its_certificate(
    pki: tuple[Path, dict[str, tls.TlsFiles]], key: str, want: tls.Identity
) -> None:
    _, files = pki
    seen: list[tls.Identity] = []
    with _mtls_server(files["orchestrator"], seen) as port:
        creds = tls.channel_credentials(files[key])
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            assert _call(channel) == f"{want.name}|{want.role}".encode()
    assert seen == [want]


def test_mtls_refuses_a_client_without_a_certificate(
    pki: tuple[Path, dict[str, tls.TlsFiles]],
) -> None:
    _, files = pki
    seen: list[tls.Identity] = []
    ca = files["orchestrator"].ca.read_bytes()
    with _mtls_server(files["orchestrator"], seen) as port:
        code = _fails_with(
            lambda: grpc.secure_channel(
                f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=ca)
            )
        )
    assert code == grpc.StatusCode.UNAVAILABLE
    assert seen == []


def test_mtls_refuses_a_certificate_from_another_ca(
    pki: tuple[Path, dict[str, tls.TlsFiles]], other_pki: dict[str, tls.TlsFiles]
) -> None:
    _, files = pki
    _, foreign_cert, foreign_key = other_pki["site:bank-a"].read()
    # The client trusts the right CA, so only its own (foreign) certificate is at fault.
    creds = grpc.ssl_channel_credentials(
        root_certificates=files["orchestrator"].ca.read_bytes(),
        private_key=foreign_key,
        certificate_chain=foreign_cert,
    )
    seen: list[tls.Identity] = []
    with _mtls_server(files["orchestrator"], seen) as port:
        code = _fails_with(lambda: grpc.secure_channel(f"127.0.0.1:{port}", creds))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert seen == []


def test_mtls_client_refuses_a_server_from_another_ca(
    pki: tuple[Path, dict[str, tls.TlsFiles]], other_pki: dict[str, tls.TlsFiles]
) -> None:
    _, files = pki
    seen: list[tls.Identity] = []
    # An impostor orchestrator with a valid certificate from some other deployment.
    with _mtls_server(other_pki["orchestrator"], seen) as port:
        creds = tls.channel_credentials(files["site:bank-a"])
        code = _fails_with(lambda: grpc.secure_channel(f"127.0.0.1:{port}", creds))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert seen == []


def test_mtls_refuses_plaintext(pki: tuple[Path, dict[str, tls.TlsFiles]]) -> None:
    _, files = pki
    seen: list[tls.Identity] = []
    with _mtls_server(files["orchestrator"], seen) as port:
        code = _fails_with(lambda: grpc.insecure_channel(f"127.0.0.1:{port}"))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert seen == []


def test_mtls_verifies_the_server_host_name(tmp_path: Path) -> None:
    files = tls.init_pki(tmp_path, sites=["bank-a"], hosts=["orchestrator.example"])
    seen: list[tls.Identity] = []
    with _mtls_server(files["orchestrator"], seen) as port:
        creds = tls.channel_credentials(files["site:bank-a"])
        code = _fails_with(lambda: grpc.secure_channel(f"127.0.0.1:{port}", creds))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert seen == []


def test_mtls_refuses_a_server_certificate_used_as_a_client(
    pki: tuple[Path, dict[str, tls.TlsFiles]],
) -> None:
    """Extended key usage is enforced: the orchestrator's serverAuth key cannot dial in."""
    _, files = pki
    seen: list[tls.Identity] = []
    with _mtls_server(files["orchestrator"], seen) as port:
        creds = tls.channel_credentials(files["orchestrator"])
        code = _fails_with(lambda: grpc.secure_channel(f"127.0.0.1:{port}", creds))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert seen == []
