"""``orchestrator pull`` writes what the job's kind released (``orchestrator.jobs.kinds``)."""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from common.errors import InvalidSpecError
from orchestrator import cli
from orchestrator.cli.connection import Connection


class _Client:
    def __init__(self, card: dict[str, Any], weights: bytes) -> None:
        self.card, self.weights = json.dumps(card), weights

    def __enter__(self) -> _Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def download(self, job_id: str) -> tuple[str, bytes]:
        assert job_id == "job-1"
        return self.card, self.weights


def _pull(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, card: dict[str, Any]
) -> tuple[int, Path]:
    monkeypatch.setattr(Connection, "client", lambda self: _Client(card, b"released"))
    out = tmp_path / "out"
    return cli.main(["pull", "job-1", "--out", str(out), "--insecure"]), out


def test_a_trained_model_is_written_as_safetensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    card = {"kind": "train", "epsilon": 1.5, "delta": 1e-5}
    code, out = _pull(tmp_path, monkeypatch, card)
    assert code == 0
    assert (out / "model.safetensors").read_bytes() == b"released"
    assert json.loads((out / "model_card.json").read_text()) == card
    assert "load_model(" in capsys.readouterr().err


def test_a_spec_without_a_kind_is_a_trained_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = _pull(tmp_path, monkeypatch, {"epsilon": 1.0, "delta": 1e-5})
    assert code == 0 and (out / "model.safetensors").exists()


def test_a_mixture_is_written_as_json_with_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    card = {"kind": "gmm", "epsilon": 2.0, "delta": 1e-6, "model": {"K": 3}}
    code, out = _pull(tmp_path, monkeypatch, card)
    assert code == 0
    assert (out / "mixture.json").read_bytes() == b"released"
    assert not (out / "model.safetensors").exists()
    err = capsys.readouterr().err
    assert "K = 3" in err and "load_mixture(" in err


def test_a_kind_that_releases_no_model_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _pull(tmp_path, monkeypatch, {"kind": "synth", "epsilon": 1.0, "delta": 1e-5})
    assert code == InvalidSpecError.exit_code
    assert "releases no model" in capsys.readouterr().err
    assert not (out / "model_card.json").exists()
