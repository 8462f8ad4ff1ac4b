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


def test_paired_tests_against_their_textbook_values():
    # McNemar's exact test: 10 documents lost, 3 gained -> p = 2 * sum_{k<=3} C(13, k) / 2^13.
    base = {i: 1.0 for i in range(10)} | {i: 0.0 for i in range(10, 13)} | {i: 1.0 for i in range(13, 50)}
    other = {i: 0.0 for i in range(10)} | {i: 1.0 for i in range(10, 13)} | {i: 1.0 for i in range(13, 50)}
    test, p = rows.paired_test(*rows._paired(base, other))
    assert test == "McNemar exact" and p == pytest.approx(2 * sum(math.comb(13, k) for k in range(4)) / 2**13)
    assert rows.paired_test(*rows._paired(base, base)) == ("McNemar exact", 1.0)  # no discordant document
    # A paired bootstrap of F1-like scores against the paired t-test it approximates on 500 documents.
    from scipy.stats import ttest_rel
    rng = np.random.default_rng(1)
    b = rng.random(500)
    q = np.clip(b - 0.02 + 0.2 * rng.standard_normal(500), 0, 1)
    test, p = rows.paired_test(b, q)
    assert test == "paired bootstrap" and p == pytest.approx(ttest_rel(q, b).pvalue, abs=0.01)


def test_recovery_and_flips_against_a_bootstrap_and_counts():
    rng = np.random.default_rng(2)
    b = (rng.random(400) < 0.6).astype(float)
    q = np.where(rng.random(400) < 0.15, 1 - b, b)  # 15% of documents flipped either way
    base, other = dict(enumerate(b)), dict(enumerate(q))
    r = rows.recovery(base, other)
    assert r["recovery_pct"] == pytest.approx(100 * q.mean() / b.mean())
    idx = rng.integers(0, 400, (20000, 400))
    ratios = 100 * q[idx].mean(1) / b[idx].mean(1)  # the percentile interval of a paired bootstrap of the ratio
    assert r["low_pct"] == pytest.approx(np.percentile(ratios, 2.5), abs=0.6)
    assert r["high_pct"] == pytest.approx(np.percentile(ratios, 97.5), abs=0.6)
    f = rows.flips(base, other)
    lost = ((b == 1) & (q == 0)).mean()
    assert f["lost_p"] == pytest.approx(lost) and f["gained_p"] == pytest.approx(((b == 0) & (q == 1)).mean())
    assert f["lost_p_stderr"] == pytest.approx(math.sqrt(lost * (1 - lost) / 400))
    assert rows.flips({0: 0.5, 1: 1.0}, {0: 0.2, 1: 1.0}) is None  # F1-like scores have no flips
    # The mean recovery over tasks averages each task's primary metric (acc_norm before acc).
    docs = {"arc": {"acc": other, "acc_norm": other}, "boolq": {"acc": base}}
    a = rows.against_baseline({"arc": {"acc": base, "acc_norm": base}, "boolq": {"acc": base}}, docs)
    assert a["tasks"]["arc"]["primary"] == "acc_norm" and a["recovery_mean"]["tasks"] == ["arc", "boolq"]
    assert a["recovery_mean"]["recovery_pct"] == pytest.approx((r["recovery_pct"] + 100) / 2)


def test_held_beyond_weights_is_named_only_when_it_matters():
    mib = 2**20
    assert rows.held_beyond_weights({"weight_bytes": 1026 * mib, "resident_after_load_bytes": 2098 * mib}) == 1072 * mib
    assert rows.held_beyond_weights({"weight_bytes": 2357 * mib, "resident_after_load_bytes": 2358 * mib}) is None
    assert rows.held_beyond_weights({"weight_bytes": 100, "resident_after_load_bytes": None}) is None


def test_the_kernel_column_names_which_library_a_quantlinear_comes_from():
    # gptqmodel's and auto-round's layers are both called QuantLinear; the module tells them apart
    ar = {"backend": {"linear_classes": ["Linear", "QuantLinear"],
                      "linear_modules": ["auto_round_extension.triton.qlinear_tritonv2"]}}
    assert rows.kernel_of(ar) == "QuantLinear (qlinear_tritonv2)"
    assert rows.kernel_of({"backend": {"linear_classes": ["Linear"]}}) == "torch Linear"
    assert rows.kernel_of({"backend": {"linear_classes": ["Linear4bit"]}}) == "Linear4bit"
