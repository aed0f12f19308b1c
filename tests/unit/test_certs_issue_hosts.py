"""`orchestrator certs issue --role orchestrator --host H`: a rotated server certificate names
the hosts the orchestrator serves (without them a site dialling the host would refuse it)."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from orchestrator import cli as orch_cli


def _sans(pem: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    ]


def test_issue_names_the_hosts_of_a_rotated_orchestrator_certificate(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert orch_cli.main(["certs", "init", "--pki-dir", str(pki), "--site", "bank-a"]) == 0
    args = ["certs", "issue", "--pki-dir", str(pki), "--name", "orchestrator"]
    hosts = ["--host", "orch.internal", "--host", "10.0.0.5"]
    assert orch_cli.main([*args, "--role", "orchestrator", *hosts]) == 0
    sans = _sans(pki / "server" / "orchestrator.pem")
    assert "orch.internal" in sans and "10.0.0.5" in sans
