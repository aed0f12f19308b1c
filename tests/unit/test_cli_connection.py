"""The orchestrator CLI's one connection option set (``orchestrator.cli.connection``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from common.errors import InvalidSpecError
from orchestrator.cli import app
from orchestrator.cli.connection import Connection, connected

CONNECTION = {
    "server": ("--server", "DPFED_SERVER"),
    "ca": ("--ca", "DPFED_CA"),
    "cert": ("--cert", "DPFED_CERT"),
    "key": ("--key", "DPFED_KEY"),
    "insecure": ("--insecure", "DPFED_INSECURE"),
}
# Commands that run locally: the server itself and the PKI tools.
LOCAL = {"serve", "certs"}


def test_every_command_that_dials_takes_the_connection_options() -> None:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    dialling = {name: cmd for name, cmd in group.commands.items() if name not in LOCAL}
    assert len(dialling) == 12
    for name, cmd in dialling.items():
        params = {p.name: p for p in cmd.params}
        for param, (flag, env) in CONNECTION.items():
            assert param in params, f"{name} lacks {flag}"
            assert flag in params[param].opts and params[param].envvar == env, name


def test_connected_builds_the_connection_from_options_and_environment(tmp_path: Path) -> None:
    seen: list[Connection] = []
    probe = typer.Typer()

    @probe.command()
    @connected
    def show(job: str, *, conn: Connection, verbose: bool = False) -> None:
        seen.append(conn)
        assert job == "j1" and verbose

    runner = CliRunner()
    res = runner.invoke(
        probe,
        ["j1", "--server", "10.0.0.1:7000", "--cert", str(tmp_path / "c.pem"), "--verbose"],
        env={"DPFED_CA": str(tmp_path / "ca.pem"), "DPFED_KEY": str(tmp_path / "k.pem")},
    )
    assert res.exit_code == 0, res.output
    assert seen == [
        Connection(
            server="10.0.0.1:7000",
            ca=tmp_path / "ca.pem",
            cert=tmp_path / "c.pem",
            key=tmp_path / "k.pem",
            insecure=False,
        )
    ]


def test_a_command_without_conn_is_refused() -> None:
    def plain(job: str) -> None:
        del job

    with pytest.raises(TypeError, match="no conn parameter"):
        connected(plain)


def test_tls_needs_all_three_files() -> None:
    conn = Connection(server="127.0.0.1:1", ca=Path("ca.pem"), cert=None, key=None, insecure=False)
    with pytest.raises(InvalidSpecError, match="--ca, --cert and --key"):
        conn.client()
