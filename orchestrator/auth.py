"""Who may call what. Identities come from the peer's mTLS certificate, never from a field.

- AgentService: only a certificate with role ``site``; every request's ``site_id`` must be
  the certificate's CommonName, so a site can pull only its own tasks and push only to its own
  slots (the broker checks task ownership against that id).
- ControlService: ``data-scientist`` and ``operator`` may submit, plan, watch, list, pull and
  evaluate; ``monitor`` (the orchestrator's own health probe) may only read job, site and
  ledger views; a job is cancelled by its submitter or an operator; only ``operator`` may
  enable or disable sites.
- A revoked certificate (``common.rpc.tls.RevocationList``) is refused on every call, even on a
  connection opened before it was revoked.

With ``--insecure`` (plaintext, loopback only, for development) there are no certificates:
every caller is trusted with every role and a site is who it says it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from common.errors import PermissionDeniedError
from common.rpc.tls import (
    ROLE_DATA_SCIENTIST,
    ROLE_MONITOR,
    ROLE_OPERATOR,
    ROLE_SITE,
    Identity,
    RevocationList,
    peer_identity,
)

SCIENTIST_OR_OPERATOR = (ROLE_DATA_SCIENTIST, ROLE_OPERATOR)
READERS = (ROLE_DATA_SCIENTIST, ROLE_OPERATOR, ROLE_MONITOR)
OPERATOR_ONLY = (ROLE_OPERATOR,)


@dataclass(frozen=True)
class Authorizer:
    mtls: bool
    revocations: RevocationList | None = None

    def peer(self, context: grpc.ServicerContext) -> Identity:
        """The caller's verified identity, refused if its certificate has been revoked."""
        ident = peer_identity(context)
        if self.revocations is not None:
            self.revocations.check(ident)
        return ident

    def site(self, context: grpc.ServicerContext, claimed_site_id: str) -> str:
        """The calling site's id; refuses a caller that is not that site."""
        if not self.mtls:
            return claimed_site_id
        ident = self.peer(context)
        if ident.role != ROLE_SITE:
            raise PermissionDeniedError(
                f"{ident.name} (role {ident.role}) is not a site: agent calls need a site certificate"
            )
        if claimed_site_id and claimed_site_id != ident.name:
            raise PermissionDeniedError(
                f"certificate is for site {ident.name!r} but the request claims {claimed_site_id!r}"
            )
        return ident.name

    def user(self, context: grpc.ServicerContext, allowed: tuple[str, ...]) -> Identity:
        if not self.mtls:
            return Identity(name="local", role=ROLE_OPERATOR)
        ident = self.peer(context)
        if ident.role not in allowed:
            raise PermissionDeniedError(
                f"{ident.name} has role {ident.role!r}; this call needs {' or '.join(allowed)}"
            )
        return ident

    @staticmethod
    def may_cancel(who: Identity, job_id: str, submitted_by: str) -> None:
        """A job is cancelled by whoever submitted it, or by an operator."""
        if who.role == ROLE_OPERATOR or (submitted_by and who.name == submitted_by):
            return
        raise PermissionDeniedError(
            f"{who.name} may not cancel job {job_id}: only its submitter "
            f"({submitted_by or 'unknown'}) or an operator may"
        )
