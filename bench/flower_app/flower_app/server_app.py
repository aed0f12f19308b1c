"""ServerApp: Flower's own FedAvg (training only), each round's wall time written to a file."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round starts and ends, and the clients' train time."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.rounds: list[dict[str, float]] = []
        self._t0 = 0.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._t0 = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        out = super().aggregate_train(server_round, replies)
        train_s = [float(r.content["metrics"]["train-s"]) for r in replies if r.has_content()]
        self.rounds.append(
            {
                "round": server_round,
                "duration_s": time.perf_counter() - self._t0,
                "max_train_s": max(train_s, default=0.0),
                "replies": len(train_s),
            }
        )
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n = int(cfg["min-nodes"])
    strategy = TimedFedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=n,
        min_available_nodes=n,
    )
    init = ArrayRecord([np.zeros((10, 64), np.float32), np.zeros(10, np.float32)])
    strategy.start(grid=grid, initial_arrays=init, num_rounds=int(cfg["num-server-rounds"]))
    out = str(cfg["timings-file"])
    if out:
        with open(out, "w") as f:
            json.dump(strategy.rounds, f)
