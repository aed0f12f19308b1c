"""Every command line and YAML example the README and the site operator's guide show works.

The shell blocks of the docs are what a new user types first; a renamed command or option
would leave them a usage error. Each line starting with ``orchestrator`` or ``site-agent`` is
resolved against the CLI's click tree (subcommands first, then options), and options named in
the comments under it (``# --insecure: ...``) are checked against the same command. Each
``yaml`` block loads as a site config or parses as a job spec; a fragment (a block that shows
one more key) is checked merged into the example it extends.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml

from common.specs import parse_any_job_spec
from orchestrator.cli import app as orchestrator_app
from site_agent.cli import app as agent_app
from site_agent.config import load_site_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "README.md", ROOT / "docs" / "site-operator-guide.md")
PROGRAMS = {"orchestrator": orchestrator_app, "site-agent": agent_app}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _shell_commands() -> list[tuple[str, str, list[str]]]:
    """(where, command line, options named in its comments) for each documented command."""
    found: list[tuple[str, str, list[str]]] = []
    for doc in DOCS:
        in_block = False
        pending = ""
        flags: list[str] | None = None  # the comment options of the command just above
        for n, raw in enumerate(doc.read_text().splitlines(), 1):
            if raw.startswith("```"):
                in_block = raw.strip() in ("```bash", "```sh", "```console")
                flags = None
                continue
            if not in_block:
                continue
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            code, _, comment = line.partition("#")
            if code.split()[:1] and code.split()[0] in PROGRAMS:
                flags = FLAG.findall(comment)
                found.append((f"{doc.name}:{n}", code.strip(), flags))
            elif not code.strip() and flags is not None:
                flags.extend(FLAG.findall(comment))  # a comment line under a command
            else:
                flags = None  # another command: its comments are not this one's
    return found


COMMANDS = _shell_commands()


def _resolve(tokens: list[str]) -> click.Command:
    cmd: click.Command = typer.main.get_command(PROGRAMS[tokens[0]])
    for token in tokens[1:]:
        if isinstance(cmd, click.Group) and token in cmd.commands:
            cmd = cmd.commands[token]
        else:
            break
    return cmd


def _options(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


def test_the_docs_show_the_main_commands() -> None:
    shown = {" ".join(shlex.split(c)[:2]) for _, c, _ in COMMANDS}
    for expected in ("orchestrator serve", "orchestrator launch", "site-agent serve"):
        assert expected in shown


@pytest.mark.parametrize(
    ("where", "line", "comment_flags"), COMMANDS, ids=[w for w, _, _ in COMMANDS]
)
def test_a_documented_command_and_its_options_exist(
    where: str, line: str, comment_flags: list[str]
) -> None:
    tokens = shlex.split(line)
    cmd = _resolve(tokens)
    assert not isinstance(cmd, click.Group), f"{where}: '{line}' names no command"
    known = _options(cmd)
    named = [t.split("=")[0] for t in tokens if t.startswith("--")] + comment_flags
    unknown = [o for o in named if o not in known]
    assert not unknown, f"{where}: {cmd.name} has no option {unknown} ('{line}')"


def _yaml_blocks() -> list[tuple[str, dict[str, Any]]]:
    blocks: list[tuple[str, dict[str, Any]]] = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"```yaml\n(.*?)```", text, re.S):
            where = f"{doc.name}:{text[: m.start()].count(chr(10)) + 1}"
            data = yaml.safe_load(m.group(1))
            assert isinstance(data, dict), f"{where}: not a YAML mapping"
            blocks.append((where, data))
    return blocks


BLOCKS = _yaml_blocks()


def test_every_documented_site_yaml_loads(tmp_path: Path) -> None:
    sites = [(w, d) for w, d in BLOCKS if "site_id" in d]
    assert len(sites) >= 2  # the README's and the operator guide's
    for where, data in sites:
        path = tmp_path / "site.yaml"
        path.write_text(yaml.safe_dump(data))
        cfg = load_site_config(path)
        assert cfg.site_id == data["site_id"], where
    # a fragment that only shows `datasets:` (another source kind) fits the README's site.yaml
    base = dict(sites[0][1])
    for where, data in BLOCKS:
        if set(data) == {"datasets"}:
            path = tmp_path / "fragment.yaml"
            path.write_text(yaml.safe_dump({**base, **data}))
            assert load_site_config(path).datasets, where


def test_every_documented_job_yaml_parses() -> None:
    jobs = [(w, d) for w, d in BLOCKS if "dataset" in d and "site_id" not in d]
    assert {d.get("kind", "train") for _, d in jobs} >= {"train", "gmm"}
    for where, data in jobs:
        parse_any_job_spec(data, source=where)
    # a fragment of extra keys (e.g. `bootstrap:`) fits the mixture job shown before it
    gmm = next(d for _, d in jobs if d.get("kind") == "gmm")
    for where, data in BLOCKS:
        if "dataset" not in data and "site_id" not in data and "datasets" not in data:
            parse_any_job_spec({**gmm, **data}, source=where)


ARCHITECTURE = ROOT / "docs" / "architecture.md"
PATH_IN_TICKS = re.compile(r"`([\w.-]+(?:/[\w.-]+)*/(?:[\w.-]+\.(?:py|proto|md))?)`")


def test_the_architecture_map_names_only_paths_that_exist() -> None:
    named = set(PATH_IN_TICKS.findall(ARCHITECTURE.read_text()))
    # the map shows where a round happens, where ε is computed and where the boundary is
    for expected in (
        "orchestrator/training/rounds.py",
        "common/dp/accounting.py",
        "site_agent/boundary/pipeline.py",
    ):
        assert expected in named, f"docs/architecture.md no longer names {expected}"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"
