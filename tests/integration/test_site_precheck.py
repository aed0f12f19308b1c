"""Issue 17.4 over real mTLS gRPC: a site checks a task against its policy and its declared
schema from the spec alone, before it downloads or builds the model.

A rogue orchestrator (the deployment's own server certificate) hands an agent train tasks
whose specs a site must refuse: a 32 × 65,536 MLP (17 GiB if it were built), a model kind
the policy does not allow, σ below the policy's floor, an encoding that declares a column
differently from the site. Each is refused with a policy or spec reason that names the
problem (never "INTERNAL … RuntimeError"), no model is ever downloaded, nothing is charged,
and the agent keeps serving.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from common.rpc.tls import server_credentials
from protos.dpfed.v1 import dpfed_pb2 as pb
from protos.dpfed.v1 import dpfed_pb2_grpc as pb_grpc
from site_agent.agent import SiteAgent
from site_agent.config import load_site_config
from tests.integration.test_hostile_parties import Pki, _site_yaml, _task, pki

__all__ = ["pki"]  # the fixture, shared with the hostile-party tests

ENCODING = {
    "features": [
        {"name": "f0", "type": "numeric", "nullable": True, "min": 0.0, "max": 1.0},
        {"name": "f1", "type": "numeric", "nullable": True, "min": 0.0, "max": 1.0},
    ],
    "label": {"name": "label", "classes": ["0", "1"]},
}


def _spec(**over: Any) -> str:
    spec: dict[str, Any] = {
        "dataset": "toy",
        "model": {"kind": "mlp", "hidden": [8]},
        "rounds": 1,
        "batch_size": 8,
        "local_steps": 1,
        "dp": {"noise_multiplier": 1.0},
        "encoding": ENCODING,
        **over,
    }
    return json.dumps(spec)


DISAGREEING = json.loads(json.dumps(ENCODING))
DISAGREEING["features"][1]["max"] = 2.0

TASKS = {
    "t-huge": _spec(model={"kind": "mlp", "hidden": [65_536] * 32}),
    "t-kind": _spec(model={"kind": "cnn1d", "input_shape": [1, 4], "conv": [{"channels": 2}]}),
    "t-sigma": _spec(),
    "t-schema": _spec(encoding=DISAGREEING),
}


class Rogue(pb_grpc.AgentServiceServicer):
    def __init__(self) -> None:
        self.tasks = [
            _task(
                tid,
                job_spec_json=spec,
                noise_multiplier=0.1 if tid == "t-sigma" else 1.0,
                model_size=17 * 2**30,
            )
            for tid, spec in TASKS.items()
        ]
        self.failures: queue.Queue[pb.TaskFailure] = queue.Queue()
        self.downloads = 0

    def Register(self, request: pb.RegisterRequest, context: Any) -> pb.RegisterResponse:
        return pb.RegisterResponse(session_id="s-1", heartbeat_seconds=5.0)

    def PullTask(self, request: pb.PullTaskRequest, context: Any) -> pb.PullTaskResponse:
        if self.tasks:
            return pb.PullTaskResponse(task=self.tasks.pop(0))
        time.sleep(0.05)
        return pb.PullTaskResponse()

    def FetchModel(self, request: pb.FetchModelRequest, context: Any) -> Iterator[pb.Chunk]:
        self.downloads += 1
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no model here")
        raise AssertionError("unreachable")

    def ReportFailure(self, request: pb.TaskFailure, context: Any) -> pb.ReportFailureResponse:
        self.failures.put(request)
        return pb.ReportFailureResponse()

    def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(known=True)


@pytest.fixture
def rogue(pki: Pki) -> Iterator[tuple[Rogue, str]]:
    servicer = Rogue()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(pki.files["orchestrator"]))
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_tasks_the_policy_or_schema_refuses_are_refused_before_any_download(
    pki: Pki, tmp_path: Path, rogue: tuple[Rogue, str]
) -> None:
    servicer, address = rogue
    path = _site_yaml(tmp_path, pki, "bank-a", address)
    cfg = yaml.safe_load(path.read_text())
    cfg["policy"]["allowed_models"] = ["linear", "mlp"]
    path.write_text(yaml.safe_dump(cfg))
    agent = SiteAgent(load_site_config(path))
    worker = threading.Thread(target=agent.run, daemon=True)
    worker.start()
    try:
        reasons = {}
        for _ in TASKS:
            f = servicer.failures.get(timeout=20)
            reasons[f.task_id] = (f.code, f.reason)
        code, reason = reasons["t-huge"]
        assert code == "FAILED_PRECONDITION" and "parameters" in reason, reason
        code, reason = reasons["t-kind"]
        assert code == "FAILED_PRECONDITION" and "'cnn1d' is not allowed" in reason, reason
        code, reason = reasons["t-sigma"]
        assert code == "FAILED_PRECONDITION" and "σ=0.1" in reason, reason
        code, reason = reasons["t-schema"]
        assert code == "INVALID_ARGUMENT" and "'f1'" in reason, reason
        assert all("INTERNAL" not in c and "RuntimeError" not in r for c, r in reasons.values())
        assert servicer.downloads == 0
        assert worker.is_alive() and agent.fatal is None
        assert {e.kind for e in agent.ledger.entries()} <= {"catalog"}
    finally:
        agent.stop()
        worker.join(timeout=10)
        agent.close()
