"""Round time and orchestrator memory with 10, 50 and 200 site agents and a ~1M-parameter MLP.

Two measurements, each case in a fresh child process so that memory baselines are clean:

1. **Live federation.** An orchestrator (``start_server`` with the product's defaults, as
   ``orchestrator serve`` runs it, except for the worker threads below; plaintext here) in the
   child process, and N site agents as ``SiteAgent`` threads spread over ``ceil(N / 50)``
   *other* processes (``bench/_agent_host.py``), so the child's resident memory is the
   orchestrator's (plus a small client following the job). Every site holds 64 synthetic rows
   (64 features, 10 classes); the job trains an MLP 64 → 1024 → 896 → 10 (993,930
   parameters, 3.98 MB as float32) for 2 rounds (1 round from 200 sites, to stay within
   a few minutes) of one DP-SGD step (batch 16, σ = 1, metrics off). Agents poll with 20 s
   long-polls and heartbeat every 5 s. The orchestrator gets max(64, 2N + 32) gRPC worker
   threads: with the product's default of 64, every worker is taken by a site's long-poll
   once there are more than about 60 sites, and other calls queue behind them (at 200 sites
   ``SubmitJob`` timed out after 30 s; ``--max-workers 64`` reproduces it).
   Reported: each round's ``duration_s``; the orchestrator process's peak RSS above its RSS
   just before the job (sampled every 5 ms) divided by the model's size; its CPU seconds;
   its RSS every 0.2 s with the times updates were folded (``rss_timeline_s_mib``,
   ``folded_at_s``: does the peak build up with the sites or plateau?). ``--trace-python``
   adds the peak of Python objects (``tracemalloc``); it is off by default because its own
   tables count in the RSS and it doubles the orchestrator's CPU time. ``--max-uploads K``
   sets the orchestrator's upload places (updates read or queued at once; default 4).
   All sites and the orchestrator share this machine's 2 cores, so round time here is
   bounded by the sites' total CPU work (N DP-SGD steps, N ledger fsyncs, N model
   transfers), not by what one site would see: the orchestrator's CPU time per round is the
   number that speaks for the orchestrator. Sites have equal sizes, so their privacy
   accounting is identical and hits the per-process cache (real sites would each pay it once,
   on their own machine).
2. **Aggregation path.** The orchestrator's per-update work in isolation: N updates of a
   model of P parameters, each taken as ``PushUpdate`` takes it (128 KiB chunks into a spool
   file, ``orchestrator.core.spool.receive``), read piece by piece (``SafetensorsPieces``),
   checked (``check_update``, which also gives the norm) and folded into
   ``RunningWeightedMean``, then ``mean`` + ``apply_delta``; peak RSS above the baseline (the
   reference state and one update's bytes already in memory), divided by the model's
   float32 size. For contrast,
   Flower's ``aggregate`` (``flwr.server.strategy.aggregate``), which needs all N updates in
   memory, on the 1M model.

``--legacy`` also runs the live cases with transfers as dpfed made them before the memory
fixes (1 MiB chunks, every ``FetchModel`` streaming at once, glibc's adaptive mmap threshold;
``_harness.use_legacy_transfers``), in the same run, for a side-by-side comparison. Uploads
wait for the orchestrator's go in both (the protocol has no other way).

Writes ``bench/results/scale_sites.json`` and ``scale_sites.png``.
Run: ``.venv/bin/python bench/bench_scale_sites.py`` (about 2-3 minutes on 2 cores;
``--legacy`` adds about 2).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

HIDDEN = (1024, 896)
INPUT, CLASSES, ROWS = 64, 10, 64
AGENTS_PER_HOST = 50


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _spec(n: int, rounds: int) -> dict[str, Any]:
    return {
        "name": f"scale-{n}",
        "dataset": "synthetic",
        "model": {"kind": "mlp", "input_dim": INPUT, "num_classes": CLASSES, "hidden": HIDDEN},
        "rounds": rounds,
        "local_steps": 1,
        "batch_size": 16,
        "optimizer": {"name": "sgd", "lr": 0.1},
        "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
        "metrics": {"enabled": False},
        "min_sites": n,
        "round_timeout_s": 900,
        "start_timeout_s": 300,
        "seed": 0,
    }


def _threads() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def live_case(
    n: int,
    rounds: int,
    max_workers: int,
    legacy: bool = False,
    trace_python: bool = False,
    max_uploads: int | None = None,
) -> dict[str, Any]:
    from common.specs import parse_job_spec
    from common.training.models import build_model, count_parameters

    server_kwargs: dict[str, Any] = {}
    env = dict(os.environ)
    if legacy:  # transfers as before the fixes, for a side-by-side comparison
        h.use_legacy_transfers()
        server_kwargs = dict(h.LEGACY_SERVER_KWARGS)
        env[h.LEGACY_TRANSFER_ENV] = "1"
    if max_uploads is not None:
        server_kwargs["max_uploads"] = max_uploads

    spec = _spec(n, rounds)
    params = count_parameters(build_model(parse_job_spec(spec).model))
    model_bytes = params * 4
    tmp = Path(tempfile.mkdtemp(prefix=f"dpfed-scale-{n}-"))
    rng = np.random.default_rng(0)
    t_case = time.time()
    try:
        with h.federation(
            tmp / "fed",
            offline_after_s=60.0,
            max_workers=max_workers,
            server_kwargs=server_kwargs,
        ) as fed:
            fed.start()
            configs = []
            for i in range(n):
                x = rng.standard_normal((ROWS, INPUT)).astype(np.float32)
                y = rng.integers(0, CLASSES, size=ROWS)
                configs.append(
                    h.write_site(
                        fed.root,
                        f"site-{i:03d}",
                        x,
                        y,
                        address=fed.address,
                        dataset="synthetic",
                        feature_bounds=(-5.0, 5.0),
                        num_classes=CLASSES,
                        poll_s=20.0,
                        heartbeat_s=5.0,
                        threads=None,
                    )
                )
            hosts = math.ceil(n / AGENTS_PER_HOST)
            for k in range(hosts):
                lst = fed.root / f"host-{k}.txt"
                lst.write_text("\n".join(str(c) for c in configs[k::hosts]) + "\n")
                log = (fed.root / f"host-{k}.log").open("ab")
                fed.procs.append(
                    subprocess.Popen(
                        [sys.executable, str(h.BENCH / "_agent_host.py"), str(lst)],
                        stdout=log,
                        stderr=log,
                        start_new_session=True,
                        cwd=str(h.ROOT),
                        env=env,
                    )
                )
                fed.proc_logs.append(fed.root / f"host-{k}.log")
                log.close()
            ready_s = fed.wait_sites(n, timeout_s=300)
            gc.collect()
            h.install_orchestrator_timers()
            threads0 = _threads()
            if trace_python:  # tracemalloc's own tables count in the RSS and slow allocation
                tracemalloc.start()
            cpu0 = _cpu_s()
            with h.RssSampler(0.005, keep=True) as rss, fed.client() as c:
                t0 = time.time()
                st = h.run_job(c, spec)
                job_wall = time.time() - t0
            cpu = _cpu_s() - cpu0
            threads1 = _threads()
            traced_peak = tracemalloc.get_traced_memory()[1] if trace_python else None
            tracemalloc.stop()
            per_round = []
            for rec in h.TIMELINE.records:
                if rec["what"] != "round":
                    continue
                per_round.append(
                    {
                        "round": rec["round"],
                        "rss_at_start_mib": rss.at(rec["t0"]),
                        "rss_peak_mib": rss.peak_between(rec["t0"], rec["t1"]),
                        "rss_at_end_mib": rss.at(rec["t1"]),
                    }
                )
            # RSS over the job (every 0.2 s) and the times updates were folded, from the job's
            # start: shows whether the peak builds up with the sites or plateaus
            timeline: list[tuple[float, float]] = []
            for ts, v in rss.samples:
                if not timeline or ts - t0 >= timeline[-1][0] + 0.2:
                    timeline.append((round(ts - t0, 3), v))
            folds = [
                round(rec["t1"] - t0, 3) for rec in h.TIMELINE.records if rec["what"] == "aggregate"
            ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    durations = [r.duration_s for r in st.history]
    return {
        "sites": n,
        "transfer": "legacy" if legacy else "current",
        "agent_processes": math.ceil(n / AGENTS_PER_HOST),
        "grpc_max_workers": max_workers,
        "max_uploads": max_uploads,
        "parameters": params,
        "model_mib": model_bytes / 2**20,
        "rounds": rounds,
        "round_s": durations,
        "agents_ready_s": ready_s,
        "job_wall_s": job_wall,
        "orchestrator_cpu_s": cpu,
        "orchestrator_cpu_s_per_round": cpu / rounds,
        "orchestrator_rss_baseline_mib": rss.baseline,
        "orchestrator_rss_peak_mib": rss.peak,
        "orchestrator_peak_increase_mib": rss.peak - rss.baseline,
        "peak_increase_over_model_size": (rss.peak - rss.baseline) * 2**20 / model_bytes,
        "rss_per_round": per_round,
        "traced_python_peak_mib": traced_peak / 2**20 if traced_peak else float("nan"),
        "traced_python_peak_over_model_size": (
            traced_peak / model_bytes if traced_peak else float("nan")
        ),
        "orchestrator_threads_before": threads0,
        "orchestrator_threads_after": threads1,
        "rss_timeline_s_mib": timeline,
        "folded_at_s": folds,
        "case_wall_s": time.time() - t_case,
    }


def agg_case(params: int, n: int, method: str) -> dict[str, Any]:
    import torch

    from common.training.tensors import (
        SafetensorsPieces,
        check_update,
        iter_chunks,
        state_from_bytes,
        state_to_bytes,
    )
    from orchestrator.core.spool import receive
    from orchestrator.training.aggregation import RunningWeightedMean, apply_delta

    # Two tensors like a dense layer and its bias; params in total.
    cols = 1000
    rows = (params - cols) // cols
    state = {"w": torch.zeros(rows, cols), "b": torch.zeros(params - rows * cols)}
    g = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in state.items()}
    blob = state_to_bytes(delta)
    del delta
    model_bytes = params * 4
    spool_dir = Path(tempfile.mkdtemp(prefix="dpfed-agg-spool-"))

    def spooled() -> Any:  # as PushUpdate takes an upload: chunk by chunk into a spool file
        return receive(iter_chunks(blob, 128 << 10), size=len(blob), spool_dir=spool_dir)

    # Warm up the code path once, then take the baseline.
    with spooled() as payload:
        check_update(SafetensorsPieces(payload), state)
    gc.collect()
    base = h.rss_mib()
    peak_before = h.max_rss_mib()
    t0 = time.perf_counter()
    with h.RssSampler(0.002) as rss:
        if method == "running":
            agg = RunningWeightedMean(state)
            for i in range(n):
                with spooled() as payload:
                    d = SafetensorsPieces(payload)
                    check_update(d, state)  # and the norm, in the same pass
                    agg.add(d, 10.0 + i)
                del d
            new = apply_delta(state, agg.mean())
        else:
            from flwr.server.strategy.aggregate import aggregate

            results = []
            for i in range(n):
                d = state_from_bytes(blob)
                results.append(([d[k].numpy() for k in sorted(d)], 10 + i))
                del d
            new = aggregate(results)
        del new
    seconds = time.perf_counter() - t0
    shutil.rmtree(spool_dir, ignore_errors=True)
    peak_after = h.max_rss_mib()
    peak = max(rss.peak, peak_after if peak_after > peak_before else 0.0)
    return {
        "method": method,
        "parameters": params,
        "updates": n,
        "model_mib": model_bytes / 2**20,
        "rss_baseline_mib": base,
        "peak_increase_mib": peak - base,
        "peak_increase_over_model_size": (peak - base) * 2**20 / model_bytes,
        "seconds": seconds,
        "ms_per_update": seconds / n * 1e3,
    }


def _child(args: list[str], timeout_s: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    try:
        res = subprocess.run(
            [sys.executable, __file__, *args, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=str(h.ROOT),
        )
        if res.returncode != 0 or not out.read_text().strip():
            return {"error": f"exit {res.returncode}: {(res.stdout + res.stderr)[-1500:]}"}
        result: dict[str, Any] = json.loads(out.read_text())
        return result
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    finally:
        out.unlink(missing_ok=True)


def _traced(r: dict[str, Any]) -> bool:
    """Whether the case ran tracemalloc (``--trace-python``)."""
    return not math.isnan(r.get("traced_python_peak_over_model_size", float("nan")))


def _plot(live: list[dict[str, Any]], agg: list[dict[str, Any]], path: Path) -> None:
    plt = h.pyplot()
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(14, 4.2))
    old = [r for r in live if "error" not in r and r.get("transfer") == "legacy"]
    ok = [r for r in live if "error" not in r and r.get("transfer", "current") == "current"]
    ns = [r["sites"] for r in ok] or [1]
    if not ok:
        ok = [
            {
                "sites": 1,
                "peak_increase_over_model_size": float("nan"),
                "traced_python_peak_over_model_size": float("nan"),
                "round_s": [float("nan")],
                "orchestrator_cpu_s_per_round": float("nan"),
            }
        ]
    ax.plot(
        ns,
        [r["peak_increase_over_model_size"] for r in ok],
        "o-",
        label="process RSS, peak - before",
    )
    if any(_traced(r) for r in ok):
        ax.plot(
            ns,
            [r["traced_python_peak_over_model_size"] for r in ok],
            "s--",
            label="Python objects (tracemalloc peak)",
        )
    if old:
        ax.plot(
            [r["sites"] for r in old],
            [r["peak_increase_over_model_size"] for r in old],
            "x:",
            color="tab:red",
            label="process RSS, legacy transfers",
        )
    ax.plot(ns, ns, ":", color="grey", label="one model copy per site")
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("sites")
    ax.set_yscale("log")
    ax.set_ylabel("peak memory / model size")
    ax.set_title("Live orchestrator peak memory, 1M-param MLP", fontsize=10)
    ax.legend(fontsize=8)
    for method, style in (("running", "o-"), ("flower", "s--")):
        sizes = sorted({r["parameters"] for r in agg if r.get("method") == method})
        for p in sizes:
            rs = sorted(
                (r for r in agg if r.get("method") == method and r["parameters"] == p),
                key=lambda r: r["updates"],
            )
            name = "RunningWeightedMean" if method == "running" else "Flower aggregate()"
            bx.plot(
                [r["updates"] for r in rs],
                [r["peak_increase_over_model_size"] for r in rs],
                style,
                label=f"{name}, {p / 1e6:g}M params",
            )
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("updates aggregated")
    bx.set_ylabel("peak RSS increase / model size")
    bx.set_title("Aggregation path alone", fontsize=10)
    bx.legend(fontsize=7)
    cx.plot(ns, [r["round_s"][0] for r in ok], "o-", label="round 1 wall time")
    if old:
        cx.plot(
            [r["sites"] for r in old],
            [r["round_s"][0] for r in old],
            "x:",
            color="tab:red",
            label="round 1, legacy transfers",
        )
    cx.plot(
        ns, [r["orchestrator_cpu_s_per_round"] for r in ok], "s--", label="orchestrator CPU/round"
    )
    cx.set_xscale("log")
    cx.set_yscale("log")
    cx.set_xticks(ns, [str(n) for n in ns])
    cx.set_xlabel("sites (all on one 2-core machine)")
    cx.set_ylabel("seconds")
    cx.set_title("Round time vs sites", fontsize=10)
    cx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    global HIDDEN
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sites", type=int, nargs="*", default=[10, 50, 200])
    ap.add_argument(
        "--rounds", type=int, default=0, help="rounds per case (default: 2, or 1 from 200 sites)"
    )
    ap.add_argument(
        "--max-workers",
        type=int,
        default=0,
        help="orchestrator gRPC threads (default 0: max(64, 2N + 32); the product's default is 64)",
    )
    ap.add_argument(
        "--legacy",
        action="store_true",
        help="also run the live cases with transfers as before the memory fixes (1 MiB chunks, "
        "no download limit, no upload gate, glibc's adaptive mmap threshold), in the same run",
    )
    ap.add_argument(
        "--hidden",
        type=int,
        nargs=2,
        default=list(HIDDEN),
        metavar=("W1", "W2"),
        help="hidden widths of the live cases' MLP (default 1024 896: ~1M parameters); a "
        "non-default size writes scale_sites_<params>.json instead",
    )
    ap.add_argument(
        "--trace-python",
        action="store_true",
        help="also run tracemalloc in the orchestrator to report the peak of Python objects; "
        "its tables count in the RSS and it doubles the orchestrator's CPU, so the default "
        "run leaves it off",
    )
    ap.add_argument(
        "--max-uploads",
        type=int,
        default=None,
        help="the orchestrator's max_uploads (updates read or queued at once per round; the "
        "product's default when left out)",
    )
    ap.add_argument(
        "--name",
        default=None,
        help="results file name without extension (default scale_sites, or "
        "scale_sites_<params> for a non-default --hidden)",
    )
    ap.add_argument("--agg-params", type=int, nargs="*", default=[1_000_000, 4_000_000])
    ap.add_argument("--agg-updates", type=int, nargs="*", default=[10, 50, 200])
    # internal: one case per child process
    ap.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--legacy-case", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--agg", nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    HIDDEN = (args.hidden[0], args.hidden[1])
    if args.case is not None:
        import logging

        logging.basicConfig(level=logging.WARNING)
        workers = args.max_workers or max(64, 2 * args.case + 32)
        res = live_case(
            args.case,
            args.rounds,
            workers,
            legacy=args.legacy_case,
            trace_python=args.trace_python,
            max_uploads=args.max_uploads,
        )
        args.out.write_text(json.dumps(res))
        return 0
    if args.agg is not None:
        res = agg_case(int(args.agg[0]), int(args.agg[1]), args.agg[2])
        args.out.write_text(json.dumps(res))
        return 0

    started = time.time()
    agg: list[dict[str, Any]] = []
    print("aggregation path (peak RSS increase / model size; ms per update):", flush=True)
    for p in args.agg_params:
        for method in ("running", "flower"):
            if method == "flower" and p > 1_000_000:
                continue  # all N updates in memory: 200 x 40 MB would dominate the run
            for n in args.agg_updates:
                r = _child(["--agg", str(p), str(n), method], timeout_s=300)
                r.update({"parameters": p, "updates": n, "method": method})
                agg.append(r)
                if "error" in r:
                    print(f"  {method} P={p:,} N={n}: {r['error']}", flush=True)
                    continue
                print(
                    f"  {'RunningWeightedMean' if method == 'running' else 'Flower aggregate':<20}"
                    f" P={p / 1e6:>4g}M N={n:>4}: peak +{r['peak_increase_mib']:8.1f} MiB = "
                    f"{r['peak_increase_over_model_size']:6.2f}x model, "
                    f"{r['ms_per_update']:6.1f} ms/update",
                    flush=True,
                )
    live: list[dict[str, Any]] = []
    shape = "-".join(str(w) for w in (INPUT, *HIDDEN, CLASSES))
    print(f"\nlive federation (MLP {shape}, 1 DP-SGD step per round):", flush=True)
    modes = [False, True] if args.legacy else [False]
    for legacy in modes:
        if args.legacy:
            print("  legacy transfers:" if legacy else "  current transfers:", flush=True)
        for n in args.sites:
            rounds = args.rounds or (2 if n < 200 else 1)
            cmd = [
                "--case",
                str(n),
                "--rounds",
                str(rounds),
                "--max-workers",
                str(args.max_workers),
                "--hidden",
                *(str(w) for w in HIDDEN),
                *(["--trace-python"] if args.trace_python else []),
                *(["--max-uploads", str(args.max_uploads)] if args.max_uploads else []),
            ]
            r = _child([*cmd, "--legacy-case"] if legacy else cmd, timeout_s=900)
            r.setdefault("sites", n)
            r.setdefault("transfer", "legacy" if legacy else "current")
            live.append(r)
            if "error" in r:
                print(f"  {n:>4} sites: {r['error']}", flush=True)
                continue
            print(
                f"  {n:>4} sites: rounds {', '.join(f'{s:.1f}' for s in r['round_s'])} s; "
                f"orchestrator CPU {r['orchestrator_cpu_s_per_round']:.2f} s/round; "
                f"RSS {r['orchestrator_rss_baseline_mib']:.0f} -> "
                f"{r['orchestrator_rss_peak_mib']:.0f} MiB "
                f"(+{r['orchestrator_peak_increase_mib']:.0f}"
                f" = {r['peak_increase_over_model_size']:.1f}x model"
                + (
                    f"; Python objects {r['traced_python_peak_over_model_size']:.1f}x"
                    if _traced(r)
                    else ""
                )
                + f"); threads "
                f"{r['orchestrator_threads_before']} -> {r['orchestrator_threads_after']}; "
                f"agents ready in {r['agents_ready_s']:.0f} s",
                flush=True,
            )
    ok = [r for r in live if "error" not in r and r["transfer"] == "current"]
    old = [r for r in live if "error" not in r and r["transfer"] == "legacy"]
    by_p: dict[int, list[float]] = {}
    for r in agg:
        if r.get("method") == "running" and "error" not in r:
            by_p.setdefault(r["parameters"], []).append(r["peak_increase_over_model_size"])
    agg_max = max((max(v) for v in by_p.values()), default=float("nan"))
    live_rss = {r["sites"]: r["peak_increase_over_model_size"] for r in ok}
    live_py = {r["sites"]: r["traced_python_peak_over_model_size"] for r in ok if _traced(r)}
    verdict = {
        "aggregation_peak_over_model_by_params": {str(p): v for p, v in by_p.items()},
        "aggregation_max_peak_over_model": agg_max,
        "aggregation_within_small_multiple": bool(agg_max <= 16) if by_p else None,
        "live_rss_peak_over_model_by_sites": live_rss,
        "live_python_peak_over_model_by_sites": live_py,
        "live_within_small_multiple": bool(live_rss and max(live_rss.values()) <= 16),
        "legacy_rss_peak_over_model_by_sites": {
            r["sites"]: r["peak_increase_over_model_size"] for r in old
        },
    }
    print("\npeak memory / model size (target: a small multiple whatever the number of sites)")
    if by_p:
        print(
            f"  aggregation path (RunningWeightedMean): max {agg_max:.1f}x over N = "
            f"{args.agg_updates} -> "
            f"{'MET' if verdict['aggregation_within_small_multiple'] else 'NOT met'}"
        )
    print(
        "  live orchestrator process (RSS): "
        + ", ".join(f"{n} sites {v:.0f}x" for n, v in live_rss.items())
        + ("; Python objects: " if live_py else "")
        + ", ".join(f"{n} sites {v:.1f}x" for n, v in live_py.items())
        + f" -> {'MET' if verdict['live_within_small_multiple'] else 'NOT met (above 16x)'}"
    )
    if old:
        print(
            "  the same with legacy transfers (RSS): "
            + ", ".join(
                f"{r['sites']} sites {r['peak_increase_over_model_size']:.0f}x" for r in old
            )
        )
    payload = {
        "benchmark": "scale_sites",
        "command": " ".join(
            [".venv/bin/python bench/bench_scale_sites.py", *(argv or sys.argv[1:])]
        ),
        "environment": h.environment(),
        "wall_s": time.time() - started,
        "live": live,
        "aggregation": agg,
        "summary": verdict,
    }
    params = INPUT * HIDDEN[0] + HIDDEN[0] + HIDDEN[0] * HIDDEN[1] + HIDDEN[1]
    params += HIDDEN[1] * CLASSES + CLASSES
    name = args.name or ("scale_sites" if HIDDEN == (1024, 896) else f"scale_sites_{params}")
    path = h.write_json(f"{name}.json", payload)
    try:
        _plot(live, agg, h.RESULTS / f"{name}.png")
    except Exception as err:  # keep the JSON even if a plot cannot be drawn
        print(f"plot failed: {err}")
    print(f"wrote {path} and {name}.png in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
