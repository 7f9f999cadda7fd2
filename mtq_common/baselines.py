"""The rule-based baselines' positions, one implementation each, and a vectorised backtest.

Each rule is a causal table of positions ``[T, N]`` in units of ``max_position`` (sign rules give -1, 0
or +1): the position a rule holds from bar t to t+1 uses prices up to bar t. The evaluations trade these
tables through the same environments as the learned policies (`portfolio_eval.RulePolicy` for the
portfolio, `specialist_eval` per instrument), with the same stop-loss, risk manager and costs.

* momentum: the sign of the ``MOMENTUM_LOOKBACK``-bar log price change;
* trend_filter: the sign of the EWMA drift estimate over its standard error (`features.trend_zscore`),
  with a no-trade band (`features.hysteresis`): the position changes only when the z-score crosses
  +-band, which cuts the turnover that costs eat. Half-life and band are picked on the **training
  split** from ``TREND_FILTER_GRID`` (`fit_trend_filter`), never on the data it is evaluated on;
* oracle (synthetic only): the sign of the latent drift of bar t -> t+1, the upper reference;
* buy-and-hold and equal weight: always long (buy-and-hold lets its holdings drift, see
  `portfolio_eval`); risk parity: long, inverse to the causal EWMA volatility.

`backtest` is the whole-series form of the net-return formula that `kernels.portfolio_step` computes one
bar at a time (a test pins the two to the same numbers, for weights rebalanced every bar).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from mtq_common.features import hysteresis, trend_zscore

MOMENTUM_LOOKBACK = 60
"""Bars of the time-series momentum rule (about a quarter of daily bars)."""

TREND_FILTER_GRID = {"half_life": (10, 20, 40, 80), "band": (0.0, 0.5, 1.0, 1.5)}
"""The trend filter's candidates (bars; z-score units), searched on the training split."""


def momentum_positions(prices: np.ndarray, lookback: int = MOMENTUM_LOOKBACK) -> np.ndarray:
    """Time-series momentum: the sign of the return over the last `lookback` bars (0 before that)."""
    log_p = np.log(prices)
    out = np.zeros_like(log_p)
    out[lookback:] = np.sign(log_p[lookback:] - log_p[:-lookback])
    return out


@dataclass(frozen=True)
class TrendFilter:
    """The trend filter's parameters and where they were picked (`fit_trend_filter`)."""

    half_life: int = 20
    band: float = 1.0
    fitted_on: str = "default"
    """The split the parameters were picked on (`train`), or `default` when not fitted."""
    train_sharpe: float | None = None
    """The picked candidate's Sharpe ratio on that split (plain vectorised backtest); None when not fitted."""


def trend_filter_positions(prices: np.ndarray, rule: TrendFilter) -> np.ndarray:
    """The trend filter's sign positions with a no-trade band ([T, N]; 0 before the first crossing)."""
    return hysteresis(trend_zscore(prices, rule.half_life), rule.band)


def fit_trend_filter(train, cost_rate: np.ndarray) -> TrendFilter:
    """Pick the trend filter's half-life and band on the training split `train` (a `MarketData`).

    Each candidate of ``TREND_FILTER_GRID`` holds `max_position`-size sign positions in every instrument;
    the score is the Sharpe ratio of the equally weighted book's net return (`backtest`, per-instrument
    `cost_rate`), a plain vectorised backtest without the stop-loss or the risk manager: cheap, and the
    ranking is what matters. Ties go to the first candidate in grid order.
    """
    from mtq_common.metrics import sharpe

    if train.split != "train":
        raise ValueError(f"the trend filter is fitted on the training split only, got {train.split!r}")
    best = None
    for half_life, band in itertools.product(TREND_FILTER_GRID["half_life"], TREND_FILTER_GRID["band"]):
        rule = TrendFilter(half_life, band)
        net = backtest(trend_filter_positions(train.prices, rule), train.returns, cost_rate).sum(-1)
        score = sharpe(net, train.bars_per_year)
        if best is None or score > best[0]:
            best = (score, rule)
    score, rule = best
    return TrendFilter(rule.half_life, rule.band, fitted_on="train", train_sharpe=float(score))


def oracle_positions(drift: np.ndarray) -> np.ndarray:
    """The oracle knows the latent drift (synthetic data only): long when it is positive, else short."""
    return np.sign(drift)


def buy_and_hold_positions(prices: np.ndarray) -> np.ndarray:
    """Always fully long."""
    return np.ones_like(prices)


def risk_parity_positions(variance: np.ndarray) -> np.ndarray:
    """Long every instrument inverse to its causal EWMA volatility, the largest position at 1 ([T, N])."""
    inverse_vol = 1.0 / np.sqrt(np.maximum(variance, 1e-20))
    return inverse_vol / inverse_vol.max(-1, keepdims=True)


def backtest(positions: np.ndarray, returns: np.ndarray, cost: float | np.ndarray) -> np.ndarray:
    """Net return per bar and instrument of holding `positions` ([T, N]) over `returns` ([T, N]).

    Row k of the result is the bar k -> k+1: `w_k * returns[k+1] - cost * |w_k - w_{k-1}|` with
    w_{-1} = 0, so the result has T - 1 rows (weights rebalanced to `positions` every bar, no drift).
    """
    w = positions[:-1]
    w_prev = np.concatenate([np.zeros_like(w[:1]), w[:-1]], axis=0)
    return w * returns[1:] - cost * np.abs(w - w_prev)
