"""Who may call what. Identities come from the peer's mTLS certificate, never from a field.

- AgentService: only a certificate with role ``site``; every request's ``site_id`` must be
  the certificate's CommonName, so a site can pull only its own tasks and push only to its own
  slots (the broker checks task ownership against that id).
- ControlService: ``data-scientist`` and ``operator`` may submit, plan, watch, list, pull and
  cancel; only ``operator`` may enable or disable sites.

With ``--insecure`` (plaintext, loopback only, for development) there are no certificates:
every caller is trusted with every role and a site is who it says it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from common.errors import PermissionDeniedError
from common.tls import (
    ROLE_DATA_SCIENTIST,
    ROLE_OPERATOR,
    ROLE_SITE,
    Identity,
    peer_identity,
)

SCIENTIST_OR_OPERATOR = (ROLE_DATA_SCIENTIST, ROLE_OPERATOR)
OPERATOR_ONLY = (ROLE_OPERATOR,)


@dataclass(frozen=True)
class Authorizer:
    mtls: bool

    def site(self, context: grpc.ServicerContext, claimed_site_id: str) -> str:
        """The calling site's id; refuses a caller that is not that site."""
        if not self.mtls:
            return claimed_site_id
        ident = peer_identity(context)
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
        ident = peer_identity(context)
        if ident.role not in allowed:
            raise PermissionDeniedError(
                f"{ident.name} has role {ident.role!r}; this call needs {' or '.join(allowed)}"
            )
        return ident
