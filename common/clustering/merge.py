"""One-shot alternative to federated EM: merge local (DP) mixtures into K components.

Runnalls' (2007) greedy moment-preserving merges, then Goldberger & Roweis' (2005)
regroup/refit. Post-processing of the local models, so DP if they are. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.clustering.model import FloatArray, GaussianMixtureParams

__all__ = [
    "merge_mixtures",
]


def _moment_match(
    alpha: FloatArray, means: FloatArray, covs: FloatArray
) -> tuple[float, FloatArray, FloatArray]:
    """Weight, mean and full covariance of the moment-preserving merge of components."""
    total = float(alpha.sum())
    mu = alpha @ means / total
    diff = means - mu
    cov = np.einsum("i,ide->de", alpha, covs + np.einsum("id,ie->ide", diff, diff)) / total
    return total, mu, (cov + cov.T) / 2.0


def _gauss_kl(
    mu_f: FloatArray, cov_f: FloatArray, mu_g: FloatArray, cov_g: FloatArray
) -> FloatArray:
    """``KL(f_i ‖ g_j)`` for every pair, shape ``(n_f, n_g)`` (full covariances)."""
    D = mu_f.shape[1]
    inv_g = np.linalg.inv(cov_g)
    _, logdet_g = np.linalg.slogdet(cov_g)
    _, logdet_f = np.linalg.slogdet(cov_f)
    trace = np.einsum("jde,ied->ij", inv_g, cov_f)
    diff = mu_g[None, :, :] - mu_f[:, None, :]
    maha = np.einsum("ijd,jde,ije->ij", diff, inv_g, diff)
    return np.asarray(0.5 * (trace + maha - D + logdet_g[None, :] - logdet_f[:, None]))


def merge_mixtures(
    local: Sequence[GaussianMixtureParams],
    site_weights: Sequence[float],
    K: int,
    *,
    refine_iters: int = 20,
) -> GaussianMixtureParams:
    """Reduce the union of local mixtures to K components (one-shot federation).

    The pooled mixture gives component ``(s, k)`` the weight ``site_weights[s]/Σ · π_{s,k}``.
    1. Runnalls (2007): while more than K components remain, merge the pair with the least
       upper bound ``B(i,j) = ½[(w_i+w_j) log det Σ_ij − w_i log det Σ_i − w_j log det Σ_j]``
       on the KL discrepancy, where ``Σ_ij`` is the covariance of their moment-preserving
       merge (weights add, means average, covariances add the spread of the means).
    2. Goldberger & Roweis (2005): up to ``refine_iters`` times, reassign every pooled
       component to the merged component ``g_j`` minimising ``KL(f_i ‖ g_j)`` and refit each
       ``g_j`` as the moment-preserving merge of its members; stop when nothing moves.
    Diagonal models are merged with full covariances and keep the diagonal of the result
    (the KL-closest diagonal Gaussian to a moment-matched one). All models must share D and
    the covariance type.
    """
    if not local:
        raise ValueError("merge_mixtures needs at least one local mixture.")
    if len(site_weights) != len(local):
        raise ValueError(
            f"Need one site weight per mixture ({len(local)}), got {len(site_weights)}."
        )
    sw = np.maximum(np.asarray(site_weights, dtype=np.float64), 0.0)
    if not np.all(np.isfinite(sw)) or sw.sum() <= 0:
        raise ValueError("site_weights must be finite with a positive sum.")
    D, ctype = local[0].n_features, local[0].covariance_type
    if any(p.n_features != D or p.covariance_type != ctype for p in local):
        raise ValueError("All local mixtures must share the number of features and type.")
    alpha = np.concatenate([s / sw.sum() * p.weights for s, p in zip(sw, local, strict=True)])
    means = np.concatenate([p.means for p in local])
    covs = np.concatenate([p.full_covariances() for p in local])
    keep = alpha > 0
    alpha, means, covs = alpha[keep], means[keep], covs[keep]
    n = alpha.size
    if not 1 <= K <= n:
        raise ValueError(f"K must be in [1, {n}] (the pooled components), got {K}.")
    # 1. Greedy Runnalls reduction over groups of pooled components.
    groups: list[list[int]] = [[i] for i in range(n)]
    g_w, g_mu, g_cov = alpha.copy(), means.copy(), covs.copy()
    while len(groups) > K:
        _, g_logdet = np.linalg.slogdet(g_cov)
        wi, wj = g_w[:, None], g_w[None, :]
        tot = wi + wj
        mu = (wi[..., None] * g_mu[:, None, :] + wj[..., None] * g_mu[None, :, :]) / tot[..., None]
        dm = g_mu[:, None, :] - g_mu[None, :, :]
        cov = (wi[..., None, None] * g_cov[:, None] + wj[..., None, None] * g_cov[None, :]) / tot[
            ..., None, None
        ] + (wi * wj / tot**2)[..., None, None] * np.einsum("ijd,ije->ijde", dm, dm)
        _, logdet = np.linalg.slogdet(cov)
        cost = 0.5 * (tot * logdet - wi * g_logdet[:, None] - wj * g_logdet[None, :])
        cost[np.tril_indices(len(groups))] = np.inf
        i, j = divmod(int(np.argmin(cost)), len(groups))
        groups[i] = groups[i] + groups[j]
        del groups[j]
        g_w[i], g_mu[i], g_cov[i] = float(tot[i, j]), mu[i, j], cov[i, j]
        g_w, g_mu, g_cov = (np.delete(a, j, axis=0) for a in (g_w, g_mu, g_cov))
    # 2. Goldberger-Roweis regroup/refit.
    assign = np.empty(n, dtype=np.int64)
    for g, members in enumerate(groups):
        assign[members] = g
    for _ in range(max(0, refine_iters)):
        new_assign = np.argmin(_gauss_kl(means, covs, g_mu, g_cov), axis=1)
        if np.array_equal(new_assign, assign):
            break
        assign = new_assign
        for g in range(K):
            mask = assign == g
            if np.any(mask):
                g_w[g], g_mu[g], g_cov[g] = _moment_match(alpha[mask], means[mask], covs[mask])
    out_cov = g_cov if ctype == "full" else np.diagonal(g_cov, axis1=1, axis2=2).copy()
    return GaussianMixtureParams(g_w / g_w.sum(), g_mu, out_cov, ctype)
