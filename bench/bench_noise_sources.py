"""Cost of one DP-SGD step's Gaussian noise from each candidate private source, on the CPU.

A site draws ``N(0, (σC)²)`` once per step for every parameter (``BookKeeper.add_noise``), so
on a small network at batch 256 the draw is a fixed share of the step that no clipping trick
removes. This script asks whether a faster source exists among those a site could use without
giving up an OS-seeded, never-exposed generator (``common/dp/noise.py``):

* ``torch-mt``: ``torch.normal`` from a private ``torch.Generator`` (Mersenne Twister,
  Box–Muller on 24-bit float32 uniforms): the site's standard source;
* ``numpy-<bitgen>``: NumPy's ``Generator.standard_normal(dtype=float32)`` (ziggurat) on
  PCG64, PCG64DXSM, SFC64 and Philox bit generators;
* ``chacha20-bm32``: a ChaCha20 keystream (``cryptography``, a CSPRNG) turned into float32
  Box–Muller normals with torch's vectorised operations (what torch's sampler computes, on
  other uniforms);
* ``secure``: the site's ``policy.secure_noise`` source (``common.dp.noise``: ChaCha20,
  float64 Box–Muller, Opacus' sum of four draws).

Each variant draws ``--params`` values (default: the small MLP's 85,002 and the large MLP's
1,863,690 of ``bench_dp_step.py``), interleaved over ``--repeats`` rounds; the figure is the
median time per draw and its ratio to ``torch-mt``. Single-threaded (``torch.set_num_threads``).

Run: ``.venv/bin/python bench/bench_noise_sources.py`` (about 20 s).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.dp import noise

Draw = Callable[[], object]


def _chacha_box_muller(n: int) -> Draw:
    half = (n + 1) // 2
    zeros = bytes(8 * half)
    buf = bytearray(8 * half)
    enc = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None).encryptor()
    out = torch.empty(2 * half)
    ln_2_24 = 24.0 * math.log(2.0)

    def draw() -> object:
        enc.update_into(zeros, buf)
        bits = (torch.frombuffer(buf, dtype=torch.int32) & 0xFFFFFF).to(torch.float32)
        # u = (k + 1)·2⁻²⁴ ∈ (0, 1]: r = √(−2 ln u) = √(2·(24 ln 2 − ln(k + 1)))
        radius = bits[:half].add_(1.0).log_().neg_().add_(ln_2_24).mul_(2.0).sqrt_()
        angle = bits[half:].mul_(2.0 * math.pi * 2.0**-24)
        torch.mul(radius, torch.cos(angle), out=out[:half])
        torch.mul(radius, angle.sin_(), out=out[half:])
        return out[:n]

    return draw


def _numpy_draw(rng: np.random.Generator, n: int) -> Draw:
    buf = np.empty(n, dtype=np.float32)

    def draw() -> object:
        return rng.standard_normal(n, dtype=np.float32, out=buf)

    return draw


def variants(n: int) -> dict[str, Draw]:
    gen = noise.private_torch_generator()
    out: dict[str, Draw] = {
        "torch-mt": lambda: torch.normal(0.0, 1.0, size=(n,), generator=gen),
    }
    for name, bitgen in (
        ("pcg64", np.random.PCG64),
        ("pcg64dxsm", np.random.PCG64DXSM),
        ("sfc64", np.random.SFC64),
        ("philox", np.random.Philox),
    ):
        rng = np.random.Generator(bitgen(int.from_bytes(os.urandom(16), "little")))
        out[f"numpy-{name}"] = _numpy_draw(rng, n)
    out["chacha20-bm32"] = _chacha_box_muller(n)

    def secure() -> object:
        with noise.secure_noise(True):
            return noise.gaussian_torch(1.0, (n,), generator=None)

    out["secure"] = secure
    return out


def bench(n: int, repeats: int, target_s: float) -> dict[str, float]:
    draws = variants(n)
    calls: dict[str, int] = {}
    for key, draw in draws.items():  # warm up; size each call to about target_s
        draw()
        start = time.perf_counter()
        draw()
        calls[key] = max(1, round(target_s / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {k: [] for k in draws}
    for _ in range(repeats):
        for key, draw in draws.items():
            start = time.thread_time()
            for _ in range(calls[key]):
                draw()
            samples[key].append((time.thread_time() - start) / calls[key])
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--params", nargs="+", type=int, default=[85_002, 1_863_690])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--repeat-seconds", type=float, default=0.2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"Gaussian draws on cpu, thread CPU time, median of {args.repeats} interleaved repeats")
    for n in args.params:
        times = bench(n, args.repeats, args.repeat_seconds)
        base = times["torch-mt"]
        print(f"\n{n:,} values")
        for key, t in times.items():
            print(f"  {key:16s} {t * 1e3:8.3f} ms  {t / base:6.2f}×")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n1-min load average {load:.2f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
