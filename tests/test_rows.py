"""The rows every page shows: paired differences from the baseline, against numpy."""
import math

import numpy as np
import pytest

from quantbench import rows


def test_paired_difference_matches_numpy_and_marks_noise():
    rng = np.random.default_rng(0)
    base = {i: float(v) for i, v in enumerate(rng.random(500) < 0.6)}
    worse = {i: float(v) for i, v in enumerate(rng.random(500) < 0.4)}
    d = np.array([worse[i] - base[i] for i in range(500)])
    p = rows.paired_difference(base, worse)
    assert p["n"] == 500 and p["delta"] == pytest.approx(d.mean())
    assert p["stderr"] == pytest.approx(d.std(ddof=1) / math.sqrt(500))
    assert not p["within_noise"]  # 0.6 vs 0.4 on 500 documents is real
    # The same scores with three documents flipped: a difference well inside the noise.
    close = dict(base)
    for i in range(3):
        close[i] = 1.0 - close[i]
    assert rows.paired_difference(base, close)["within_noise"]
    # Only the documents both scored are paired.
    assert rows.paired_difference({0: 1.0, 1: 0.0}, {1: 1.0, 2: 0.0})["n"] == 1
    assert rows.paired_difference({0: 1.0}, {1: 1.0}) is None


def test_held_beyond_weights_is_named_only_when_it_matters():
    mib = 2**20
    assert rows.held_beyond_weights({"weight_bytes": 1026 * mib, "resident_after_load_bytes": 2098 * mib}) == 1072 * mib
    assert rows.held_beyond_weights({"weight_bytes": 2357 * mib, "resident_after_load_bytes": 2358 * mib}) is None
    assert rows.held_beyond_weights({"weight_bytes": 100, "resident_after_load_bytes": None}) is None
