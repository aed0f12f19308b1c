"""Cost of one DP-SGD step relative to one non-private SGD step, per clipping mode.

DP-SGD (Abadi et al., CCS 2016) needs every example's gradient norm to clip it. Opacus
(Yousefpour et al., 2021) offers several ways to get it, with very different costs:

* ``hooks`` — materialises per-example gradients from forward/backward hooks
  (``B × |θ|`` floats: the dominant cost on wide dense layers);
* ``ew`` — the same through PyTorch's ExpandedWeights;
* ``ghost`` — ghost clipping (Li et al., ICLR 2022; Bu et al. 2022-23): per-example norms of
  linear layers from activations and output gradients, then a second backward pass on the
  re-weighted loss; layers without a ghost norm (conv, GroupNorm) fall back to materialised
  per-example gradients;
* ``bk`` — dpfed's book-keeping clipping (Bu et al., ICML 2023; ``site_agent/clipping.py``):
  the same norms in a single backward pass, then the clipped sum as one matrix product per
  layer; the site's noise optimiser adds the noise. dpfed's default, timed through the
  trainer's own loop (``site_agent.trainer._run_bookkeeping``), not a re-creation of it.
* ``bk+csprng`` — ``bk`` with the noise a site gets under ``policy.secure_noise``
  (``common/dp/noise.py``: ChaCha20 CSPRNG, Box–Muller, Opacus' secure-mode sum of four draws).

This script times one optimiser step (forward, backward, clip, noise, update) on a fixed
batch for each model and mode, interleaving the variants repeat by repeat so that machine
noise hits them alike, and reports the median over repeats divided by the non-private step.
It prints a table, the fastest mode per model and the mode dpfed's trainer uses
(:func:`site_agent.trainer.choose_grad_sample_mode`), and writes
``bench/results/dp_step.json``.

It runs single-threaded by default (``--threads`` to change): on a shared machine a
multi-threaded step stalls whenever one of its threads is descheduled (every parallel
region waits at a barrier), and the ratios then measure the neighbours, not the code.

Run: ``.venv/bin/python bench/bench_dp_step.py`` (about two minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import opacus
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.dp.noise import secure_noise
from common.specs import (
    Conv2dSpec,
    ConvLayerSpec,
    MLPSpec,
    ModelSpec,
    OptimizerSpec,
    model_dims,
)
from common.training.models import build_model, count_parameters
from site_agent.trainer import TrainParams, _run_bookkeeping, choose_grad_sample_mode

MODES = ("hooks", "ew", "ghost", "bk", "bk+csprng")
RESULTS = Path(__file__).resolve().parent / "results" / "dp_step.json"
STEPS_PER_CALL = 10
"""Optimiser steps per timed call, for every variant alike."""

Step = Callable[[], None]


def _specs() -> dict[str, ModelSpec]:
    return {
        "mlp 64-256-256-10": MLPSpec(kind="mlp", input_dim=64, num_classes=10, hidden=(256, 256)),
        "mlp 784-1024-1024-10": MLPSpec(
            kind="mlp", input_dim=784, num_classes=10, hidden=(1024, 1024)
        ),
        "cnn 1x28x28 c16-c32-fc128": Conv2dSpec(
            kind="cnn2d",
            input_dim=784,
            num_classes=10,
            input_shape=(1, 28, 28),
            conv=(ConvLayerSpec(channels=16, pool=2), ConvLayerSpec(channels=32, pool=2)),
            hidden=(128,),
            groupnorm_groups=4,
        ),
    }


def _nonprivate_step(spec: ModelSpec, x: torch.Tensor, y: torch.Tensor) -> Step:
    model = build_model(spec, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss()

    def step() -> None:
        for _ in range(STEPS_PER_CALL):
            opt.zero_grad(set_to_none=True)
            crit(model(x), y).backward()
            opt.step()

    return step


def _bk_step(spec: ModelSpec, x: torch.Tensor, y: torch.Tensor, *, secure: bool) -> Step:
    """dpfed's own mode through the trainer's actual code: ``site_agent.trainer.
    _run_bookkeeping`` (the site's noise optimiser, book-keeping clipping, the loss as
    ``batch_loss`` forms it, Opacus' step) over :data:`STEPS_PER_CALL` steps on the fixed
    batch, as a ``train_local`` of that many steps runs them after sampling; ``secure``: the
    noise from the ChaCha20 CSPRNG with Opacus' secure-mode sum (``policy.secure_noise``).
    Each call's set-up (optimiser wrapper, attaching the book-keeper) is spread over its
    steps, as in a task."""
    model = build_model(spec, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    params = TrainParams(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        batch_size=len(x),
        local_epochs=None,
        local_steps=STEPS_PER_CALL,
        optimizer=OptimizerSpec(lr=0.01),
    )
    batches = cast(Any, [(x, y)])  # the loader: the same batch every step

    def step() -> None:
        with secure_noise(secure):
            _run_bookkeeping(
                model, opt, batches, params=params, steps=STEPS_PER_CALL, expected=float(len(x))
            )

    return step


def _dp_step(spec: ModelSpec, mode: str, x: torch.Tensor, y: torch.Tensor) -> Step:
    if mode.startswith("bk"):
        return _bk_step(spec, x, y, secure=mode == "bk+csprng")
    model = build_model(spec, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made: tuple[Any, ...] = PrivacyEngine(accountant="rdp").make_private(
            module=model,
            optimizer=opt,
            criterion=crit,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
    if len(made) == 4:
        dp_model, dp_opt, dp_crit, _ = made
    else:
        dp_model, dp_opt, _ = made
        dp_crit = crit

    def step() -> None:
        for _ in range(STEPS_PER_CALL):
            dp_opt.zero_grad(set_to_none=True)
            dp_crit(dp_model(x), y).backward()
            dp_opt.step()

    return step


def _time(step: Step, n: int) -> float:
    """Seconds per optimiser step (each call runs :data:`STEPS_PER_CALL` steps)."""
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / (n * STEPS_PER_CALL)


def bench_model(
    name: str, spec: ModelSpec, *, batch: int, repeats: int, repeat_s: float
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    input_dim, num_classes = model_dims(spec)
    x = torch.randn(batch, input_dim, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)

    steps: dict[str, Step] = {"sgd": _nonprivate_step(spec, x, y)}
    errors: dict[str, str] = {}
    for mode in MODES:
        try:
            candidate = _dp_step(spec, mode, x, y)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                candidate()  # fails here, not at make_private, when a mode cannot run
            steps[mode] = candidate
        except Exception as err:  # report an unsupported mode, don't stop the benchmark
            errors[mode] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"

    # Warm up, and size each repeat to about repeat_s seconds per variant.
    per_repeat: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, step in steps.items():
            t = _time(step, 2)
            per_repeat[key] = max(1, min(50, round(repeat_s / max(t * STEPS_PER_CALL, 1e-6))))
        samples: dict[str, list[float]] = {key: [] for key in steps}
        for _ in range(repeats):  # interleaved: every variant sees the same machine state
            for key, step in steps.items():
                samples[key].append(_time(step, per_repeat[key]))

    median = {key: statistics.median(v) for key, v in samples.items()}
    best = {key: min(v) for key, v in samples.items()}
    base = median["sgd"]
    ratios = {mode: median[mode] / base for mode in MODES if mode in median}
    best_ratios = {mode: best[mode] / best["sgd"] for mode in MODES if mode in best}
    fastest = min(ratios, key=lambda m: ratios[m])
    default = choose_grad_sample_mode(spec)
    return {
        "model": name,
        "spec": spec.model_dump(mode="json"),
        "parameters": count_parameters(build_model(spec)),
        "batch_size": batch,
        "nonprivate_ms": base * 1e3,
        "ms": {mode: median[mode] * 1e3 for mode in MODES if mode in median},
        "ratio": ratios,
        "unsupported": errors,
        "fastest_mode": fastest,
        "default_mode": default,
        "default_ratio": ratios.get(default),
        "best_ratio": best_ratios,
        "steps_per_repeat": per_repeat,
        "repeats": repeats,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'model':<28}{'params':>10}{'sgd ms':>9}"
    for mode in MODES:
        head += f"{mode + ' ms':>14}{'×':>8}"
    head += f"{'fastest':>9}{'default':>9}{'default ×':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['model']:<28}{r['parameters']:>10,}{r['nonprivate_ms']:>9.2f}"
        for mode in MODES:
            if mode in r["ms"]:
                line += f"{r['ms'][mode]:>14.2f}{r['ratio'][mode]:>7.2f}×"
            else:
                line += f"{'n/a':>14}{'':>8}"
        default_ratio = r["default_ratio"]
        shown = f"{default_ratio:.2f}×" if default_ratio is not None else "n/a"
        line += f"{r['fastest_mode']:>9}{r['default_mode']:>9}{shown:>11}"
        lines.append(line)
    lines.append("")
    lines.append("best-of-repeats ratios (less sensitive to other load on the machine):")
    for r in rows:
        shown = ", ".join(f"{m} {v:.2f}×" for m, v in r["best_ratio"].items())
        lines.append(f"  {r['model']:<28}{shown}")
    for r in rows:
        for mode, err in r["unsupported"].items():
            lines.append(f"  {r['model']}: {mode} unsupported ({err})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--repeat-seconds", type=float, default=0.4)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: see the module docstring)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    rows = [
        bench_model(
            name, spec, batch=args.batch, repeats=args.repeats, repeat_s=args.repeat_seconds
        )
        for name, spec in _specs().items()
    ]
    env = {
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(
        f"DP-SGD step time / non-private SGD step time (batch {args.batch}, median of "
        f"{args.repeats} interleaved repeats; torch {env['torch']}, opacus {env['opacus']}, "
        f"{env['torch_threads']} threads)"
    )
    print(_table(rows))
    print(
        f"wall time {env['wall_s']} s; 1-min load average before/after "
        f"{env['loadavg_1min_before_after']} on {env['cpu_count']} CPUs"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
