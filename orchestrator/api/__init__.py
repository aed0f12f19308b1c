"""The orchestrator's two gRPC services, kept thin: each call takes a place in its service's
``CallLimiter`` (``call_limits``), checks the caller's role (``orchestrator.auth``), translates
with ``common.rpc.serde``, calls the coordinator, and maps a ``DpfedError`` to its status
(``errors``). ``agent_service``: what a site agent calls; ``control_service``: the CLI's."""
