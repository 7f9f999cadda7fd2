"""Tests for mtq_common.data.features: shape, finiteness, causality, scale invariance, bounds and meaning."""

from __future__ import annotations

import numpy as np
import pytest

from mtq_common.data.features import (
    FEATURE_CLIP,
    FEATURE_FIRST_BAR,
    FEATURE_NAMES,
    FEATURE_WINDOW,
    STATE_FEATURES,
    compute_features,
)

F = len(FEATURE_NAMES)


def random_walk(num_bars: int, num_instruments: int = 3, seed: int = 0, vol: float = 0.01) -> np.ndarray:
    """Geometric random walk with instrument-specific price levels and volatilities."""
    rng = np.random.default_rng(seed)
    vols = vol * rng.uniform(0.5, 2.0, num_instruments)
    log_ret = rng.normal(0.0, 1.0, (num_bars, num_instruments)) * vols
    log_ret[0] = 0.0
    return rng.uniform(1.0, 500.0, num_instruments) * np.exp(np.cumsum(log_ret, axis=0))


def feature(name: str) -> int:
    return FEATURE_NAMES.index(name)


def test_metadata_consistent():
    assert len(set(FEATURE_NAMES)) == F
    assert len(FEATURE_FIRST_BAR) == F
    assert max(FEATURE_FIRST_BAR) == FEATURE_WINDOW
    assert 8 <= F <= 24


@pytest.mark.parametrize("num_bars", [1, 2, FEATURE_WINDOW - 1, FEATURE_WINDOW + 5, 1000])
def test_shape_dtype_finite_random_walk(num_bars):
    out = compute_features(random_walk(num_bars, num_instruments=4, seed=num_bars))
    assert out.shape == (num_bars, 4, F)
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("num_bars", [1, FEATURE_WINDOW + 5, 500])
def test_constant_series_is_finite_and_zero(num_bars):
    out = compute_features(np.full((num_bars, 2), 42.0))
    assert out.shape == (num_bars, 2, F)
    assert np.all(np.isfinite(out))
    # A flat price carries no signal: every feature is exactly 0 (the floors avoid 0 / 0).
    assert np.all(out == 0.0)


def test_partly_flat_series_is_finite():
    prices = random_walk(400, num_instruments=2, seed=1)
    prices[150:300] = prices[150]  # a trading halt: many bars without a price change
    out = compute_features(prices)
    assert np.all(np.isfinite(out))


def test_empty_input():
    assert compute_features(np.ones((0, 3))).shape == (0, 3, F)


@pytest.mark.parametrize(
    "bad",
    [np.ones(10), np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[1.0, -1.0]]), np.array([[1.0, np.nan]])],
)
def test_rejects_invalid_prices(bad):
    with pytest.raises(ValueError):
        compute_features(bad)


def test_warmup_is_zero_then_defined():
    out = compute_features(random_walk(300, num_instruments=3, seed=2))
    for k, first in enumerate(FEATURE_FIRST_BAR):
        assert np.all(out[:first, :, k] == 0.0), FEATURE_NAMES[k]
        if FEATURE_NAMES[k] in STATE_FEATURES:  # a rule's position: 0 until its first crossing, then +-1
            assert set(np.unique(out[first:, :, k])) <= {-1.0, 0.0, 1.0}, FEATURE_NAMES[k]
            continue
        # From its first bar on, a feature of a random walk is (almost surely) non-zero.
        assert np.all(out[first, :, k] != 0.0), FEATURE_NAMES[k]
    signals = [k for k, name in enumerate(FEATURE_NAMES) if name not in STATE_FEATURES]
    assert np.all(out[FEATURE_WINDOW:, :, signals] != 0.0)


@pytest.mark.parametrize("cut", [0, 5, 13, 19, 20, 25, 59, 99, 100, 101, 250, 598])
def test_no_look_ahead(cut):
    """Perturbing every price after bar ``cut`` leaves all features at bars <= cut bit-for-bit unchanged."""
    rng = np.random.default_rng(cut)
    prices = random_walk(600, num_instruments=3, seed=3)
    base = compute_features(prices)

    perturbed = prices.copy()
    perturbed[cut + 1 :] *= rng.uniform(0.5, 2.0, perturbed[cut + 1 :].shape)  # noisy future
    perturbed[cut + 1 :, 0] *= 0.01  # and a 99% crash in instrument 0 right after the cut
    after = compute_features(perturbed)

    # pandas rolling / diff / ewm(adjust=False) scan forwards, so equality is exact, not approximate.
    assert np.array_equal(base[: cut + 1], after[: cut + 1])
    assert not np.array_equal(base[cut + 1 :], after[cut + 1 :])  # the perturbation did reach the features


def test_truncated_history_matches_full_history():
    """Computing on prices[:t+1] (the data available live at bar t) gives the same features as offline."""
    prices = random_walk(500, num_instruments=2, seed=4)
    full = compute_features(prices)
    for t in (0, 50, 150, 499):
        assert np.array_equal(compute_features(prices[: t + 1]), full[: t + 1])


def test_scale_free():
    prices = random_walk(2000, num_instruments=3, seed=5)
    np.testing.assert_allclose(compute_features(prices * 1000.0), compute_features(prices), atol=1e-5, rtol=0)
    np.testing.assert_allclose(compute_features(prices * 1e-3), compute_features(prices), atol=1e-5, rtol=0)


def test_columns_are_independent():
    """Each instrument's features depend on its own prices only."""
    prices = random_walk(300, num_instruments=3, seed=6)
    out = compute_features(prices)
    assert np.array_equal(compute_features(prices[:, [1]])[:, 0], out[:, 1])


def test_bounded_with_nontrivial_spread():
    # Long random walk with a volatility regime shift (calm -> crisis -> calm) to exercise the tails.
    rng = np.random.default_rng(7)
    vol = np.full(20_000, 0.005)
    vol[8_000:9_000] = 0.05
    log_ret = rng.normal(0.0, 1.0, (20_000, 4)) * vol[:, None]
    log_ret[0] = 0.0
    prices = 100.0 * np.exp(np.cumsum(log_ret, axis=0))
    out = compute_features(prices)

    assert np.all(out >= -FEATURE_CLIP) and np.all(out <= FEATURE_CLIP)
    assert FEATURE_CLIP == 5.0
    post = out[FEATURE_WINDOW:]
    stds = post.reshape(-1, F).std(axis=0)
    for name, std in zip(FEATURE_NAMES, stds, strict=True):
        assert std > 0.05, f"{name} has std {std}"
        assert std < 3.0, f"{name} is not roughly unit-scale (std {std})"
    # Clipping is for outliers only: almost all values are strictly inside the bounds.
    assert np.mean(np.abs(post) >= FEATURE_CLIP) < 0.01


def test_return_features_are_standardised_on_random_walk():
    out = compute_features(random_walk(20_000, num_instruments=4, seed=8))[FEATURE_WINDOW:]
    names = ("ret_1", "ret_5", "ret_20", "trend_100", "ret_60", "trend_z_10", "trend_z_20", "trend_z_40", "ewmac_8",
             "ewmac_16")  # fmt: skip
    for name in names:
        x = out[:, :, feature(name)]
        assert abs(x.mean()) < 0.1, name
        assert 0.8 < x.std() < 1.25, name


@pytest.mark.parametrize("direction", [+1.0, -1.0])
def test_meaning_on_steady_trend(direction):
    t = np.arange(400, dtype=np.float64)
    # Pure exponential trend (vol floored -> return features saturate at the clip) ...
    smooth = 100.0 * np.exp(direction * 0.002 * t)
    # ... and a trend with some noise, where the features stay inside the clip.
    rng = np.random.default_rng(9)
    noisy = 100.0 * np.exp(direction * 0.003 * t + np.cumsum(rng.normal(0.0, 0.003, 400)))
    out = compute_features(np.stack([smooth, noisy], axis=1))[FEATURE_WINDOW:]

    for name in ("ret_1", "ret_5", "rsi_14", "trend_100", "macd", "trend_z_20", "ewmac_16", "tf_20"):
        x = out[:, :, feature(name)]
        assert np.all(direction * x[:, 0] > 0), f"{name} on the smooth trend"
        assert direction * x[:, 1].mean() > 0.3, f"{name} on the noisy trend"
    # RSI of a monotone series is extreme: all gains (or all losses).
    np.testing.assert_allclose(out[:, 0, feature("rsi_14")], direction)
    # The price sits at the top (bottom) of its 100-bar range.
    np.testing.assert_allclose(out[:, 0, feature("range_100")], direction)


def test_vol_ratio_detects_volatility_spike():
    rng = np.random.default_rng(10)
    vol = np.full(600, 0.005)
    vol[400:] = 0.02  # volatility quadruples at bar 400
    prices = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 1.0, 600) * vol))[:, None]
    x = compute_features(prices)[:, 0, feature("vol_ratio")]
    assert abs(x[300:400].mean()) < 0.3
    assert x[420:440].mean() > 0.5
