"""Cost of one DP-SGD step as a site runs it, relative to one non-private SGD step.

DP-SGD (Abadi et al., CCS 2016) needs every example's gradient clipped before the sum is
noised. dpfed's default is book-keeping clipping (Bu, Wang, Zha & Karypis, ICML 2023;
``site_agent/clipping.py``): per-example norms from each layer's inputs and output
gradients in the one backward pass, the clipped sum as one matrix product per layer, the
noise drawn once for all parameters from the site's private generator.

Each variant runs the trainer's own step loop on in-memory rows, as ``train_local`` runs it
after its set-up:

* ``sgd`` — the non-private baseline a user would write: shuffled batches of ``--batch`` rows
  (one tensor indexing each), mean cross-entropy, ``optimizer.step()``;
* ``bk`` — ``site_agent.trainer._run_bookkeeping`` on the trainer's Poisson loader
  (``row_store.tensor_poisson_loader``, expected batch ``--batch``): Poisson sample, clipping,
  noise ``N(0, (σC)²)``, averaging, the optimiser's step;
* ``bk+csprng`` — the same with ``policy.secure_noise`` (ChaCha20, Opacus' secure-mode sum of
  four draws; ``common/dp/noise.py``);
* ``ghost``, ``hooks`` (``--modes``) — Opacus' modes through ``site_agent.opacus_modes.run_opacus``
  (float64, as the trainer runs them).

The variants are interleaved repeat by repeat (every variant sees the same machine state),
each repeat a call of about ``--repeat-seconds``; the figure is the median per-step time over
repeats, divided by the baseline's. Both wall time and the thread's CPU time are reported: on
a machine shared with other work, CPU time is the steadier measure of the code (wall time
includes the time the thread waited for a core). Single-threaded by default (``--threads``):
a multi-threaded step stalls whenever one of its threads is descheduled. On ``--device cuda``
only wall time is meaningful (the GPU's work is not the thread's); each call ends with a
``torch.cuda.synchronize()``.

Run: ``.venv/bin/python bench/bench_dp_step.py`` (about a minute on a quiet 2-core machine;
``--models`` and ``--batch`` take several values, e.g. ``--device cuda --models mlp-small
mlp-large cnn-32 --batch 256 1024`` for the GPU rows). Writes ``bench/results/dp_step.json``.
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
from typing import Any

import opacus
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.dp import noise
from common.specs import Conv2dSpec, ConvLayerSpec, MLPSpec, ModelSpec, OptimizerSpec, model_dims
from common.training.models import build_model, count_parameters
from site_agent.data.row_store import tensor_poisson_loader
from site_agent.opacus_modes import run_opacus
from site_agent.trainer import TrainParams, _run_bookkeeping, choose_grad_sample_mode

MODES = ("bk", "bk+csprng", "ghost", "hooks")
DEFAULT_MODES = ("bk", "bk+csprng")
RESULTS = Path(__file__).resolve().parent / "results" / "dp_step.json"
ROWS = 20_000
"""Rows the batches are drawn from (Poisson sampling is O(q·N) per step: N barely matters)."""

MODELS: dict[str, ModelSpec] = {
    "mlp-small": MLPSpec(kind="mlp", input_dim=64, num_classes=10, hidden=(256, 256)),
    "mlp-large": MLPSpec(kind="mlp", input_dim=784, num_classes=10, hidden=(1024, 1024)),
    "cnn-28": Conv2dSpec(
        kind="cnn2d",
        input_dim=784,
        num_classes=10,
        input_shape=(1, 28, 28),
        conv=(ConvLayerSpec(channels=16, pool=2), ConvLayerSpec(channels=32, pool=2)),
        hidden=(128,),
        groupnorm_groups=4,
    ),
    "cnn-32": Conv2dSpec(
        kind="cnn2d",
        input_dim=3 * 32 * 32,
        num_classes=10,
        input_shape=(3, 32, 32),
        conv=(ConvLayerSpec(channels=32, pool=2), ConvLayerSpec(channels=64, pool=2)),
        hidden=(128,),
        groupnorm_groups=4,
    ),
}
DEFAULT_MODELS = ("mlp-small", "mlp-large", "cnn-28")

Run = Callable[[int], None]
"""Runs that many steps."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nonprivate(spec: ModelSpec, x: Tensor, y: Tensor, batch: int, device: torch.device) -> Run:
    net = build_model(spec, seed=0).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    perm, at = torch.randperm(len(x), generator=gen), 0

    def run(steps: int) -> None:
        nonlocal perm, at
        for _ in range(steps):
            if at + batch > len(x):  # a new epoch: shuffled again
                perm, at = torch.randperm(len(x), generator=gen), 0
            idx = perm[at : at + batch]
            at += batch
            xb, yb = x[idx].to(device), y[idx].to(device)
            opt.zero_grad(set_to_none=True)
            crit(net(xb), yb).backward()
            opt.step()

    return run


def _private(
    spec: ModelSpec, mode: str, x: Tensor, y: Tensor, batch: int, device: torch.device
) -> Run:
    net = build_model(spec, seed=0).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    q = batch / len(x)

    def run(steps: int) -> None:
        params = TrainParams(
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            batch_size=batch,
            local_epochs=None,
            local_steps=steps,
            optimizer=OptimizerSpec(lr=0.01),
            device=str(device),
        )
        # The loader train_local builds: Poisson sampling from an OS-seeded generator.
        loader = tensor_poisson_loader(x, y, q, noise.private_torch_generator())
        if mode.startswith("bk"):
            with noise.secure_noise(mode == "bk+csprng"):
                _run_bookkeeping(net, opt, loader, params=params, steps=steps, expected=q * len(x))
        else:
            run_opacus(net, opt, loader, params=params, steps=steps, expected=q * len(x), mode=mode)

    return run


def _timed(run: Run, steps: int, device: torch.device) -> tuple[float, float]:
    """(wall, thread CPU) seconds per step."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.thread_time()
    run(steps)
    _sync(device)
    return (time.perf_counter() - wall) / steps, (time.thread_time() - cpu) / steps


def bench_model(
    name: str,
    *,
    batch: int,
    modes: tuple[str, ...],
    repeats: int,
    repeat_s: float,
    device: torch.device,
) -> dict[str, Any]:
    spec = MODELS[name]
    gen = torch.Generator().manual_seed(0)
    input_dim, num_classes = model_dims(spec)
    x = torch.randn(ROWS, input_dim, generator=gen)
    y = torch.randint(0, num_classes, (ROWS,), generator=gen)
    runs: dict[str, Run] = {"sgd": _nonprivate(spec, x, y, batch, device)}
    runs.update({m: _private(spec, m, x, y, batch, device) for m in modes})

    steps: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, run in runs.items():  # warm up, then size each call to about repeat_s
            _timed(run, 2, device)
            per_step = _timed(run, 3, device)[0]
            steps[key] = max(3, min(200, round(repeat_s / max(per_step, 1e-6))))
        wall: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):  # interleaved: every variant sees the same machine state
            for key, run in runs.items():
                w, c = _timed(run, steps[key], device)
                wall[key].append(w)
                cpu[key].append(c)

    def ratios(samples: dict[str, list[float]]) -> dict[str, float]:
        base = statistics.median(samples["sgd"])
        return {m: statistics.median(samples[m]) / base for m in modes}

    return {
        "model": name,
        "spec": spec.model_dump(mode="json"),
        "parameters": count_parameters(build_model(spec)),
        "batch_size": batch,
        "default_mode": choose_grad_sample_mode(spec),
        "ms_wall": {k: statistics.median(v) * 1e3 for k, v in wall.items()},
        "ms_cpu": {k: statistics.median(v) * 1e3 for k, v in cpu.items()},
        "ratio_wall": ratios(wall),
        "ratio_cpu": ratios(cpu),
        "steps_per_call": steps,
        "repeats": repeats,
    }


def _table(rows: list[dict[str, Any]], modes: tuple[str, ...], cpu: bool) -> str:
    clock = "ms_cpu" if cpu else "ms_wall"
    ratio = "ratio_cpu" if cpu else "ratio_wall"
    head = f"{'model':<11}{'batch':>6}{'params':>11}{'sgd ms':>9}"
    for mode in modes:
        head += f"{mode + ' ms':>15}{'×':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['model']:<11}{r['batch_size']:>6}{r['parameters']:>11,}{r[clock]['sgd']:>9.2f}"
        for mode in modes:
            line += f"{r[clock][mode]:>15.2f}{r[ratio][mode]:>8.2f}×"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=DEFAULT_MODELS)
    parser.add_argument("--batch", nargs="+", type=int, default=[256])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=DEFAULT_MODES)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--repeat-seconds", type=float, default=0.3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: see the module docstring)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device on this machine.")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = tuple(args.modes)

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    rows = [
        bench_model(
            name,
            batch=batch,
            modes=modes,
            repeats=args.repeats,
            repeat_s=args.repeat_seconds,
            device=device,
        )
        for name in args.models
        for batch in args.batch
    ]
    env = {
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(
        f"DP-SGD step / non-private SGD step on {env['device']} (median of {args.repeats} "
        f"interleaved repeats; torch {env['torch']}, opacus {env['opacus']}, "
        f"{env['torch_threads']} threads)"
    )
    if device.type == "cpu":
        print("\nthread CPU time per step:")
        print(_table(rows, modes, cpu=True))
    print("\nwall time per step:")
    print(_table(rows, modes, cpu=False))
    print(
        f"\nwall time {env['wall_s']} s; 1-min load average before/after "
        f"{env['loadavg_1min_before_after']} on {env['cpu_count']} CPUs"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
