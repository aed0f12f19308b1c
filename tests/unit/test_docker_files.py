"""No Docker engine runs here: check statically what can be checked in docker/."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from examples.demo import SITES

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_both_images_exist() -> None:
    assert {p.name for p in DOCKERFILES} == {"orchestrator.Dockerfile", "agent.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_existing_paths_runs_as_non_root_and_pins_cpu_torch(
    dockerfile: Path,
) -> None:
    ins = _instructions(dockerfile)
    ops = [op for op, _ in ins]
    assert ins[0][0] == "FROM" and "slim" in ins[0][1]
    for op, rest in ins:
        if op == "COPY":
            *sources, _dest = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
    user = [rest for op, rest in ins if op == "USER"]
    assert user and user[-1] not in ("root", "0"), "images must run as a non-root user"
    assert "HEALTHCHECK" in ops
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert "torch==2.13.0" in runs and "whl/cpu" in runs
    entry = [rest for op, rest in ins if op == "ENTRYPOINT"][-1]
    script = yaml.safe_load(entry)[0]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert script in scripts, f"ENTRYPOINT {script} is not a console script"


def test_compose_matches_images_ports_and_demo_layout() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"orchestrator", *[s for s, _ in SITES]} <= set(services)
    orch = services["orchestrator"]
    listen = orch["command"][orch["command"].index("--listen") + 1]
    port = listen.rpartition(":")[2]
    exposed = [
        rest for op, rest in _instructions(DOCKER / "orchestrator.Dockerfile") if op == "EXPOSE"
    ]
    assert exposed == [port]
    assert any(p.endswith(f":{port}") and p.startswith("127.0.0.1:") for p in orch["ports"])
    hc = orch["healthcheck"]["test"]
    assert f"127.0.0.1:{port}" in hc and "orchestrator.healthcheck" in hc
    assert (ROOT / "orchestrator" / "healthcheck.py").exists()
    for site, _ in SITES:
        svc = services[site]
        dockerfile = svc["build"]["dockerfile"]
        assert (ROOT / dockerfile).exists()
        assert f"../demo-docker/{site}:/site" in svc["volumes"]
        assert "ports" not in svc, "agents dial out: a site opens no port"
    for svc in services.values():
        if "build" in svc:
            assert (DOCKER / svc["build"]["context"]).resolve() == ROOT
    cli = services["cli"]
    assert cli["environment"]["DPFED_SERVER"] == f"orchestrator:{port}"


def test_prepare_only_writes_what_compose_mounts(tmp_path: Path) -> None:
    from examples.demo import main

    assert (
        main(["--workdir", str(tmp_path / "demo-docker"), "--prepare-only", "orchestrator:50051"])
        == 0
    )
    d = tmp_path / "demo-docker"
    for site, _ in SITES:
        cfg = yaml.safe_load((d / site / "site.yaml").read_text())
        assert cfg["orchestrator"] == "orchestrator:50051"
        # inside the container the site folder is /site and the PKI /pki
        assert cfg["tls"]["ca"] == "../pki/ca.pem" and (d / "pki" / "ca.pem").exists()
        assert (d / site / "digits.csv").exists()
    assert (d / "job.yaml").exists()
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((d / "pki" / "server" / "orchestrator.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "orchestrator" in san.get_values_for_type(x509.DNSName)
