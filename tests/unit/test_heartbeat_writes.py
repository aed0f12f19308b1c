"""Heartbeats keep liveness in memory and write the site's row only when something changed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator import coordinator as coordinator_module
from orchestrator.coordinator import Coordinator
from tests.unit.test_serde import CREDIT, REGISTRATION


def test_heartbeats_write_the_store_only_when_datasets_change_or_rarely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = Coordinator(tmp_path)
    try:
        session = c.register(REGISTRATION)
        writes: list[str] = []
        original = c.store.touch_site

        def counting(site_id: str, **kw: object) -> None:
            writes.append(site_id)
            original(site_id, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(c.store, "touch_site", counting)
        datasets = list(REGISTRATION.datasets)
        for _ in range(5):
            assert c.heartbeat("bank-a", session, state="training", datasets=datasets)
        assert writes == []  # registration wrote these datasets; nothing stored changed
        # State and liveness come from memory all the same.
        (status,) = c.sites()
        assert status.state == "training"

        changed = [replace(CREDIT, epsilon_spent=CREDIT.epsilon_spent + 1.0), *datasets[1:]]
        assert c.heartbeat("bank-a", session, state="idle", datasets=changed)
        assert len(writes) == 1  # a dataset's spend changed: written at once
        stored = c.store.site("bank-a")
        assert stored is not None and stored.datasets[0]["epsilon_spent"] == pytest.approx(
            CREDIT.epsilon_spent + 1.0
        )

        monkeypatch.setattr(coordinator_module, "PERSIST_LAST_SEEN_S", 0.0)
        assert c.heartbeat("bank-a", session, state="idle", datasets=changed)
        assert len(writes) == 2  # last seen is refreshed in the store now and then

        assert not c.heartbeat("bank-a", "not-the-session", state="idle", datasets=changed)
        assert len(writes) == 2
    finally:
        c.stop()
