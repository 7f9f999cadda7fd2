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
``ret_60``      ``(lp[t] - lp[t-60]) / (vol_60 * sqrt(60))``: the 60-bar   60      60
                momentum signal, continuous
``trend_z_h``   ``ewm_h(r) / (ewvol * sqrt((1 - lam) / (1 + lam)))`` for    h       max(h, 20)
(h = 10, 20,    half-lives h: the EWMA drift estimate in units of its own
40, 80)         standard error under no drift (``lam = 0.5 ** (1/h)``,
                ``ewvol`` the EWMA volatility of half-life 20); see
                `trend_zscore`
``ewmac_f``     EWMA crossover of log prices, spans (f, 3f), in units of    3f      3f - 1
(f = 8, 16,     its standard deviation under a random walk (closed form
32)             in `_crossover_scale`) times ``ewvol``
``tf_20``,      the trend-filter position (+1, -1 or 0 before the first     h       max(h, 20)
``tf_40``       crossing) of ``trend_z_h`` with a band of ``TREND_BAND``:
                it changes only when the z-score crosses +-band
                (`hysteresis`)
==============  ==========================================================  ======  =========

The trend features (``trend_z_h``, ``ewmac_f``, ``tf_h``) carry the persistent drift that trend rules
trade; ``tf_h`` is the state of the `trend_filter` baseline's rule at a fixed half-life and band (no
parameter is fitted on any split), so a specialist can hold a position as steady as the rule's.

Why these are roughly unit-scale without fitted statistics: returns divided by ``vol * sqrt(horizon)``
are approximately standard normal for a random walk; ``rsi_14`` and ``range_100`` are bounded by
construction; the z-scores measure distance from a moving average in units of the same window's
dispersion; ``vol_ratio`` is a log ratio near 0. All are ratios of quantities in the same units, so
multiplying all prices by a constant leaves them unchanged (up to rounding).

Finally every feature is clipped to ``[-5, 5]``: returns have fat tails and regime shifts (a crash
after a calm spell, where ``vol_20`` is still small) produce moves of 10 or more "sigmas"; unclipped,
such outliers would dominate the running mean/variance of PPO's observation normaliser and squash
every ordinary observation towards zero.

Causality: only pandas ``rolling(...)``, ``diff``, ``ewm`` and ``ffill`` are used. They scan the
series forwards, so the value at bar ``t`` is computed bit-for-bit identically whatever comes after
``t``. Warm-up bars are NaN inside the computation and are set to 0.0 at the very end.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

TREND_HALF_LIVES: tuple[int, ...] = (10, 20, 40, 80)
"""Half-lives (bars) of the ``trend_z_h`` features."""
CROSSOVER_FAST_SPANS: tuple[int, ...] = (8, 16, 32)
"""Fast spans of the ``ewmac_f`` crossovers (the slow span is three times the fast one)."""
TREND_FILTER_FEATURES: tuple[int, ...] = (20, 40)
"""Half-lives of the ``tf_h`` trend-filter position features."""
TREND_BAND: float = 1.0
"""No-trade band of the ``tf_h`` features, in units of the z-score."""
VOL_HALF_LIFE: int = 20
"""Half-life (bars) of the EWMA volatility that scales the trend features."""

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
    "ret_60",
    *(f"trend_z_{h}" for h in TREND_HALF_LIVES),
    *(f"ewmac_{f}" for f in CROSSOVER_FAST_SPANS),
    *(f"tf_{h}" for h in TREND_FILTER_FEATURES),
)
"""One short name per feature, in the order of the last axis of ``compute_features``' output."""

FEATURE_WINDOW: int = 100
"""Bars of history the slowest feature needs: from bar ``FEATURE_WINDOW`` on, every feature is defined."""

FEATURE_FIRST_BAR: tuple[int, ...] = (
    (20, 20, 20, 100, 100, 14, 25, 19, 59, 99, 60)
    + tuple(max(h, VOL_HALF_LIFE) for h in TREND_HALF_LIVES)
    + tuple(3 * f - 1 for f in CROSSOVER_FAST_SPANS)
    + tuple(max(h, VOL_HALF_LIFE) for h in TREND_FILTER_FEATURES)
)
"""Per feature (same order as ``FEATURE_NAMES``), the first bar at which it is defined; 0.0 before it."""
STATE_FEATURES: tuple[str, ...] = tuple(f"tf_{h}" for h in TREND_FILTER_FEATURES)
"""Features that are a rule's state: 0 until the rule's first crossing, which may come after the first bar."""

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


def ewm_volatility(log_returns: pd.DataFrame) -> pd.DataFrame:
    """EWMA volatility (half-life ``VOL_HALF_LIFE``) of log returns, floored; NaN until ``VOL_HALF_LIFE`` returns."""
    variance = (log_returns**2).ewm(halflife=VOL_HALF_LIFE, min_periods=VOL_HALF_LIFE).mean()
    return np.sqrt(variance).clip(lower=_FLOOR)


def trend_zscore(prices: np.ndarray, half_life: int) -> np.ndarray:
    """The EWMA drift estimate of log returns in units of its standard error under no drift ``[T, N]``.

    ``ewm_h(r) / (ewvol * sqrt((1 - lam) / (1 + lam)))`` with ``lam = 0.5 ** (1 / h)``: the EWMA of i.i.d.
    returns of std sigma has std ``sigma * sqrt((1 - lam) / (1 + lam))``, so the ratio is about N(0, 1)
    when there is no drift and large when a persistent drift shows. NaN before ``max(h, VOL_HALF_LIFE)``.
    Causal: forward EWMAs only. The `trend_filter` baseline and the ``trend_z_h``/``tf_h`` features use it.
    """
    lp = pd.DataFrame(np.log(np.asarray(prices, dtype=np.float64)))
    r = lp.diff()
    lam = 0.5 ** (1.0 / half_life)
    drift = r.ewm(halflife=half_life, min_periods=half_life).mean()
    return (drift / (ewm_volatility(r) * np.sqrt((1.0 - lam) / (1.0 + lam)))).to_numpy()


def hysteresis(z: np.ndarray, band: float) -> np.ndarray:
    """Sign positions with a no-trade band ``[T, N]``: +1 once ``z > band``, -1 once ``z < -band``, else
    the previous position (0 before the first crossing; NaN counts as no crossing). Causal by construction:
    a scan forward in time, once per dataset."""
    z = np.asarray(z, dtype=np.float64)
    crossing = np.where(z > band, 1.0, np.where(z < -band, -1.0, np.nan))  # NaN: no crossing at this bar
    # the position is the last crossing's sign: a forward fill (a forward scan, so causal)
    return pd.DataFrame(crossing).ffill().fillna(0.0).to_numpy()


def _crossover_scale(fast: int, slow: int) -> float:
    """Std of ``ema_fast(lp) - ema_slow(lp)`` per unit return std under a random walk (infinite history).

    ``lp_t - ema_a(lp)_t = sum_j a^(j+1) r_(t-j)`` for an EMA of smoothing ``1 - a``, so the crossover is
    ``sum_j (s^(j+1) - f^(j+1)) r_(t-j)`` and its variance a sum of three geometric series.
    """
    f, s = 1.0 - 2.0 / (fast + 1.0), 1.0 - 2.0 / (slow + 1.0)
    return float(np.sqrt(s * s / (1 - s * s) - 2 * s * f / (1 - s * f) + f * f / (1 - f * f)))


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

    # Trend: 60-bar momentum, EWMA drift z-scores, EWMA crossovers and the trend-filter positions.
    ret_60 = lp.diff(60) / (_rolling_vol(r, 60) * np.sqrt(60.0))
    ewvol = ewm_volatility(r)
    trend_z = [pd.DataFrame(trend_zscore(prices, h)) for h in TREND_HALF_LIVES]
    crossovers = [
        (
            lp.ewm(span=f, adjust=False, min_periods=3 * f).mean()
            - lp.ewm(span=3 * f, adjust=False, min_periods=3 * f).mean()
        )
        / (ewvol * _crossover_scale(f, 3 * f))
        for f in CROSSOVER_FAST_SPANS
    ]
    rules = []
    for h in TREND_FILTER_FEATURES:
        z = trend_z[TREND_HALF_LIVES.index(h)].to_numpy()
        rule = pd.DataFrame(hysteresis(z, TREND_BAND))
        rule.iloc[: max(h, VOL_HALF_LIFE)] = np.nan  # undefined before its z-score (then 0 until a crossing)
        rules.append(rule)

    columns = (ret_1, ret_5, ret_20, trend_100, vol_ratio, rsi_14, macd, zscore_20, zscore_60, range_100, ret_60,
               *trend_z, *crossovers, *rules)  # fmt: skip
    assert len(columns) == len(FEATURE_NAMES)
    out = np.stack([c.to_numpy(dtype=np.float64) for c in columns], axis=-1)  # [T, N, F]
    # Warm-up bars are NaN; they become 0 ("no information yet"), then clip the fat tails.
    out = np.nan_to_num(out, nan=0.0, posinf=FEATURE_CLIP, neginf=-FEATURE_CLIP)
    return np.clip(out, -FEATURE_CLIP, FEATURE_CLIP).astype(np.float32)
