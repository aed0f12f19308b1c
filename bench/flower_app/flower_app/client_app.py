"""ClientApp: one plain softmax-regression SGD step in numpy (trivial work), timed."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

_RNG = np.random.default_rng(0)
_X = _RNG.standard_normal((32, 64)).astype(np.float32)
_Y = _RNG.integers(0, 10, size=32)


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    w, b = arrays[0], arrays[1]  # (10, 64), (10,) like torch.nn.Linear(64, 10)
    logits = _X @ w.T + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(_Y)), _Y] -= 1.0
    p /= len(_Y)
    w = w - 0.1 * (p.T @ _X)
    b = b - 0.1 * p.sum(axis=0)
    train_s = time.perf_counter() - t0
    content = RecordDict(
        {
            "arrays": ArrayRecord([w.astype(np.float32), b.astype(np.float32)]),
            "metrics": MetricRecord({"num-examples": len(_Y), "train-s": train_s}),
        }
    )
    return Message(content=content, reply_to=msg)
