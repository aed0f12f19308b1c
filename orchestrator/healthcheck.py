"""`python -m orchestrator.healthcheck ADDR`: exit 0 when the orchestrator's gRPC health
service answers SERVING (used by the Docker HEALTHCHECK and by operators' probes).

Over mTLS it authenticates with the ``healthcheck`` certificate that the orchestrator issues
into its own PKI folder at start-up (role monitor: it can read job, site and ledger views, nothing else).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.rpc.tls import ROLE_MONITOR, channel_credentials, files_in


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("address", help="HOST:PORT of the orchestrator")
    ap.add_argument("--pki-dir", type=Path, help="the orchestrator's PKI folder")
    ap.add_argument("--insecure", action="store_true", help="plaintext (loopback only)")
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args(argv)
    if args.insecure:
        channel = grpc.insecure_channel(args.address)
    elif args.pki_dir is None:
        print("pass --pki-dir or --insecure", file=sys.stderr)
        return 2
    else:
        files = files_in(args.pki_dir, name="healthcheck", role=ROLE_MONITOR)
        # The server certificate names 127.0.0.1/localhost; the probe runs in the same host.
        channel = grpc.secure_channel(args.address, channel_credentials(files))
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=args.timeout
            )
        except grpc.RpcError as err:
            print(f"unhealthy: {err}", file=sys.stderr)
            return 1
    ok = resp.status == health_pb2.HealthCheckResponse.SERVING
    print("SERVING" if ok else health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
