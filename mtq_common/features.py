"""Causal, scale-free per-instrument features computed from close prices alone.

``compute_features(prices)`` maps close prices ``[T, N]`` to a float32 tensor ``[T, N, F]``; feature
``k`` is named ``FEATURE_NAMES[k]``. Every instrument is treated independently (the same formulas on
each column) and every feature at bar ``t`` uses prices at bars ``<= t`` only.

Notation (per instrument, per bar ``t``):

* ``lp[t] = log(p[t]) - log(p[0])``: log price relative to the first bar. Subtracting the constant
  ``log(p[0])`` (bar 0 is in everyone's past, so this is causal) removes the price scale and keeps the
  rolling sums below small and precise; a constant series gives exactly ``lp = 0``.
* ``r[t] = lp[t] - lp[t-1]``: log return (0 at bar 0; it is not used by the rolling statistics, so a
  window only counts real returns).
* ``vol_w[t] = max(std(r[t-w+1..t]), 1e-8)``: rolling realised volatility of the last ``w`` returns.
  The floor keeps every ratio finite on a flat price series.

The features. ``window`` is the lookback in bars; ``first bar`` is the first bar ``t`` at which the
feature is defined (it needs ``first bar + 1`` prices); before it the feature is 0.0:

==============  ==========================================================  ======  =========
name            formula                                                     window  first bar
==============  ==========================================================  ======  =========
``ret_1``       ``r[t] / vol_20``                                           20      20
``ret_5``       ``(lp[t] - lp[t-5]) / (vol_20 * sqrt(5))``                  20      20
``ret_20``      ``(lp[t] - lp[t-20]) / (vol_20 * sqrt(20))``                20      20
``trend_100``   ``(lp[t] - lp[t-100]) / (vol_100 * sqrt(100))``: t-stat of  100     100
                the mean return over the last 100 bars
``vol_ratio``   ``log(vol_20 / vol_100)``: > 0 when volatility is rising    100     100
``rsi_14``      Wilder RSI on log returns mapped to [-1, 1]:                14      14
                ``(rsi - 50) / 50 = (G - L) / max(G + L, 1e-8)`` with
                ``G``, ``L`` the EMAs (alpha = 1/14) of gains and losses
``macd``        ``(EMA12(p) - EMA26(p)) / p / vol_20``; EMAs of the price   26      25
                with ``adjust=False``, EMA26 waits for 26 prices
``zscore_20``   ``(lp - mean_20(lp)) / max(std_20(lp), 1e-8)`` over the     20      19
                last 20 log prices
``zscore_60``   the same over the last 60 log prices                        60      59
``range_100``   position in the high-low range of the last 100 log prices,  100     99
                mapped to [-1, 1]:
                ``(2 lp - max_100 - min_100) / max(max_100 - min_100, 1e-8)``
==============  ==========================================================  ======  =========

Why these are roughly unit-scale without fitted statistics: returns divided by ``vol * sqrt(horizon)``
are approximately standard normal for a random walk; ``rsi_14`` and ``range_100`` are bounded by
construction; the z-scores measure distance from a moving average in units of the same window's
dispersion; ``vol_ratio`` is a log ratio near 0. All are ratios of quantities in the same units, so
multiplying all prices by a constant leaves them unchanged (up to rounding).

Finally every feature is clipped to ``[-5, 5]``: returns have fat tails and regime shifts (a crash
after a calm spell, where ``vol_20`` is still small) produce moves of 10 or more "sigmas"; unclipped,
such outliers would dominate the running mean/variance of PPO's observation normaliser and squash
every ordinary observation towards zero.

Causality: only pandas ``rolling(...)``, ``diff`` and ``ewm(adjust=False)`` are used. They scan the
series forwards, so the value at bar ``t`` is computed bit-for-bit identically whatever comes after
``t``. Warm-up bars are NaN inside the computation and are set to 0.0 at the very end.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

FEATURE_NAMES: tuple[str, ...] = (
    "ret_1",
    "ret_5",
    "ret_20",
    "trend_100",
    "vol_ratio",
    "rsi_14",
    "macd",
    "zscore_20",
    "zscore_60",
    "range_100",
)
"""One short name per feature, in the order of the last axis of ``compute_features``' output."""

FEATURE_WINDOW: int = 100
"""Bars of history the slowest feature needs: from bar ``FEATURE_WINDOW`` on, every feature is defined."""

FEATURE_FIRST_BAR: tuple[int, ...] = (20, 20, 20, 100, 100, 14, 25, 19, 59, 99)
"""Per feature (same order as ``FEATURE_NAMES``), the first bar at which it is defined; 0.0 before it."""

FEATURE_CLIP: float = 5.0
"""Every feature is clipped to ``[-FEATURE_CLIP, FEATURE_CLIP]`` (see the module docstring for why)."""

_FLOOR = 1e-8  # smallest denominator: keeps ratios finite on flat price series


def _rolling_vol(r: pd.DataFrame, window: int) -> pd.DataFrame:
    """Rolling std of the last ``window`` log returns, floored; NaN until ``window`` real returns exist."""
    return r.rolling(window, min_periods=window).std().clip(lower=_FLOOR)


def _zscore(lp: pd.DataFrame, window: int) -> pd.DataFrame:
    """Distance of the log price from its ``window``-bar mean, in units of the window's std."""
    roll = lp.rolling(window, min_periods=window)
    return (lp - roll.mean()) / roll.std().clip(lower=_FLOOR)


def compute_features(prices: np.ndarray) -> np.ndarray:
    """Causal, scale-free features of each instrument (see the module docstring for the formulas).

    Args:
        prices: close prices, float64 ``[T, N]``, all positive and finite.

    Returns:
        float32 ``[T, N, F]`` with ``F = len(FEATURE_NAMES)``, values in ``[-5, 5]``, no NaN/inf;
        0.0 on bars before a feature's window is full.
    """
    prices = np.asarray(prices, dtype=np.float64)
    if prices.ndim != 2:
        raise ValueError(f"prices must be [T, N], got shape {prices.shape}")
    if not (np.all(np.isfinite(prices)) and np.all(prices > 0)):
        raise ValueError("prices must be finite and positive")
    if prices.shape[0] == 0:
        return np.zeros((0, prices.shape[1], len(FEATURE_NAMES)), dtype=np.float32)

    # One DataFrame column per instrument: every pandas op below runs on all columns at once.
    p = pd.DataFrame(prices)
    lp = pd.DataFrame(np.log(prices) - np.log(prices[0]))
    r = lp.diff()  # NaN at bar 0, so rolling windows only count real returns

    vol_20 = _rolling_vol(r, 20)
    vol_100 = _rolling_vol(r, 100)

    # Returns over several horizons, in units of the volatility expected over that horizon.
    ret_1 = r / vol_20
    ret_5 = lp.diff(5) / (vol_20 * np.sqrt(5.0))
    ret_20 = lp.diff(20) / (vol_20 * np.sqrt(20.0))
    # Using the same 100 returns for the sum and the std makes this a true t-stat of the mean return.
    trend_100 = lp.diff(100) / (vol_100 * np.sqrt(100.0))

    # Volatility regime: short vs long realised volatility.
    vol_ratio = np.log(vol_20 / vol_100)

    # Wilder RSI: (rsi - 50) / 50 simplifies to (G - L) / (G + L); the floor gives 0 on a flat series.
    gain = r.clip(lower=0.0).ewm(alpha=1.0 / 14.0, adjust=False, min_periods=14).mean()
    loss = (-r).clip(lower=0.0).ewm(alpha=1.0 / 14.0, adjust=False, min_periods=14).mean()
    rsi_14 = (gain - loss) / (gain + loss).clip(lower=_FLOOR)

    # MACD line: dividing by the price removes the scale, dividing by vol_20 the volatility level.
    ema_12 = p.ewm(span=12, adjust=False).mean()
    ema_26 = p.ewm(span=26, adjust=False, min_periods=26).mean()
    macd = (ema_12 - ema_26) / p / vol_20

    # Mean reversion: distance from the moving averages of log price.
    zscore_20 = _zscore(lp, 20)
    zscore_60 = _zscore(lp, 60)

    # Where the price sits in its recent high-low range (stochastic oscillator), mapped to [-1, 1].
    hi = lp.rolling(100, min_periods=100).max()
    lo = lp.rolling(100, min_periods=100).min()
    range_100 = (2.0 * lp - hi - lo) / (hi - lo).clip(lower=_FLOOR)

    columns = (ret_1, ret_5, ret_20, trend_100, vol_ratio, rsi_14, macd, zscore_20, zscore_60, range_100)
    assert len(columns) == len(FEATURE_NAMES)
    out = np.stack([c.to_numpy(dtype=np.float64) for c in columns], axis=-1)  # [T, N, F]
    # Warm-up bars are NaN; they become 0 ("no information yet"), then clip the fat tails.
    out = np.nan_to_num(out, nan=0.0, posinf=FEATURE_CLIP, neginf=-FEATURE_CLIP)
    return np.clip(out, -FEATURE_CLIP, FEATURE_CLIP).astype(np.float32)
