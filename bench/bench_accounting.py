"""Time to compute one dataset's ε from a ledger of 1,000 recorded jobs, per accountant.

A site's ledger grows by a few entries per task; :meth:`site_agent.boundary.ledger.Ledger.spent`
composes all of them every time the agent reports a dataset's spend. This script builds a
ledger (in a temporary directory) holding 1,000 jobs on one dataset with a realistic mix:
each job uses one of a few DP-SGD settings (σ, sample rate q, steps per round), runs 3-8
rounds, and each round charges its DP-SGD steps plus one noised metric release (the plain
Gaussian mechanism, q = 1). It then times ``Ledger.spent`` end to end (SQLite read, merging
of identical (σ, q), accounting) for ``prv`` (Gopi, Lee & Wutschitz 2021), ``pld``
(dp-accounting; Koskela et al. 2020, Doroshenko et al. 2022) and ``rdp`` (Mironov 2017),
with the per-(σ, q) RDP cache cleared before every run so each one starts cold, and prints
the median time of each, the ratios between them and the ε each reports.

Run: ``.venv/bin/python bench/bench_accounting.py`` (well under a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.dp import rdp
from common.dp.accounting import ACCOUNTANTS
from common.dp.events import DpEvent
from site_agent.boundary.ledger import Ledger

DATASET = "claims"
DELTA = 1e-6

# (σ, q, DP-SGD steps per round): a handful of settings data scientists reuse across jobs.
SGD_SETTINGS: tuple[tuple[float, float, int], ...] = (
    (4.0, 0.002, 50),
    (6.0, 0.005, 40),
    (8.0, 0.001, 100),
    (10.0, 0.01, 20),
)
METRIC = DpEvent(200.0, 1.0, 1)  # one noised (loss, accuracy) release per round


def build_ledger(path: Path, *, jobs: int, seed: int) -> int:
    """Record ``jobs`` jobs in a fresh ledger at ``path``; return the number of entries."""
    rng = random.Random(seed)
    n = 0
    with Ledger(path) as ledger:
        for j in range(jobs):
            sigma, q, steps = rng.choice(SGD_SETTINGS)
            for r in range(rng.randint(3, 8)):
                entries = ledger.charge(
                    dataset=DATASET,
                    job_id=f"job-{j:04d}",
                    round=r,
                    task_id=f"job-{j:04d}/round-{r}",
                    kind="train+metrics",
                    events=[DpEvent(sigma, q, steps), METRIC],
                    delta=DELTA,
                )
                n += len(entries)
    return n


def time_spent(ledger: Ledger, accountant: str, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``ledger.spent`` (cold RDP cache each time) and its last result."""
    times = []
    bound = None
    for _ in range(repeats):
        rdp.rdp_per_step.cache_clear()
        start = time.perf_counter()
        bound = ledger.spent(DATASET, delta=DELTA, accountant=accountant)
        times.append(time.perf_counter() - start)
    return statistics.median(times), bound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.sqlite"
        start = time.perf_counter()
        entries = build_ledger(path, jobs=args.jobs, seed=args.seed)
        build_s = time.perf_counter() - start
        with Ledger(path) as ledger:
            start = time.perf_counter()
            events = ledger.events(DATASET)
            read_s = time.perf_counter() - start
            distinct = len({(e.noise_multiplier, e.sample_rate) for e in events})
            total_steps = sum(e.steps for e in events)
            results = {acc: time_spent(ledger, acc, args.repeats) for acc in ACCOUNTANTS}

    print(
        f"ledger: {args.jobs:,} jobs, {entries:,} entries, {distinct} distinct (σ, q), "
        f"{total_steps:,} composed steps; built in {build_s:.1f} s "
        f"(one fsynced transaction per task), read back in {read_s * 1e3:.0f} ms"
    )
    print(f"python {platform.python_version()}, {platform.machine()}, δ = {DELTA:g}\n")
    print(f"{'requested':>9}  {'used':>4}  {'ε (upper bound)':>15}  {'median time':>11}")
    for acc, (seconds, bound) in results.items():
        print(f"{acc:>9}  {bound.accountant:>4}  {bound.epsilon:>15.4f}  {seconds:>9.3f} s")
    t = {acc: seconds for acc, (seconds, _) in results.items()}
    print()
    print(f"prv / rdp: {t['prv'] / t['rdp']:6.1f}x    pld / rdp: {t['pld'] / t['rdp']:6.1f}x")
    print(f"prv / pld: {t['prv'] / t['pld']:6.2f}x")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "jobs": args.jobs,
                    "entries": entries,
                    "distinct_sigma_q": distinct,
                    "total_steps": total_steps,
                    "delta": DELTA,
                    "results": {
                        acc: {
                            "seconds": seconds,
                            "epsilon": bound.epsilon,
                            "accountant_used": bound.accountant,
                        }
                        for acc, (seconds, bound) in results.items()
                    },
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
