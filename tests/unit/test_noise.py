"""Both noise sources draw N(0, σ²); the secure one ignores every seed and generator."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from scipy import stats

from common.dp import noise


@pytest.mark.parametrize("secure", [False, True])
def test_draws_are_gaussian_with_the_requested_std(secure: bool) -> None:
    with noise.secure_noise(secure):
        assert noise.secure_enabled() is secure
        z = noise.gaussian_torch(
            3.0, (40_000,), generator=noise.private_torch_generator(), dtype=torch.float64
        )
        w = noise.gaussian_np(np.random.default_rng(), 0.5, (20_000,))
    assert z.dtype == torch.float64 and w.dtype == np.float64
    # Kolmogorov-Smirnov against the exact law: a wrong scale, shift or shape fails.
    assert stats.kstest(z.numpy() / 3.0, "norm").pvalue > 1e-4
    assert stats.kstest(w / 0.5, "norm").pvalue > 1e-4


def test_the_csprng_sampler_is_standard_normal_and_never_repeats() -> None:
    a, b = noise.csprng_standard_normal(50_001), noise.csprng_standard_normal(50_001)
    assert a.shape == (50_001,) and torch.isfinite(a).all()
    assert stats.kstest(a.numpy(), "norm").pvalue > 1e-4
    assert not torch.equal(a, b)
    assert noise.csprng_standard_normal(0).shape == (0,)
    with pytest.raises(ValueError, match="n must be"):
        noise.csprng_standard_normal(-1)


def test_secure_noise_ignores_seeds_and_generators() -> None:
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(
        noise.gaussian_torch(1.0, (5,), generator=g1), noise.gaussian_torch(1.0, (5,), generator=g2)
    )
    with noise.secure_noise():
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        first = noise.gaussian_torch(1.0, (5,), generator=g1)
        second = noise.gaussian_torch(1.0, (5,), generator=g2)
        r1 = noise.gaussian_np(np.random.default_rng(7), 1.0, 5)
        r2 = noise.gaussian_np(np.random.default_rng(7), 1.0, 5)
    assert not torch.equal(first, second)
    assert not np.array_equal(r1, r2)


def test_the_setting_is_per_thread_and_restored() -> None:
    seen: list[bool] = []
    with noise.secure_noise():
        worker = threading.Thread(target=lambda: seen.append(noise.secure_enabled()))
        worker.start()
        worker.join()
        assert noise.secure_enabled()
    assert seen == [False] and not noise.secure_enabled()


def test_shapes_zero_std_and_bad_std() -> None:
    rng = np.random.default_rng(0)
    for secure in (False, True):
        with noise.secure_noise(secure):
            assert noise.gaussian_np(rng, 1.0).shape == ()
            assert noise.gaussian_np(rng, 1.0, (2, 3)).shape == (2, 3)
            gen = noise.private_torch_generator()
            assert noise.gaussian_torch(1.0, (2, 3), generator=gen).shape == (2, 3)
            assert not noise.gaussian_torch(0.0, (4,), generator=None).any()
            with pytest.raises(ValueError, match="std"):
                noise.gaussian_np(rng, -1.0)
            with pytest.raises(ValueError, match="std"):
                noise.gaussian_torch(float("nan"), (1,), generator=None)


def test_standard_noise_refuses_the_global_generator() -> None:
    """Issue 16.6: no DP draw falls back to torch's global generator."""
    with noise.secure_noise(False), pytest.raises(ValueError, match="private generator"):
        noise.gaussian_torch(1.0, (3,), generator=None)
