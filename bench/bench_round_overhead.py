"""Seconds per round with trivial local work: dpfed's round overhead, and Flower's for comparison.

Three sites on 127.0.0.1 hold scikit-learn's digits split 50/30/20%. The job trains a linear
64 → 10 model for one DP-SGD step per round (``local_steps: 1``, batch 32, σ = 1) with
metrics disabled, so almost all of a round is the framework's own work: dispatching the task,
moving the model both ways, the site's policy check, write-ahead ledger charge and privacy
accounting, the orchestrator's update checks, aggregation, checkpoint and job accounting.

For every round the script takes the round's duration from the job's history
(``RoundSummary.duration_s``) and, from timers wrapped around the agent's functions (no
product change), how long ``train_local`` (Opacus DP-SGD, including its set-up) ran on the
slowest site; *overhead* is duration minus that, *overhead fraction* is overhead / duration.
It measures three dpfed set-ups in one run:

* ``threads`` — the orchestrator and three ``SiteAgent`` threads in this process (plaintext);
* ``processes`` — the orchestrator here, three ``site-agent serve`` processes (plaintext, as
  Flower's ``--insecure`` below);
* ``processes+mtls`` — the same with the product's default mutual TLS.

Then it starts Flower 1.42 (``flower-superlink --insecure``, three ``flower-supernode
--insecure``) and ``flwr run``s the minimal app in ``bench/flower_app`` (Flower's own
``FedAvg``, training only, one numpy softmax-regression step on the same 64 → 10 model as
trivial work) and reads its per-round wall times. ``--no-flower`` skips it; when Flower
cannot run, the issue's reference figure (about 6 s per round with 3 SuperNodes) is used.

It checks issue 19.1's targets: Flower's wall time per round at least 50× dpfed's (3 agent
processes with mTLS), and, with ``--rounds 200``, the median of the last 11 rounds within 10%
of rounds 2-12 (the site's and the orchestrator's accounting must not grow with the history).

Writes ``bench/results/<name>.json`` (``--name``, default ``round_overhead``) and, when
matplotlib is installed, ``<name>.png``.
Run: ``.venv/bin/python bench/bench_round_overhead.py`` (about 3-4 minutes on 2 cores);
issue 19.1's run: ``.venv/bin/python bench/bench_round_overhead.py --rounds 200
--only processes+mtls --name round_overhead_200`` (about 3 minutes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

FLOWER_REFERENCE_S = 6.0  # the figure: Flower, 3 SuperNodes, trivial work
SITES = (("bank-a", 0.5), ("bank-b", 0.3), ("bank-c", 0.2))


def _digits_parts(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(y))
    cuts = np.cumsum([round(f * len(order)) for _, f in SITES])[:-1]
    return [(x[i], y[i]) for i in np.split(order, cuts)]


def _spec(rounds: int) -> dict[str, Any]:
    return {
        "name": "round-overhead",
        "dataset": "digits",
        "model": {"kind": "linear", "input_dim": 64, "num_classes": 10},
        "rounds": rounds,
        "local_steps": 1,
        "batch_size": 32,
        "optimizer": {"name": "sgd", "lr": 0.1},
        "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
        "metrics": {"enabled": False},
        "min_sites": 3,
        "round_timeout_s": 60,
        "seed": 0,
    }


def _within(r: dict[str, Any], lo: float, hi: float) -> bool:
    return bool(r["t0"] >= lo - 1e-3 and r["t1"] <= hi + 1e-3)


def _analyse(history: Any, records: list[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    """Per round: duration, slowest site's train_local, and where the rest of the time went."""
    rows = []
    orch_rounds = {
        r["round"]: r for r in records if r["what"] == "round" and r.get("job") == job_id
    }
    for summary in history:
        rnd = summary.round
        o = orch_rounds.get(rnd)
        handles = [
            r
            for r in records
            if r["what"] == "handle" and r.get("round") == rnd and r.get("job") == job_id
        ]
        sites: dict[str, dict[str, float]] = {}
        for hd in handles:
            mine = [
                r
                for r in records
                if r["who"] == hd["who"] and r is not hd and _within(r, hd["t0"], hd["t1"])
            ]

            def total(what: str, mine: list[dict[str, Any]] = mine) -> float:
                return float(sum(r["t1"] - r["t0"] for r in mine if r["what"] == what))

            execute = total("execute")
            train = total("train_local")
            sites[hd["who"]] = {
                "start_latency_s": hd["t0"] - o["t0"] if o else float("nan"),
                "handle_s": hd["t1"] - hd["t0"],
                "fetch_s": total("fetch"),
                "train_local_s": train,
                "site_bookkeeping_s": execute - train,
                "site_accounting_s": total("accounting"),
                "ledger_charge_s": total("ledger_charge"),
                "policy_check_s": total("policy_check"),
                "push_s": (hd["t1"] - hd["t0"]) - total("fetch") - execute,
                "end": hd["t1"],
            }
        orch: dict[str, float] = {}
        if o is not None:
            for what in ("check_update", "aggregate", "checkpoint", "job_epsilon", "commit_round"):
                orch[what + "_s"] = sum(
                    r["t1"] - r["t0"]
                    for r in records
                    if r["who"] == "orchestrator"
                    and r["what"] == what
                    and _within(r, o["t0"], o["t1"])
                )
            last = max((s["end"] for s in sites.values()), default=o["t0"])
            orch["tail_after_last_update_s"] = o["t1"] - last
            orch["round_wall_s"] = o["t1"] - o["t0"]
        max_train = max((s["train_local_s"] for s in sites.values()), default=0.0)
        slowest = max(sites.values(), key=lambda s: s["end"]) if sites else {}
        rows.append(
            {
                "round": rnd,
                "duration_s": summary.duration_s,
                "max_train_local_s": max_train,
                "overhead_s": summary.duration_s - max_train,
                "overhead_fraction": 1.0 - max_train / summary.duration_s,
                "last_site": {k: v for k, v in slowest.items() if k != "end"},
                "orchestrator": orch,
                "sites_seen": len(sites),
            }
        )
    return rows


def run_dpfed(name: str, *, processes: bool, mtls: bool, rounds: int, tmp: Path) -> dict[str, Any]:
    h.install_orchestrator_timers()
    if not processes:
        h.install_site_timers()
    parts = _digits_parts()
    timings = tmp / f"{name}-timings"
    timings.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    with h.federation(tmp / name, mtls=mtls) as fed:
        fed.start([s for s, _ in SITES])
        configs = [
            h.write_site(
                fed.root,
                site_id,
                x,
                y,
                address=fed.address,
                dataset="digits",
                poll_s=10.0,
                heartbeat_s=2.0,
                tls=fed.site_tls(site_id),
            )
            for (site_id, _), (x, y) in zip(SITES, parts, strict=True)
        ]
        if processes:
            fed.add_process_agents(configs, timings_dir=timings)
        else:
            fed.add_thread_agents(configs)
        startup_s = fed.wait_sites(len(SITES))
        with fed.client() as c:
            t0 = time.time()
            st = h.run_job(c, _spec(rounds))
            job_wall = time.time() - t0
    records = list(h.TIMELINE.records)
    for f in timings.glob("*.jsonl"):
        records.extend(h.Timeline.load(f))
    rows = _analyse(st.history, records, st.job_id)
    later = rows[1:] if len(rows) > 2 else rows
    med = {
        k: statistics.median(r[k] for r in later)
        for k in ("duration_s", "max_train_local_s", "overhead_s", "overhead_fraction")
    }
    breakdown: dict[str, float] = {}
    for key in (
        "start_latency_s",
        "fetch_s",
        "train_local_s",
        "site_bookkeeping_s",
        "site_accounting_s",
        "ledger_charge_s",
        "policy_check_s",
        "push_s",
    ):
        vals = [r["last_site"][key] for r in later if key in r["last_site"]]
        breakdown["last_site." + key] = statistics.median(vals) if vals else float("nan")
    for key in (
        "check_update_s",
        "aggregate_s",
        "checkpoint_s",
        "job_epsilon_s",
        "commit_round_s",
        "tail_after_last_update_s",
    ):
        vals = [r["orchestrator"][key] for r in later if key in r["orchestrator"]]
        breakdown["orchestrator." + key] = statistics.median(vals) if vals else float("nan")
    return {
        "framework": "dpfed",
        "setup": name,
        "agents": "processes" if processes else "threads",
        "transport": "mTLS" if mtls else "plaintext loopback",
        "rounds": rounds,
        "agents_ready_s": startup_s,
        "job_wall_s": job_wall,
        "case_wall_s": time.time() - t_start,
        "median_excluding_round_1": med,
        "round_1": {k: rows[0][k] for k in ("duration_s", "max_train_local_s", "overhead_s")},
        "median_breakdown_s": breakdown,
        "per_round": rows,
    }


def _growth(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Median round time of rounds 2-12 against the last 11 rounds (issue 19.1)."""
    if len(rows) < 23:
        return None
    early = statistics.median(r["duration_s"] for r in rows[1:12])
    late = statistics.median(r["duration_s"] for r in rows[-11:])
    return {
        "early_rounds": [2, 12],
        "late_rounds": [rows[-11]["round"], rows[-1]["round"]],
        "early_median_s": early,
        "late_median_s": late,
        "late_over_early": late / early,
    }


# ------------------------------------------------------------------ Flower


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def run_flower(rounds: int, tmp: Path, timeout_s: float) -> dict[str, Any]:
    """Flower 1.42 deployment engine on loopback: SuperLink + 3 SuperNodes + `flwr run`."""
    venv_bin = Path(sys.executable).parent
    home = tmp / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    link_port = _free_port()
    # Flower 1.42 serves the Fleet, Control and Runtime APIs over one HTTP port (--port);
    # the gRPC ports 9092/9093 of earlier releases are no longer opened by default.
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "bench"\n\n'
        f'[superlink.bench]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        with (tmp / log).open("ab") as f:
            p = subprocess.Popen(
                cmd, stdout=f, stderr=f, env=env, cwd=str(tmp), start_new_session=True
            )
        procs.append(p)
        return p

    out = tmp / "flower_rounds.json"
    t_start = time.time()
    try:
        spawn(
            [str(venv_bin / "flower-superlink"), "--insecure", "--port", str(link_port)], "sl.log"
        )
        _wait_port(link_port, 60)
        for i in range(3):
            node_port = _free_port()
            spawn(
                [
                    str(venv_bin / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--port",
                    str(node_port),
                    "--node-config",
                    f"partition-id={i}",
                ],
                f"sn{i}.log",
            )
        time.sleep(5)  # let the SuperNodes register (the ServerApp also waits for 3 nodes)
        t_run = time.time()
        res = subprocess.run(
            [
                str(venv_bin / "flwr"),
                "run",
                str(h.BENCH / "flower_app"),
                "bench",
                "--stream",
                "--run-config",
                f"num-server-rounds={rounds} min-nodes=3 timings-file='{out}'",
            ],
            env=env,
            cwd=str(tmp),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        run_wall = time.time() - t_run
        if not out.exists():
            tail = (res.stdout + res.stderr)[-2000:]
            raise RuntimeError(f"flwr run wrote no timings (exit {res.returncode}): {tail}")
        import json

        rows = json.loads(out.read_text())
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for r in rows:
        r["overhead_s"] = r["duration_s"] - r["max_train_s"]
        r["overhead_fraction"] = 1.0 - r["max_train_s"] / r["duration_s"]
    later = rows[1:] if len(rows) > 2 else rows
    return {
        "framework": "flower 1.42.0",
        "setup": "deployment engine: superlink + 3 supernodes (--insecure), subprocess isolation",
        "rounds": rounds,
        "flwr_run_wall_s": run_wall,
        "case_wall_s": time.time() - t_start,
        "median_excluding_round_1": {
            "duration_s": statistics.median(r["duration_s"] for r in later),
            "max_train_local_s": statistics.median(r["max_train_s"] for r in later),
            "overhead_s": statistics.median(r["overhead_s"] for r in later),
            "overhead_fraction": statistics.median(r["overhead_fraction"] for r in later),
        },
        "per_round": rows,
    }


# ------------------------------------------------------------------ report


def _plot(cases: list[dict[str, Any]], flower: dict[str, Any] | None, path: Path) -> None:
    plt = h.pyplot()
    labels, totals, fracs = [], [], []
    for c in cases:
        m = c["median_excluding_round_1"]
        labels.append(f"dpfed\n{c['setup']}")
        totals.append(m["duration_s"])
        fracs.append(m["overhead_fraction"])
    if flower is not None and "median_excluding_round_1" in flower:
        m = flower["median_excluding_round_1"]
        labels.append("Flower 1.42\n3 SuperNodes")
        totals.append(m["duration_s"])
        fracs.append(m["overhead_fraction"])
    else:
        labels.append("Flower (issue's\nreference)")
        totals.append(FLOWER_REFERENCE_S)
        fracs.append(1.0)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = list(range(len(labels)))
    ax.bar(xs, totals, color=["#1f77b4"] * len(cases) + ["#7f7f7f"])
    ax.set_yscale("log")
    ax.set_ylim(min(totals) / 3, max(totals) * 3)
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel("seconds per round (median of rounds 2..N)")
    ax.set_title("Round time, 3 sites, linear 64→10, 1 local step", fontsize=10)
    for x, t, f in zip(xs, totals, fracs, strict=True):
        ax.text(x, t * 1.15, f"{t:.3g} s\n{f:.0%} overhead", ha="center", fontsize=8)
    parts = [
        ("dispatch + fetch", ("start_latency_s", "fetch_s")),
        ("train_local (DP-SGD)", ("train_local_s",)),
        ("site accounting (PRV)", ("site_accounting_s",)),
        ("other site bookkeeping", ("site_bookkeeping_s",)),
        ("push update", ("push_s",)),
    ]
    bottom = [0.0] * len(cases)
    cx = list(range(len(cases)))
    for label, keys in parts:
        vals = []
        for c in cases:
            b = c["median_breakdown_s"]
            v = sum(b.get("last_site." + k, 0.0) for k in keys) * 1e3
            if label == "other site bookkeeping":
                v -= b.get("last_site.site_accounting_s", 0.0) * 1e3
            vals.append(max(0.0, v))
        bx.bar(cx, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    tail = [c["median_breakdown_s"]["orchestrator.tail_after_last_update_s"] * 1e3 for c in cases]
    bx.bar(cx, tail, bottom=bottom, label="orchestrator after last update")
    bx.set_xticks(cx, [c["setup"] for c in cases], fontsize=8)
    bx.set_ylabel("ms (median, last site to answer)")
    bx.set_title("Where a dpfed round goes", fontsize=10)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=20, help="dpfed rounds per set-up")
    ap.add_argument("--flower-rounds", type=int, default=6)
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--only", nargs="*", help="dpfed set-ups to run (default: all three)")
    ap.add_argument("--flower-timeout", type=float, default=180.0)
    ap.add_argument("--keep-tmp", action="store_true", help="keep the work folder (logs)")
    ap.add_argument("--name", default="round_overhead", help="results file name (no suffix)")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="dpfed-round-overhead-"))
    started = time.time()
    cases = []
    try:
        for name, processes, mtls in (
            ("threads", False, False),
            ("processes", True, False),
            ("processes+mtls", True, True),
        ):
            if args.only and name not in args.only:
                continue
            c = run_dpfed(name, processes=processes, mtls=mtls, rounds=args.rounds, tmp=tmp)
            cases.append(c)
            m = c["median_excluding_round_1"]
            print(
                f"dpfed {name:<15} {m['duration_s'] * 1e3:7.1f} ms/round "
                f"(train_local {m['max_train_local_s'] * 1e3:6.1f} ms, overhead "
                f"{m['overhead_s'] * 1e3:6.1f} ms = {m['overhead_fraction']:.0%}); "
                f"round 1: {c['round_1']['duration_s'] * 1e3:.0f} ms",
                flush=True,
            )
        flower: dict[str, Any] | None = None
        if not args.no_flower:
            try:
                flower = run_flower(args.flower_rounds, tmp / "flower", args.flower_timeout)
                m = flower["median_excluding_round_1"]
                print(
                    f"flower 3 SuperNodes     {m['duration_s'] * 1e3:7.1f} ms/round "
                    f"(train {m['max_train_local_s'] * 1e3:6.2f} ms, overhead "
                    f"{m['overhead_s'] * 1e3:7.1f} ms = {m['overhead_fraction']:.1%})",
                    flush=True,
                )
            except Exception as err:
                flower = {"error": f"{type(err).__name__}: {str(err)[:1500]}"}
                print(f"flower could not run: {flower['error']}", flush=True)
        if flower is None or "error" in (flower or {}):
            ref = {"overhead_s": FLOWER_REFERENCE_S, "duration_s": FLOWER_REFERENCE_S}
            flower_source = "issue reference (about 6 s per round)"
        else:
            ref = flower["median_excluding_round_1"]
            flower_source = "measured in this run"
        ratios = {}
        for c in cases:
            m = c["median_excluding_round_1"]
            ratios[c["setup"]] = {
                "flower_overhead_over_dpfed_overhead": ref["overhead_s"] / m["overhead_s"],
                "flower_round_over_dpfed_round": ref["duration_s"] / m["duration_s"],
            }
            c["growth"] = _growth(c["per_round"])
        print(f"\nratios vs Flower ({flower_source}), medians of rounds 2..N:")
        for setup, r in ratios.items():
            ok = "MET" if r["flower_round_over_dpfed_round"] >= 50 else "NOT met"
            print(
                f"  {setup:<15} Flower overhead / dpfed overhead = "
                f"{r['flower_overhead_over_dpfed_overhead']:6.1f}x   round time ratio "
                f"{r['flower_round_over_dpfed_round']:6.1f}x   (target >= 50x: {ok})"
            )
        print("\nround time against the round number (issue 19.1: late rounds within 10%):")
        for c in cases:
            g = c["growth"]
            if g is None:
                print(f"  {c['setup']:<15} needs at least 23 rounds (--rounds 200)")
                continue
            ok = "MET" if g["late_over_early"] <= 1.10 else "NOT met"
            print(
                f"  {c['setup']:<15} median of rounds 2-12 {g['early_median_s'] * 1e3:6.1f} ms, "
                f"of rounds {g['late_rounds'][0]}-{g['late_rounds'][1]} "
                f"{g['late_median_s'] * 1e3:6.1f} ms: {g['late_over_early']:.3f}x "
                f"(target <= 1.10: {ok})"
            )
        print("\nmedian breakdown of dpfed rounds (the last site to answer), ms:")
        keys = list(cases[0]["median_breakdown_s"])
        print(f"  {'':<42}" + "".join(f"{c['setup']:>16}" for c in cases))
        for k in keys:
            print(
                f"  {k:<42}" + "".join(f"{c['median_breakdown_s'][k] * 1e3:16.1f}" for c in cases)
            )
        payload = {
            "benchmark": "round_overhead",
            "command": " ".join(
                [".venv/bin/python", "bench/bench_round_overhead.py", *(argv or sys.argv[1:])]
            ),
            "environment": h.environment(),
            "wall_s": time.time() - started,
            "dpfed": cases,
            "flower": flower,
            "flower_source": flower_source,
            "ratios": ratios,
            "target": (
                "Flower's wall time per round / dpfed's >= 50 (3 site-agent processes, mTLS); "
                "median of rounds N-10..N within 10% of rounds 2..12 (N = 200)"
            ),
        }
        path = h.write_json(args.name + ".json", payload)
        try:
            _plot(cases, flower, h.RESULTS / (args.name + ".png"))
            drawn = f" and {args.name}.png"
        except ImportError:
            drawn = " (no plot: matplotlib is not installed)"
        print(f"\nwrote {path}{drawn} in {time.time() - started:.0f} s")
    finally:
        if args.keep_tmp:
            print(f"work folder kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
