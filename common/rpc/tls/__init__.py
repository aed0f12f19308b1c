"""dpfed's PKI for mutual TLS: who may dial the orchestrator, and who the caller is.

Trust model
-----------
* **One private CA per deployment**, created by the operator with :func:`init_ca`. Its
  certificate (``ca.pem``) is the only root either end trusts: public CAs are never trusted,
  so a certificate bought elsewhere for the same name is worthless here. The CA key
  (``ca.key``, mode 0600) signs everything and should stay with the operator; :func:`init_ca`
  refuses to overwrite it, because a new CA silently invalidates every certificate in use.
* **The orchestrator** holds a server certificate (extended key usage ``serverAuth``) whose
  subject alternative names list the hosts clients dial (by default ``127.0.0.1``, ``::1`` and
  ``localhost``). Clients verify the chain *and* the host name, so they need no overrides.
* **Each site** holds a client certificate (``clientAuth``) whose subject CommonName *is* the
  site id. The orchestrator requires a client certificate on every connection
  (``require_client_auth=True``) and takes the caller's identity from the verified certificate
  (:func:`peer_identity`), never from a field in a request: a site that could name itself
  in a message could spend another site's privacy budget or read its tasks.
* **Each CLI user** holds a client certificate with the role ``operator`` or
  ``data-scientist`` (or ``monitor``, read-only, like the orchestrator's own health probe);
  the orchestrator decides what a caller may do from that role.
* **Revocation.** Every certificate :func:`issue` signs is recorded in ``issued.json``;
  :func:`revoke` (by name: every certificate issued to it; or by serial) adds it to
  ``crl.pem``, an X.509 CRL signed by the CA. The orchestrator checks each caller's serial
  against it on every call (:class:`RevocationList`; gRPC's Python API has no CRL option, so
  the handshake alone would let a revoked certificate in). Certificates are valid for
  :data:`DEFAULT_DAYS` unless told otherwise; rotating is re-issuing, then revoking the old
  serial once the holder uses the new one (``docs/site-operator-guide.md``).

The role is the subject OrganizationalUnitName (OU); the name is the CommonName (CN).
Keys are EC P-256 and signatures ECDSA with SHA-256 (RSA CA keys are also accepted when
signing, with PKCS#1 v1.5 and SHA-256). Names are limited to 64 characters because RFC 5280
bounds CommonName at 64 (``ub-common-name``) and ``cryptography`` enforces that bound.

Layout written under a ``pki_dir`` (:mod:`common.rpc.tls.files`)::

    ca.pem  ca.key                    the deployment's CA
    issued.json  crl.pem              what was issued, what is revoked
    server/orchestrator.pem/.key      ROLE_ORCHESTRATOR
    sites/<site-id>.pem/.key          ROLE_SITE
    users/<user>.pem/.key             ROLE_OPERATOR, ROLE_DATA_SCIENTIST
"""

from __future__ import annotations

from common.rpc.tls.credentials import (
    channel_credentials,
    identity_from_pem,
    peer_identity,
    server_credentials,
)
from common.rpc.tls.diagnosis import (
    expires_in,
    explain_tls_failure,
    server_hosts,
)
from common.rpc.tls.files import (
    CRL_FILE,
    DEFAULT_DAYS,
    DEFAULT_HOSTS,
    ISSUED_FILE,
    ROLE_DATA_SCIENTIST,
    ROLE_MONITOR,
    ROLE_OPERATOR,
    ROLE_ORCHESTRATOR,
    ROLE_SITE,
    ROLES,
    Identity,
    TlsFiles,
    files_in,
)
from common.rpc.tls.issuing import (
    init_ca,
    init_pki,
    issue,
)
from common.rpc.tls.revocation import (
    IssuedCert,
    RevocationList,
    format_serial,
    issued,
    revoke,
    revoked_serials,
)

__all__ = [
    "CRL_FILE",
    "DEFAULT_DAYS",
    "DEFAULT_HOSTS",
    "ISSUED_FILE",
    "ROLES",
    "ROLE_DATA_SCIENTIST",
    "ROLE_MONITOR",
    "ROLE_OPERATOR",
    "ROLE_ORCHESTRATOR",
    "ROLE_SITE",
    "Identity",
    "IssuedCert",
    "RevocationList",
    "TlsFiles",
    "channel_credentials",
    "expires_in",
    "explain_tls_failure",
    "files_in",
    "format_serial",
    "identity_from_pem",
    "init_ca",
    "init_pki",
    "issue",
    "issued",
    "peer_identity",
    "revoke",
    "revoked_serials",
    "server_credentials",
    "server_hosts",
]
