"""Prometheus metrics on an opt-in HTTP port (``orchestrator serve --metrics-listen``).

Counters that only the transport sees (bytes in/out, RPCs) are incremented by the servicers;
everything the store already knows (rounds, round time, refusals, ε per job and site, jobs by
state) is read from it at scrape time, so the numbers survive restarts and cannot drift from
the source of truth. Text exposition format 0.0.4, no client library needed.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from common.rpc.transport import split_address
from orchestrator.core.store import Store

_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


class Counters:
    """Monotonic counters keyed by (name, labels), safe across gRPC worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] += amount

    def snapshot(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with self._lock:
            return dict(self._values)


COUNTERS = Counters()

_HELP = {
    "dpfed_bytes_received_total": "Bytes of model updates received from sites.",
    "dpfed_bytes_sent_total": "Bytes of global models and released models sent.",
    "dpfed_rpcs_total": "RPCs handled, by method and status.",
}


def _number(value: float) -> str:
    """A sample value at full precision, in the exposition format's spelling of the specials."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(store: Store) -> str:
    """The whole exposition: transport counters plus what the store knows."""
    lines: list[str] = []
    by_name: dict[str, list[str]] = defaultdict(list)
    for (name, labels), value in sorted(COUNTERS.snapshot().items()):
        by_name[name].append(f"{name}{_labels(dict(labels))} {_number(value)}")
    for name, samples in by_name.items():
        lines += [f"# HELP {name} {_HELP.get(name, name)}", f"# TYPE {name} counter", *samples]

    jobs = store.jobs()
    states: dict[str, int] = defaultdict(int)
    for j in jobs:
        states[j.state] += 1
    lines += ["# HELP dpfed_jobs Jobs by state.", "# TYPE dpfed_jobs gauge"]
    lines += [f'dpfed_jobs{{state="{s}"}} {n}' for s, n in sorted(states.items())]

    lines += [
        "# HELP dpfed_rounds_total Rounds completed.",
        "# TYPE dpfed_rounds_total counter",
        f"dpfed_rounds_total {sum(j.round for j in jobs)}",
        "# HELP dpfed_round_seconds Duration of completed rounds.",
        "# TYPE dpfed_round_seconds summary",
    ]
    durations = [r.duration_s for j in jobs for r in store.rounds(j.job_id)]
    lines += [
        f"dpfed_round_seconds_sum {sum(durations):.6f}",
        f"dpfed_round_seconds_count {len(durations)}",
    ]
    refusals = sum(
        1
        for j in jobs
        for e in store.events(j.job_id)
        if e.level == "warning" and " refused round " in e.message
    )
    lines += [
        "# HELP dpfed_refusals_total Tasks refused by a site's policy.",
        "# TYPE dpfed_refusals_total counter",
        f"dpfed_refusals_total {refusals}",
        "# HELP dpfed_job_epsilon Released or current ε of each job (max over sites).",
        "# TYPE dpfed_job_epsilon gauge",
    ]
    lines += [
        f"dpfed_job_epsilon{_labels({'job': j.job_id, 'dataset': j.dataset})} {_number(j.epsilon)}"
        for j in jobs
        if j.epsilon > 0
    ]
    lines += [
        "# HELP dpfed_dataset_epsilon_spent Lifetime ε each site reports for each dataset.",
        "# TYPE dpfed_dataset_epsilon_spent gauge",
    ]
    for s in store.sites():
        for d in s.datasets:
            lab = _labels({"site": s.site_id, "dataset": str(d.get("name", ""))})
            spent = _number(float(d.get("epsilon_spent", 0.0)))
            lines.append(f"dpfed_dataset_epsilon_spent{lab} {spent}")
    return "\n".join(lines) + "\n"


class MetricsServer:
    """A tiny HTTP server answering GET /metrics; stopped with the orchestrator."""

    def __init__(self, listen: str, store: Store) -> None:
        host, port = split_address(listen)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = render(outer.store).encode()
                self.send_response(200)
                self.send_header("Content-Type", _CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.store = store
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
