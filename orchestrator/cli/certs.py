"""`orchestrator certs`: the deployment's certificates (mutual TLS): init, issue, revoke, list."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from common.errors import InvalidSpecError
from common.rpc.tls import DEFAULT_DAYS, ROLES
from orchestrator.cli.formatting import fmt_time, out

app = typer.Typer(no_args_is_help=True, help="The deployment's certificates (mutual TLS).")


@app.command("init")
def certs_init(
    pki_dir: Annotated[Path, typer.Option(help="folder for the CA and certificates")],
    site: Annotated[list[str] | None, typer.Option(help="a site id (repeat)")] = None,
    user: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME:ROLE with ROLE operator, data-scientist or monitor (read-only) (repeat)"
        ),
    ] = None,
    host: Annotated[
        list[str] | None, typer.Option(help="orchestrator host name/IP (repeat)")
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="validity of each certificate")] = DEFAULT_DAYS,
) -> None:
    """Create a CA, the orchestrator's certificate, one per site and one per CLI user."""
    from common.rpc.tls import init_pki

    users: list[tuple[str, str]] = []
    for u in user or ["operator:operator", "analyst:data-scientist"]:
        name, sep, role = u.partition(":")
        if not sep or role not in ROLES:
            raise InvalidSpecError(f"--user {u!r}: expected NAME:ROLE with ROLE in {ROLES}")
        users.append((name, role))
    files = init_pki(
        pki_dir,
        sites=site or [],
        users=users,
        hosts=tuple(host or ("127.0.0.1", "::1", "localhost")),
        days=days,
    )
    t = Table(title=f"certificates in {pki_dir} (keep ca.key offline; give each party its own)")
    for col in ("for", "certificate", "key"):
        t.add_column(col)
    for who, f in files.items():
        t.add_row(who, str(f.cert), str(f.key))
    out.print(t)


@app.command("issue")
def certs_issue(
    pki_dir: Annotated[Path, typer.Option(help="folder holding ca.pem and ca.key")],
    name: Annotated[str, typer.Option(help="site id or user name")],
    role: Annotated[str, typer.Option(help=f"one of {', '.join(ROLES)}")],
    days: Annotated[int, typer.Option(min=1, help="validity of the certificate")] = DEFAULT_DAYS,
    host: Annotated[
        list[str] | None,
        typer.Option(help="orchestrator role only: a host name/IP it serves (repeat)"),
    ] = None,
) -> None:
    """Issue a certificate from an existing CA: a new site or user, or a rotation (the one it
    replaces stays valid until you revoke its serial)."""
    from common.rpc.tls import issue, issued, revoked_serials

    revoked = revoked_serials(pki_dir)
    before = [c for c in issued(pki_dir) if c.name == name and c.serial not in revoked]
    f = issue(pki_dir, name=name, role=role, days=days, hosts=tuple(host or ()))
    new = next(
        c
        for c in issued(pki_dir)
        if c.name == name and c.serial not in revoked and c.serial not in {b.serial for b in before}
    )
    out.print(
        f"{role} {name}: certificate {f.cert} (serial {new.serial_hex}, valid until "
        f"{fmt_time(new.not_after)}), key {f.key}, CA {f.ca}"
    )
    for old in before:
        out.print(
            f"the earlier certificate of {name} (serial {old.serial_hex}) is still valid: once "
            f"{name} uses the new one, run `orchestrator certs revoke --pki-dir {pki_dir} "
            f"{old.serial_hex}`"
        )


@app.command("revoke")
def certs_revoke(
    target: Annotated[str, typer.Argument(help="a name (all its certificates) or a serial")],
    pki_dir: Annotated[Path, typer.Option(help="folder holding ca.pem and ca.key")],
) -> None:
    """Revoke certificates: the orchestrator refuses them from its next call on (crl.pem)."""
    from common.rpc.tls import CRL_FILE, revoke

    done = revoke(pki_dir, target)
    if not done:
        out.print(f"{target}: already revoked")
    for c in done:
        out.print(f"revoked {c.role} {c.name} (serial {c.serial_hex}) in {pki_dir / CRL_FILE}")


@app.command("list")
def certs_list(
    pki_dir: Annotated[Path, typer.Option(help="folder holding ca.pem and issued.json")],
) -> None:
    """Every certificate the CA issued: name, role, serial, expiry, revoked or not."""
    from common.rpc.tls import issued, revoked_serials

    revoked = revoked_serials(pki_dir)
    t = Table(title=f"certificates issued by the CA in {pki_dir}")
    for col in ("name", "role", "serial", "valid until", "status"):
        t.add_column(col)
    now = dt.datetime.now().timestamp()
    for c in sorted(issued(pki_dir), key=lambda c: (c.name, c.not_after)):
        status = "revoked" if c.serial in revoked else "expired" if c.not_after <= now else "valid"
        t.add_row(c.name, c.role, c.serial_hex, fmt_time(c.not_after), status)
    out.print(t)
