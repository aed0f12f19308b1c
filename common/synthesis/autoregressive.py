"""An autoregressive model of encoded rows: densities, log-likelihood and sampling.

:class:`AutoregressiveNet` factorises ``p(x, y) = Π_j p(x_j | x_<j) · p(y | x)`` over the
encoded feature columns then the label (MADE / NADE), each conditional a histogram density on a
numeric column's declared range or a softmax over a categorical column's slots; its
:meth:`~AutoregressiveNet.log_prob` is the DP-SGD training loss. :func:`sample_encoded` draws
ancestrally from a seeded numpy generator and :func:`decode` writes the declared schema:
post-processing of the released weights. The densities and their sources:
``docs/synthesis.md``, "The autoregressive synthesizer".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from torch import Tensor, nn

from common.errors import InvalidSpecError
from common.schema.encoding import FeatureEncoding
from common.synthesis.autoregressive_spec import AutoregressiveSpec


@dataclass(frozen=True)
class _Column:
    start: int
    """First slot of the column in the encoded row."""
    width: int
    type: str
    slots: int
    nullable: bool
    outcomes: int
    """Outputs of the column's head: bins (+ missing) or the categorical slots."""


def _layout(spec: AutoregressiveSpec) -> list[_Column]:
    out, start = [], 0
    for c in spec.columns:
        if c.type == "numeric":
            outcomes = spec.bins + (1 if c.nullable else 0)
        else:
            outcomes = c.slots
        out.append(_Column(start, c.width, c.type, c.slots, c.nullable, outcomes))
        start += c.width
    return out


def _head(in_features: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out))


def _dims(spec: AutoregressiveSpec) -> tuple[int, int]:
    if spec.input_dim is None or spec.num_classes is None:
        raise InvalidSpecError(
            "model.input_dim and model.num_classes are not set; the orchestrator derives them "
            "from the sites' declared schemas when the job is submitted."
        )
    return spec.input_dim, spec.num_classes


def count_parameters(spec: AutoregressiveSpec) -> int:
    """Parameters :class:`AutoregressiveNet` has for ``spec``, without building it."""
    _, classes = _dims(spec)
    h = spec.hidden
    width = sum(c.width for c in spec.columns)
    total = (1 + width) * h + h + h * classes + classes
    for col in _layout(spec):
        total += (1 + col.start) * h + h + h * col.outcomes + col.outcomes
    return total


class AutoregressiveNet(nn.Module):
    """``Π_j p(x_j | x_<j) · p(y | x)`` over encoded rows (see the module docstring).

    ``forward(x)`` returns the label's logits ``p(y | x)`` ``(N, C)``, so the module keeps the
    zoo's "rows in, logits out" contract (it is also a classifier); the training loss is
    ``-log_prob(x, y)``.
    """

    def __init__(self, spec: AutoregressiveSpec) -> None:
        super().__init__()
        _, self.num_classes = _dims(spec)
        self.bins = spec.bins
        self.columns = _layout(spec)
        # Head 0 is the label's, on the constant 1 and every slot; head j+1 reads the
        # constant and the slots of columns 0..j-1.
        width = sum(col.width for col in self.columns)
        heads = [_head(1 + width, spec.hidden, self.num_classes)]
        for col in self.columns:
            heads.append(_head(1 + col.start, spec.hidden, col.outcomes))
        self.heads = nn.ModuleList(heads)

    @staticmethod
    def _context(x: Tensor) -> Tensor:
        ones = torch.ones((x.shape[0], 1), dtype=x.dtype, device=x.device)
        return torch.cat([ones, x], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.heads[0](self._context(x))  # type: ignore[no-any-return]

    def column_log_probs(self, x: Tensor, y: Tensor) -> Tensor:
        """``(N, 1 + D)``: ``log p(y | x)`` then each column's ``log p(x_j | x_<j)``, the
        numeric ones as densities of the encoded position on ``[0, 1]``."""
        z = self._context(x)
        outs = [torch.log_softmax(self.heads[0](z), dim=1).gather(1, y[:, None])]
        for col, head in zip(self.columns, self.heads[1:], strict=True):
            logp = torch.log_softmax(head(z[:, : 1 + col.start]), dim=1)
            target, extra = self._target(x, col)
            outs.append(logp.gather(1, target[:, None]) + extra[:, None])
        return torch.cat(outs, dim=1)

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        """``(N,)`` log-likelihood of each encoded row and label."""
        return self.column_log_probs(x, y).sum(dim=1)

    def _target(self, x: Tensor, col: _Column) -> tuple[Tensor, Tensor]:
        """The outcome index of each row in ``col`` and the log-density term it adds."""
        part = torch.nan_to_num(x[:, col.start : col.start + col.width], nan=0.0)
        if col.type == "categorical":
            return part.argmax(dim=1), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        u = (part[:, : col.slots].sum(dim=1) / col.slots).clamp(0.0, 1.0)
        b = (u * self.bins).floor().clamp(max=self.bins - 1).to(torch.int64)
        dens = torch.full_like(u, math.log(self.bins))
        if not col.nullable:
            return b, dens
        missing = part[:, col.slots] > 0.5
        return torch.where(missing, self.bins, b), torch.where(missing, 0.0, dens)


def _draw(probs: npt.NDArray[np.float64], rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """One outcome per row of ``probs`` by inverse CDF."""
    cum = np.cumsum(probs, axis=1)
    r = np.asarray(rng.random(probs.shape[0]))[:, None] * cum[:, -1:]
    idx = np.asarray((cum <= r).sum(axis=1), dtype=np.int64)
    out: npt.NDArray[np.int64] = np.minimum(idx, probs.shape[1] - 1)
    return out


def _probs(logits: Tensor, allowed: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.float64]:
    lg = logits.to(torch.float64)
    if allowed is not None:
        mask = torch.from_numpy(~allowed)
        lg = lg.masked_fill(mask[None, :], -math.inf)
    return torch.softmax(lg, dim=1).numpy()


def sample_encoded(
    net: AutoregressiveNet, rows: int, rng: np.random.Generator
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """``rows`` encoded rows ``(rows, width)`` and labels, drawn ancestrally with ``rng``."""
    width = sum(col.width for col in net.columns)
    z = torch.zeros((rows, 1 + width), dtype=torch.float32)
    z[:, 0] = 1.0
    net.eval()
    with torch.no_grad():
        for col, head in zip(net.columns, net.heads[1:], strict=True):
            logits = head(z[:, : 1 + col.start])
            s = 1 + col.start
            if col.type == "categorical":
                allowed = np.ones(col.slots, dtype=bool)
                allowed[col.slots - 2] = False  # "other": no declared value to write
                allowed[col.slots - 1] = col.nullable
                code = _draw(_probs(logits, allowed), rng)
                z[torch.arange(rows), s + torch.from_numpy(code)] = 1.0
                continue
            out = _draw(_probs(logits), rng)
            missing = out == net.bins
            u = (np.minimum(out, net.bins - 1) + rng.random(rows)) / net.bins
            z[:, s : s + col.slots] = torch.from_numpy(_position_slots(u, col.slots))
            if col.nullable:
                z[torch.from_numpy(missing), s : s + col.slots] = 0.0
                z[:, s + col.slots] = torch.from_numpy(missing.astype(np.float32))
        y = _draw(_probs(net.heads[0](z)), rng)
    return z[:, 1:].numpy().copy(), y


def _position_slots(u: npt.NDArray[np.float64], slots: int) -> npt.NDArray[np.float32]:
    """The value slots of position ``u``: ``u`` itself (one slot), or the piecewise-linear
    slots of ``T`` equal bins of the quantile scale (slot ``t`` is ``clip(uT - t, 0, 1)``)."""
    if slots == 1:
        return u[:, None].astype(np.float32)
    t = np.arange(slots, dtype=np.float64)
    return np.clip(u[:, None] * slots - t[None, :], 0.0, 1.0).astype(np.float32)


def decode(
    encoding: FeatureEncoding, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]
) -> pd.DataFrame:
    """The table of encoded rows under the declared schema: numbers as float64 within their
    bounds (NaN missing), categories as their declared strings (None missing, "other" too),
    the label's class names last.

    Raises:
        InvalidSpecError: ``x`` does not have the encoding's width.
    """
    if x.ndim != 2 or x.shape[1] != encoding.width:
        raise InvalidSpecError(
            f"The encoded rows have shape {x.shape}; the encoding has {encoding.width} slots."
        )
    data: dict[str, object] = {}
    start = 0
    for f in encoding.features:
        c, w = f.column, f.width
        part = x[:, start : start + w].astype(np.float64)
        start += w
        if c.type == "categorical":
            code = part.argmax(axis=1)
            names = np.array([*c.categories, None, None], dtype=object)
            data[c.name] = pd.Series(names[code], dtype=object)
            continue
        assert c.min is not None and c.max is not None
        slots = w - (1 if c.nullable else 0)
        if f.edges:
            e = np.asarray(f.edges, dtype=np.float64)
            pos = np.clip(part[:, :slots].sum(axis=1), 0.0, slots)
            t = np.minimum(np.floor(pos), slots - 1).astype(np.int64)
            value = e[t] + (pos - t) * (e[t + 1] - e[t])
        else:
            value = c.min + np.clip(part[:, 0], 0.0, 1.0) * (c.max - c.min)
        value = np.clip(value, c.min, c.max)
        if c.nullable:
            value = np.where(part[:, slots] > 0.5, np.nan, value)
        data[c.name] = value
    names = np.array(encoding.classes, dtype=object)
    data[encoding.label.name] = pd.Series(names[y], dtype=object)
    return pd.DataFrame(data)


def sample_table(
    net: AutoregressiveNet, encoding: FeatureEncoding, rows: int, *, seed: int | None
) -> pd.DataFrame:
    """``rows`` synthetic rows with the declared schema (a ``seed`` reproduces them)."""
    if rows < 1:
        raise InvalidSpecError(f"rows must be at least 1, got {rows}.")
    x, y = sample_encoded(net, rows, np.random.default_rng(seed))
    return decode(encoding, x, y)
