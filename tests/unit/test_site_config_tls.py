"""mTLS is the default for a site: no tls block means the conventional PKI layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.errors import InvalidSpecError
from site_agent.config import SiteConfig, load_site_config

BASE = {
    "site_id": "bank-a",
    "orchestrator": "127.0.0.1:50051",
    "state_dir": "state",
    "datasets": [{"name": "credit", "path": "credit.csv", "label": "default"}],
    "policy": {"max_epsilon": 10.0, "delta": 1e-5, "min_noise_multiplier": 0.5},
}


def test_without_a_tls_block_the_pki_layout_next_to_site_yaml_is_used(tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(BASE))
    cfg = load_site_config(tmp_path / "site.yaml")
    assert cfg.tls is not None and not cfg.insecure
    assert cfg.tls.ca == tmp_path / "pki" / "ca.pem"
    assert cfg.tls.cert == tmp_path / "pki" / "sites" / "bank-a.pem"
    assert cfg.tls.key == tmp_path / "pki" / "sites" / "bank-a.key"


def test_insecure_is_explicit_and_exclusive_with_tls(tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text(yaml.safe_dump({**BASE, "insecure": True}))
    assert load_site_config(tmp_path / "site.yaml").tls is None
    both = {**BASE, "insecure": True, "tls": {"ca": "a", "cert": "b", "key": "c"}}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(both))
    with pytest.raises(InvalidSpecError, match="only one of tls and insecure"):
        load_site_config(tmp_path / "site.yaml")


def test_agent_refuses_to_start_without_tls_material(tmp_path: Path) -> None:
    from site_agent.agent import SiteAgent

    (tmp_path / "credit.csv").write_text("a,default\n1,0\n2,1\n")
    cfg = SiteConfig.model_validate(
        {
            **BASE,
            "state_dir": str(tmp_path / "s"),
            "datasets": [
                {"name": "credit", "path": str(tmp_path / "credit.csv"), "label": "default"}
            ],
        }
    )
    with pytest.raises(InvalidSpecError, match="no TLS material"):
        SiteAgent(cfg)
    # and with the default layout but no files, the error names the missing file
    (tmp_path / "site.yaml").write_text(
        yaml.safe_dump({**BASE, "datasets": cfg.model_dump(mode="json")["datasets"]})
    )
    with pytest.raises(InvalidSpecError, match=r"ca\.pem"):
        SiteAgent(load_site_config(tmp_path / "site.yaml"))
