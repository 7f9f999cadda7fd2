"""Tests for evaluation/bootstrap.py: bootstrap coverage, block structure, pairing, PSR and DSR by hand, bad input."""

import functools
import math
from statistics import NormalDist

import numpy as np
import pytest

from mtq_common.evaluation import bootstrap as st
from mtq_common.evaluation import metrics
from mtq_common.evaluation import sharpe_significance as sig
from mtq_common.evaluation.sharpe_significance import normal_cdf, normal_ppf

BARS = 252
# i.i.d. normal returns with a known true Sharpe: per-bar mean 0.05, std 1.
TRUE_SR_BAR = 0.05
TRUE_SR = TRUE_SR_BAR * math.sqrt(BARS)
N_BARS = 500
DRAWS = 200

# A small fixed series for the hand computations.
SMALL = [0.012, -0.021, 0.034, 0.005, -0.013, 0.027, 0.016, -0.004, 0.009, -0.030, 0.022, 0.001]


def ar1_returns(n, phi, seed, mean=0.05):
    """``mean + x`` with ``x`` a unit-variance AR(1) of coefficient ``phi``: serially dependent returns."""
    noise = np.random.default_rng(seed).normal(0.0, math.sqrt(1.0 - phi * phi), n)
    x = np.empty(n)
    x[0] = noise[0] / math.sqrt(1.0 - phi * phi)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + noise[t]
    return mean + x


# --- normal distribution ------------------------------------------------------------------------------------------


def test_normal_functions_match_standard_library():
    reference = NormalDist()
    for p in [1e-300, 1e-12, 1e-6, 1e-3, 0.02425, 0.0243, 0.1, 0.3, 0.5, 0.7, 0.9, 0.97575, 0.999999, 1 - 1e-12]:
        assert normal_ppf(p) == pytest.approx(reference.inv_cdf(p), rel=1e-12, abs=1e-12)
    for x in np.linspace(-8.0, 8.0, 33):
        assert normal_cdf(float(x)) == pytest.approx(reference.cdf(float(x)), abs=1e-15)
    # The standard library's cdf uses 1 + erf, which loses the lower tail; ours keeps its relative precision.
    assert normal_cdf(-8.0) == pytest.approx(6.220960574271785e-16, rel=1e-12)
    assert normal_ppf(0.0) == -math.inf and normal_ppf(1.0) == math.inf
    with pytest.raises(ValueError):
        normal_ppf(1.5)


# --- Sharpe ratio ---------------------------------------------------------------------------------------------------


def test_annualised_sharpe_is_metrics_sharpe():
    rng = np.random.default_rng(0)
    r = rng.normal(0.001, 0.01, (300, 4))
    np.testing.assert_array_equal(st.annualised_sharpe(r, BARS, 0.02), metrics.sharpe(r, BARS, 0.02))
    assert st.annualised_sharpe(r[:, 0], BARS) == metrics.sharpe(r[:, 0], BARS)
    assert st.annualised_sharpe([0.01] * 10, BARS) == 0.0  # zero std -> 0.0, as in metrics
    assert st.annualised_sharpe([0.01], BARS) == 0.0  # T < 2 -> 0.0


def test_bootstrap_sharpes_match_metrics_on_each_resampled_series():
    # 5000 bars x 500 samples spans three generation chunks: the chunk boundaries must not change anything.
    r = np.random.default_rng(1).normal(0.0005, 0.01, 5000)
    res = st.sharpe_interval(r, BARS, 0.01, num_samples=500, mean_block=7, seed=3, return_distribution=True)
    idx = st.stationary_bootstrap_indices(5000, 500, 7, np.random.default_rng(3))
    expected = np.array([metrics.sharpe(r[i], BARS, 0.01) for i in idx])
    np.testing.assert_allclose(res["distribution"], expected, rtol=0, atol=1e-12)
    assert res["sharpe"] == metrics.sharpe(r, BARS, 0.01)


# --- stationary bootstrap indices ------------------------------------------------------------------------------------


def test_indices_shape_range_and_mean_block_length():
    n, samples, block = 2000, 200, 10.0
    idx = st.stationary_bootstrap_indices(n, samples, block, np.random.default_rng(0))
    assert idx.shape == (samples, n) and idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() < n
    # A run of consecutive indices (circularly) is one block; a new block landing exactly on the next index
    # (probability 1/n) is indistinguishable and merges two runs, a negligible bias at n = 2000.
    continues = idx[:, 1:] == (idx[:, :-1] + 1) % n
    runs = samples + np.count_nonzero(~continues)
    mean_run = idx.size / runs
    # ~40k geometric blocks: the standard error of their mean length is ~0.5%; the row ends cut the last block of
    # each row short (~0.5% shorter on average). 3% leaves room for both.
    assert mean_run == pytest.approx(block, rel=0.03)
    # Every bar is equally likely to be drawn (circular wrapping leaves no edge effect).
    counts = np.bincount(idx.ravel(), minlength=n)
    assert counts.mean() == samples and counts.std() < 5 * math.sqrt(samples * block)


def test_indices_seeded():
    one = st.stationary_bootstrap_indices(300, 50, 5, np.random.default_rng(42))
    again = st.stationary_bootstrap_indices(300, 50, 5, np.random.default_rng(42))
    other = st.stationary_bootstrap_indices(300, 50, 5, np.random.default_rng(43))
    np.testing.assert_array_equal(one, again)
    assert np.mean(one != other) > 0.9


def test_indices_with_block_one_are_iid_draws():
    idx = st.stationary_bootstrap_indices(1000, 100, 1, np.random.default_rng(0))
    # Only chance continuations (probability 1/n) remain.
    assert np.mean(idx[:, 1:] == (idx[:, :-1] + 1) % 1000) < 0.005
    with pytest.raises(ValueError, match="mean_block"):
        st.stationary_bootstrap_indices(1000, 10, 0.5, np.random.default_rng(0))


def test_default_block_length():
    assert [st.default_block_length(n) for n in (0, 1, 2, 8, 252, 500, 2000, 10000)] == [1, 1, 1, 2, 6, 8, 13, 22]


# --- sharpe_interval ----------------------------------------------------------------------------------------------


@functools.cache
def coverage_and_se(mean_block):
    """(share of DRAWS intervals covering TRUE_SR, mean bootstrap SE / Lo's closed-form SE) on i.i.d. normal data."""
    covered, std_errors = 0, []
    for seed in range(DRAWS):
        r = np.random.default_rng(1000 + seed).normal(TRUE_SR_BAR, 1.0, N_BARS)
        res = st.sharpe_interval(r, BARS, confidence=0.9, num_samples=400, mean_block=mean_block, seed=seed)
        covered += res["low"] <= TRUE_SR <= res["high"]
        std_errors.append(res["std_error"])
    # Lo (2002), i.i.d. normal returns: SE(SR_bar) = sqrt((1 + SR_bar^2 / 2) / n), annualised by sqrt(BARS).
    lo_se = math.sqrt((1.0 + TRUE_SR_BAR**2 / 2.0) / N_BARS) * math.sqrt(BARS)
    return covered / DRAWS, float(np.mean(std_errors)) / lo_se


@pytest.mark.parametrize("mean_block", [1, None], ids=["block1", "default_block"])
def test_interval_coverage_on_iid_normal_returns(mean_block):
    coverage, _ = coverage_and_se(mean_block)
    # Binomial standard error of a 90% coverage over 200 draws: sqrt(0.9 * 0.1 / 200) = 0.021; the bounds are
    # 0.9 +- 3 of them. Measured (seeds fixed): 0.890 with block 1, 0.885 with the default block (8 bars).
    assert 0.836 <= coverage <= 0.964


@pytest.mark.parametrize("mean_block", [1, None], ids=["block1", "default_block"])
def test_bootstrap_standard_error_matches_lo(mean_block):
    _, ratio = coverage_and_se(mean_block)
    # Measured: 1.004 with block 1, 0.983 with the default block.
    assert ratio == pytest.approx(1.0, rel=0.15)


def test_block_bootstrap_sees_serial_dependence():
    # AR(1) with phi = 0.5: the variance of the mean is (1 + phi) / (1 - phi) = 3 times the i.i.d. one, so the
    # true Sharpe standard error is ~sqrt(3) = 1.73 times what resampling single bars reports.
    r = ar1_returns(2000, 0.5, seed=0)
    iid = st.sharpe_interval(r, BARS, num_samples=1000, mean_block=1, seed=1)
    blocked = st.sharpe_interval(r, BARS, num_samples=1000, seed=1)
    assert blocked["block"] == 13.0
    assert blocked["std_error"] / iid["std_error"] > 1.35


def test_interval_result_and_reproducibility():
    r = np.random.default_rng(5).normal(0.05, 1.0, 400)
    res = st.sharpe_interval(r, BARS, num_samples=300, seed=7)
    assert set(res) == {"sharpe", "low", "high", "std_error", "confidence", "block", "samples", "degenerate"}
    assert res["low"] < res["sharpe"] < res["high"] and res["samples"] == 300 and not res["degenerate"]
    assert st.sharpe_interval(r, BARS, num_samples=300, seed=7) == res
    assert st.sharpe_interval(r, BARS, num_samples=300, seed=8)["low"] != res["low"]
    # The same bootstrap distribution: a 95% interval contains the 90% one.
    wide = st.sharpe_interval(r, BARS, confidence=0.95, num_samples=300, seed=7)
    assert wide["low"] < res["low"] and wide["high"] > res["high"]


def test_interval_degenerate_with_fewer_than_two_bars():
    for returns in ([], [0.01]):
        res = st.sharpe_interval(returns, BARS)
        assert res["sharpe"] == res["low"] == res["high"] == 0.0
        assert res["degenerate"] and res["samples"] == 0


def test_interval_constant_series_is_zero():
    res = st.sharpe_interval([0.001] * 50, BARS, num_samples=100)
    assert res["sharpe"] == res["low"] == res["high"] == 0.0


# --- paired_sharpe_difference --------------------------------------------------------------------------------------


def test_paired_identical_series():
    a = np.random.default_rng(2).normal(0.03, 1.0, 500)
    res = st.paired_sharpe_difference(a, a.copy(), BARS, num_samples=300, return_distribution=True)
    assert res["difference"] == res["low"] == res["high"] == 0.0
    assert res["win_share"] == 0.0 and res["tie_share"] == 1.0
    # Sharpe is scale-invariant and doubling is exact in floating point: every paired sample differs by exactly 0,
    # which holds only if both series were resampled by the same indices.
    doubled = st.paired_sharpe_difference(a, 2.0 * a, BARS, num_samples=300, return_distribution=True)
    np.testing.assert_array_equal(doubled["distribution"], 0.0)


def test_paired_drift_wins():
    b = np.random.default_rng(3).normal(0.0, 1.0, 500)
    res = st.paired_sharpe_difference(b + 0.2, b, BARS, num_samples=500)
    assert res["difference"] > 0 and res["low"] > 0
    assert res["win_share"] > 0.99


def test_pairing_cancels_the_shared_market_noise():
    # Two policies riding the same market with a small, independent difference: the paired standard error of the
    # difference is far below what two independent intervals would suggest.
    rng = np.random.default_rng(4)
    market = rng.normal(0.02, 1.0, 1000)
    a, b = market + rng.normal(0.0, 0.1, 1000), market
    paired = st.paired_sharpe_difference(a, b, BARS, num_samples=500)
    se_a = st.sharpe_interval(a, BARS, num_samples=500)["std_error"]
    se_b = st.sharpe_interval(b, BARS, num_samples=500)["std_error"]
    assert paired["std_error"] < 0.2 * math.hypot(se_a, se_b)
    assert paired["sharpe_a"] - paired["sharpe_b"] == paired["difference"]


def test_paired_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same length.*100 and 99"):
        st.paired_sharpe_difference(np.zeros(100), np.zeros(99), BARS)


# --- compare_sharpes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bars", [400, 1])
def test_compare_sharpes_equals_the_separate_calls_exactly(bars):
    # One bootstrap for every series must give, bit for bit, what one call per interval and per pair gives (the
    # evaluation report relies on it), including the degenerate interval of a single bar.
    rng = np.random.default_rng(11)
    returns = {"system": rng.normal(0.03, 1.0, bars), "rule": rng.normal(0.0, 1.0, bars),
               "equal": rng.normal(0.01, 1.0, bars)}  # fmt: skip
    kw = dict(confidence=0.8, num_samples=300, seed=5)
    intervals, differences = st.compare_sharpes(returns, "system", BARS, 0.01, **kw)
    assert intervals == {name: st.sharpe_interval(r, BARS, 0.01, **kw) for name, r in returns.items()}
    assert differences == {name: st.paired_sharpe_difference(returns["system"], returns[name], BARS, 0.01, **kw)
                           for name in ("rule", "equal")}  # fmt: skip
    assert intervals["rule"]["degenerate"] is (bars < 2)


def test_compare_sharpes_rejects_other_bars_and_an_unknown_reference():
    with pytest.raises(ValueError, match="same bars.*'b' has 99"):
        st.compare_sharpes({"a": np.zeros(100), "b": np.zeros(99)}, "a", BARS)
    with pytest.raises(ValueError, match="reference 'c'"):
        st.compare_sharpes({"a": np.zeros(100)}, "c", BARS)


# --- probabilistic Sharpe ratio ------------------------------------------------------------------------------------


def test_psr_by_hand():
    n = len(SMALL)
    mean = sum(SMALL) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in SMALL) / (n - 1))
    m2, m3, m4 = (sum((x - mean) ** k for x in SMALL) / n for k in (2, 3, 4))
    skew, kurt = m3 / m2**1.5, m4 / m2**2
    sr = mean / sd  # per bar
    sr_star = 0.5 / math.sqrt(BARS)  # an annual benchmark of 0.5, per bar
    z = (sr - sr_star) * math.sqrt(n - 1) / math.sqrt(1 - skew * sr + (kurt - 1) / 4 * sr**2)
    assert sig.sample_moments(SMALL) == pytest.approx((skew, kurt), rel=1e-12)
    psr = sig.probabilistic_sharpe_ratio(SMALL, 0.5, bars_per_year=BARS)
    assert psr == pytest.approx(NormalDist().cdf(z), abs=1e-9)
    assert 0.5 < psr < 1.0


def test_psr_is_half_at_the_benchmark():
    benchmark = st.annualised_sharpe(SMALL, BARS)
    assert sig.probabilistic_sharpe_ratio(SMALL, benchmark, bars_per_year=BARS) == 0.5


def test_psr_grows_with_length_for_a_positive_sharpe():
    values = [sig.probabilistic_sharpe_from_summary(0.8, n, BARS, skew=-0.5, kurtosis=5.0) for n in (50, 250, 1000)]
    assert 0.5 < values[0] < values[1] < values[2] < 1.0
    # The same on data: the series repeated keeps its Sharpe and moments but is longer.
    on_data = [sig.probabilistic_sharpe_ratio(np.tile(SMALL, k), bars_per_year=BARS) for k in (1, 4, 16)]
    assert on_data[0] < on_data[1] < on_data[2]


def test_psr_penalises_negative_skew_and_fat_tails():
    normal = sig.probabilistic_sharpe_from_summary(2.0, 250, BARS)
    ugly = sig.probabilistic_sharpe_from_summary(2.0, 250, BARS, skew=-2.0, kurtosis=12.0)
    assert 0.5 < ugly < normal


def test_psr_guards():
    assert sig.probabilistic_sharpe_from_summary(1.0, 1, BARS) == 0.5  # n < 2: no evidence
    with pytest.raises(ValueError, match="no distribution"):
        sig.probabilistic_sharpe_from_summary(1.0, 100, BARS, skew=2.0, kurtosis=3.0)
    # kurt = 1 + skew^2 and SR = 2 / skew make the radicand exactly 0: the limit, not a division by zero.
    assert sig.probabilistic_sharpe_from_summary(2.0, 100, 1, skew=1.0, kurtosis=2.0) == 1.0
    assert sig.probabilistic_sharpe_from_summary(2.0, 100, 1, benchmark_sharpe=3.0, skew=1.0, kurtosis=2.0) == 0.0


# --- deflated Sharpe ratio -----------------------------------------------------------------------------------------


def test_expected_max_sharpe_by_hand():
    gamma = 0.5772156649015329
    z = NormalDist().inv_cdf
    for variance, trials in [(0.01, 10), (0.04, 2), (1.0, 1000)]:
        expected = math.sqrt(variance) * ((1 - gamma) * z(1 - 1 / trials) + gamma * z(1 - 1 / (trials * math.e)))
        assert sig.expected_max_sharpe(variance, trials) == pytest.approx(expected, rel=1e-12)
    assert sig.expected_max_sharpe(0.04, 1) == 0.0
    assert sig.expected_max_sharpe(0.04, 10) < sig.expected_max_sharpe(0.04, 100)


def test_dsr_with_one_trial_is_psr_against_zero():
    r = np.random.default_rng(6).normal(0.05, 1.0, 300)
    dsr = sig.deflated_sharpe_ratio(r, [1.3], BARS)
    assert dsr == sig.probabilistic_sharpe_ratio(r, 0.0, bars_per_year=BARS)


def test_dsr_summary_by_hand():
    trials = [0.4, 0.9, 1.1, 1.6]
    per_bar = [s / math.sqrt(BARS) for s in trials]
    mean = sum(per_bar) / len(per_bar)
    variance = sum((s - mean) ** 2 for s in per_bar) / (len(per_bar) - 1)
    sr0 = sig.expected_max_sharpe(variance, len(trials)) * math.sqrt(BARS)
    dsr = sig.deflated_sharpe_from_summary(1.6, 750, trials, BARS)
    assert dsr == pytest.approx(sig.probabilistic_sharpe_from_summary(1.6, 750, BARS, sr0), abs=1e-12)
    assert dsr < sig.probabilistic_sharpe_from_summary(1.6, 750, BARS)


def test_dsr_falls_with_more_and_more_dispersed_trials():
    r = np.random.default_rng(7).normal(0.08, 1.0, 750)
    narrow = sig.deflated_sharpe_ratio(r, [1.0, 1.1], BARS)
    wide = sig.deflated_sharpe_ratio(r, [0.0, 0.5, 1.0, 1.5, 2.0], BARS)
    wider = sig.deflated_sharpe_ratio(r, np.linspace(-1.0, 3.0, 20), BARS)
    assert narrow > wide > wider


# --- bad input -----------------------------------------------------------------------------------------------------


def test_non_finite_input_names_the_index():
    r = np.random.default_rng(8).normal(0.0, 1.0, 20)
    r[7], r[12] = np.nan, np.inf
    with pytest.raises(ValueError, match="returns has a non-finite value nan at index 7"):
        st.sharpe_interval(r, BARS)
    with pytest.raises(ValueError, match="index 7"):
        sig.probabilistic_sharpe_ratio(r, bars_per_year=BARS)
    with pytest.raises(ValueError, match="index 7"):
        sig.deflated_sharpe_ratio(r, [1.0, 2.0], BARS)
    with pytest.raises(ValueError, match=r"b has a non-finite value inf at index 12"):
        st.paired_sharpe_difference(np.zeros(20), np.where(np.arange(20) == 12, np.inf, 0.0), BARS)
    with pytest.raises(ValueError, match=r"index \(3, 1\)"):
        st.annualised_sharpe(np.where(np.arange(10)[:, None] * 2 + np.arange(2) == 7, np.nan, 0.0), BARS)
    with pytest.raises(ValueError, match="1-D"):
        st.sharpe_interval(np.zeros((10, 2)), BARS)
    with pytest.raises(ValueError, match="trial_sharpes"):
        sig.deflated_sharpe_ratio(r[:5], [], BARS)
