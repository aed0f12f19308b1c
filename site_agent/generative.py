"""The training loss of a generative model at a site (issue 20).

A classifier of the zoo trains on the cross-entropy of its logits; the autoregressive
synthesizer (:mod:`common.synthesis.autoregressive`) on the negative log-likelihood of each
encoded row and its label. Both are sums of per-example terms, which is all book-keeping
clipping needs (:mod:`site_agent.clipping`): each example's gradient is clipped to ``C``
whatever the loss, so the DP guarantee is the same.
"""

from __future__ import annotations

from torch import Tensor, nn

from common.errors import InvalidSpecError
from common.synthesis.autoregressive import AutoregressiveNet


def batch_loss(net: nn.Module, criterion: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The summed per-example training loss of a batch (a tensor, never a number)."""
    if isinstance(net, AutoregressiveNet):
        return -net.log_prob(x, y).sum()
    out: Tensor = criterion(net(x), y)
    return out


def check_generative_mode(net: nn.Module, mode: str) -> None:
    """A generative model trains with book-keeping clipping only (Opacus' paths compute the
    classifier's loss).

    Raises:
        InvalidSpecError: a generative model with another clipping mode.
    """
    if isinstance(net, AutoregressiveNet) and mode != "bk":
        raise InvalidSpecError(
            f"The autoregressive model trains with book-keeping clipping only, not {mode!r}."
        )
