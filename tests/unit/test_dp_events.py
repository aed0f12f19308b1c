"""common.dp.events: the DpEvent checks, the exact merge, and the one dict form."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.dp.events import DpEvent, event_from_dict, event_to_dict, merge_events


def test_the_dict_form_round_trips_through_json() -> None:
    e = DpEvent(np.float64(1.25), float(np.float32(0.5)), int(np.int64(7)))
    d = event_to_dict(e)
    assert d == {"noise_multiplier": 1.25, "sample_rate": 0.5, "steps": 7}
    assert event_from_dict(json.loads(json.dumps(d))) == e


def test_other_keys_are_ignored_and_whole_numbers_accepted() -> None:
    d = {"kind": "train", "round": 3, "noise_multiplier": "2", "sample_rate": 1, "steps": 4.0}
    assert event_from_dict(d) == DpEvent(2.0, 1.0, 4)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"noise_multiplier": 1.0, "sample_rate": 0.1}, "needs steps"),
        ({"noise_multiplier": None, "sample_rate": 0.1, "steps": 1}, "noise_multiplier must be"),
        ({"noise_multiplier": 1.0, "sample_rate": "x", "steps": 1}, "sample_rate must be"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": True}, "steps must be"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 2.5}, "whole number"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1}, r"in \(0, 1\]"),
        ({"noise_multiplier": 0.001, "sample_rate": 0.1, "steps": 1}, "at least 0.01"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 0}, "at least 1"),
    ],
)
def test_bad_dicts_are_refused_with_a_clear_message(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        event_from_dict(data)


def test_merge_sums_the_steps_of_equal_mechanisms_only() -> None:
    merged = merge_events([DpEvent(1.0, 0.1, 3), DpEvent(2.0, 1.0, 1), DpEvent(1.0, 0.1, 4)])
    assert merged == [DpEvent(1.0, 0.1, 7), DpEvent(2.0, 1.0, 1)]
    with pytest.raises(ValueError, match="Expected DpEvent"):
        merge_events([(1.0, 0.1, 3)])  # type: ignore[list-item]
