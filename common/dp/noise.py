"""Where the Gaussian noise that protects site data comes from.

Every DP release at a site (DP-SGD steps, validation metrics, catalog counts, synthetic-data
marginals, mixture statistics) draws its noise through :func:`gaussian_torch` or
:func:`gaussian_np`. Two sources exist:

* **standard** (the default): PyTorch's or NumPy's generator, seeded from the OS entropy pool
  for each release and never exposed (``secrets.randbits``). The samplers are
  Mersenne-Twister or PCG64 based: statistically sound, but neither is a cryptographically
  secure generator, and a floating-point Gaussian added to floating-point values leaks
  through its low-order bits (Mironov, "On Significance of the Least Significant Bits for
  Differential Privacy", CCS 2012; for Gaussian samplers and Opacus in particular, Jin et
  al., "Are We There Yet? Timing and Floating-Point Attacks on Differential Privacy
  Systems", IEEE S&P 2022, arXiv:2112.05307).
* **secure** (a site opts in with ``policy.secure_noise: true``): standard normals from a
  ChaCha20 keystream keyed from ``os.urandom`` (a CSPRNG; the cipher is the ``cryptography``
  package's), turned into Gaussians by Box–Muller in float64, and each noise value is the sum
  of four such draws of standard deviation ``σ`` divided by two (standard deviation ``σ``
  again). The sum is the countermeasure Opacus applies in ``secure_mode``
  (``opacus.optimizers.optimizer._generate_noise``; Holohan & Braghin, "Secure Random
  Sampling in Differential Privacy", ESORICS 2021, arXiv:2107.10138, §5.1 with n = 2): an
  attacker who would recover one Box–Muller draw from its low-order bits now faces a sum
  of four. Its cost is measured by ``bench/bench_dp_step.py --secure-noise``.

The source is chosen per thread (:func:`secure_noise`): the executor sets it from the site's
policy (``site.yaml``) around every task it runs. Neither source is ever seeded from anything
the orchestrator knows.
"""

from __future__ import annotations

import math
import os
import secrets
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_state = threading.local()
_SECURE_DRAWS = 4
"""Opacus' ``secure_mode``: four draws of std σ, summed and halved (std σ)."""
_TWO_POW_MINUS_53 = 1.0 / float(1 << 53)


def secure_enabled() -> bool:
    """Whether noise comes from the CSPRNG in this thread (see the module docstring)."""
    return bool(getattr(_state, "secure", None))


@contextmanager
def secure_noise(enabled: bool = True) -> Iterator[None]:
    """Use (or not) the secure source in this thread for the duration (tests, benchmarks)."""
    before = getattr(_state, "secure", None)
    _state.secure = enabled
    try:
        yield
    finally:
        _state.secure = before


def private_torch_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from the OS entropy pool, known to no one else.

    On a CUDA device it is that device's own Philox generator: the noise is drawn where the
    gradients are, never copied from the host."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(64))


def private_numpy_rng() -> np.random.Generator:
    """A NumPy generator seeded from the OS entropy pool (128 bits), known to no one else."""
    return np.random.default_rng(secrets.randbits(128))


def csprng_standard_normal(n: int) -> torch.Tensor:
    """``n`` independent N(0, 1) draws (float64) from a freshly keyed ChaCha20 keystream.

    Box–Muller on 53-bit uniforms in (0, 1]: ``r = √(−2 ln u₁)``, ``z = (r cos 2πu₂,
    r sin 2πu₂)``. The key (256 bits) and nonce come from ``os.urandom`` for every call.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    half = (n + 1) // 2
    cipher = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None)
    stream = cipher.encryptor().update(bytes(16 * half))  # the keystream: ChaCha20(0…0)
    words = torch.from_numpy(np.frombuffer(stream, dtype=np.int64).copy())
    # Top 53 bits of each 64-bit word (logical shift on a signed view: mask after shifting).
    mantissa = (words >> 11) & ((1 << 53) - 1)
    uniform = (mantissa.to(torch.float64) + 1.0) * _TWO_POW_MINUS_53  # in (0, 1]
    radius = torch.sqrt(-2.0 * torch.log(uniform[:half]))
    angle = (2.0 * math.pi) * uniform[half:]
    return torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)))[:n]


def _secure_normal(std: float, count: int) -> torch.Tensor:
    total = csprng_standard_normal(count)
    for _ in range(_SECURE_DRAWS - 1):
        total += csprng_standard_normal(count)
    return total * (std / math.sqrt(_SECURE_DRAWS))


def gaussian_torch(
    std: float,
    shape: Sequence[int] | torch.Size,
    *,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``N(0, std²)`` noise of ``shape`` from the configured source, on ``device``.

    ``generator`` is used by the standard source only, and that source refuses ``None``:
    pass one from :func:`private_torch_generator` (torch's global generator is one that any
    code in the process can seed, and some does, with public seeds). The standard source
    draws on the generator's own device, which must be ``device`` (default: the
    generator's); the secure source draws on the CPU and copies the result to ``device``.
    """
    if not (std >= 0.0 and math.isfinite(std)):
        raise ValueError(f"std must be a finite number >= 0, got {std}")
    size = tuple(int(s) for s in shape)
    if device is not None:
        where: torch.device | None = torch.device(device)
    else:
        where = generator.device if generator is not None else None
    if std == 0.0:
        return torch.zeros(size, dtype=dtype, device=where)
    if secure_enabled():
        return _secure_normal(std, math.prod(size)).reshape(size).to(dtype=dtype, device=where)
    if generator is None:
        raise ValueError(
            "DP noise needs an explicit private generator (noise.private_torch_generator()); "
            "torch's global generator can be seeded by anyone in the process."
        )
    if where is not None and generator.device.type != where.type:
        raise ValueError(
            f"The noise is wanted on {where}, but the private generator is on "
            f"{generator.device}; create it there (noise.private_torch_generator(device))."
        )
    return torch.normal(
        0.0, std, size=size, generator=generator, dtype=dtype, device=generator.device
    )


def gaussian_np(
    rng: np.random.Generator, std: float, size: int | Sequence[int] | None = None
) -> npt.NDArray[np.float64]:
    """``N(0, std²)`` noise from the configured source, as NumPy float64.

    ``rng`` (seeded from OS entropy by the caller) serves the standard source only.
    ``size=None`` gives a 0-d array.
    """
    if not (std >= 0.0 and math.isfinite(std)):
        raise ValueError(f"std must be a finite number >= 0, got {std}")
    shape: tuple[int, ...] = (
        ()
        if size is None
        else ((int(size),) if isinstance(size, int | np.integer) else tuple(int(s) for s in size))
    )
    if not secure_enabled():
        return np.asarray(rng.normal(0.0, std, size=shape), dtype=np.float64)
    if std == 0.0:
        return np.zeros(shape, dtype=np.float64)
    return _secure_normal(std, math.prod(shape)).reshape(shape).numpy()
