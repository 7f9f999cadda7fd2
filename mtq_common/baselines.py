"""Rule-based reference policies and a vectorised single-instrument backtest.

Positions follow the environments' timing: a position chosen at bar t (with prices up to t) earns
the return of bar t -> t+1 and pays `cost * |w_t - w_{t-1}|` on the turnover. `backtest` is the
whole-series form of the net-return formula that `kernels.portfolio_step` computes one bar at a time
for a batch of rows; a test pins the two to the same numbers.
"""

from __future__ import annotations

import numpy as np

MOMENTUM_LOOKBACK = 60
"""Bars of the time-series momentum rule (about a quarter of daily bars)."""


def momentum_positions(prices: np.ndarray, lookback: int = MOMENTUM_LOOKBACK) -> np.ndarray:
    """Time-series momentum: the sign of the return over the last `lookback` bars (0 before that)."""
    log_p = np.log(prices)
    out = np.zeros_like(log_p)
    out[lookback:] = np.sign(log_p[lookback:] - log_p[:-lookback])
    return out


def oracle_positions(drift: np.ndarray) -> np.ndarray:
    """The oracle knows the latent drift (synthetic data only): long when it is positive, else short."""
    return np.sign(drift)


def buy_and_hold_positions(prices: np.ndarray) -> np.ndarray:
    """Always fully long."""
    return np.ones_like(prices)


def backtest(positions: np.ndarray, returns: np.ndarray, cost: float | np.ndarray) -> np.ndarray:
    """Net return per bar and instrument of holding `positions` ([T, N]) over `returns` ([T, N]).

    Row k of the result is the bar k -> k+1: `w_k * returns[k+1] - cost * |w_k - w_{k-1}|` with
    w_{-1} = 0, so the result has T - 1 rows.
    """
    w = positions[:-1]
    w_prev = np.concatenate([np.zeros_like(w[:1]), w[:-1]], axis=0)
    return w * returns[1:] - cost * np.abs(w - w_prev)
