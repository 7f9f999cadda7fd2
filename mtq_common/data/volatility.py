"""The market's volatility, causal and normalised on the training split: what the volatility-managed rules
(`evaluation/rules.py`) and the risk-timing meta-controller (`agents/hierarchy.py`) both read.

`sigma_hat_t` is the root mean over instruments of each one's causal EWMA variance over its training-split
median (`market_sigma`); `sigma_star` is the training-split median of `sigma_hat` (`fit_vol_levels`, the
training split only). The appetite of a volatility-managed rule is `a_t = min(1, (sigma_star /
sigma_hat_t)^p)` (`vol_appetite`, DESIGN section 14); its half-life and power are one of `VOL_TIMING_GRID`,
picked on the validation split (`rules.pick_vol_timing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mtq_common.data.market import MarketData

VOL_TIMING_GRID = {"half_life": (10, 20, 60), "power": (1, 2)}
"""The volatility-managed rules' candidates (bars; exponent), picked on the validation split."""


def ewma(x: np.ndarray, half_life: float, start: np.ndarray) -> np.ndarray:
    """Causal EWMA of `x` `[T, N]` from `start` [N]: row t uses rows up to t."""
    alpha = 1.0 - 0.5 ** (1.0 / half_life)
    frame = pd.DataFrame(np.vstack([start[None, :], x.astype(np.float64)]))
    return frame.ewm(alpha=alpha, adjust=False).mean().to_numpy()[1:]


def ewma_variance(returns: np.ndarray, half_life: float, start: np.ndarray) -> np.ndarray:
    """Causal EWMA of squared returns `[T, N]` from `start` [N]: row t uses returns up to bar t."""
    return ewma(returns.astype(np.float64) ** 2, half_life, start)


@dataclass(frozen=True)
class VolLevels:
    """The training split's volatility levels, per candidate half-life (`fit_vol_levels`): each
    instrument's median EWMA variance (`level[h][i]`) and the median of the normalised market volatility
    `sigma_hat` (`sigma_star[h]`)."""

    half_lives: tuple[int, ...]
    level: tuple[tuple[float, ...], ...]
    sigma_star: tuple[float, ...]


def market_sigma(market: MarketData, levels: VolLevels, half_life: int) -> np.ndarray:
    """`sigma_hat_t` [T]: the root mean over instruments of each one's EWMA variance over its training
    level (causal; the EWMA starts at the training level, so a split's first bars read as normal)."""
    level = np.asarray(levels.level[levels.half_lives.index(half_life)])
    return np.sqrt((ewma_variance(market.price_returns, half_life, level) / level).mean(-1))


def fit_vol_levels(train: MarketData) -> VolLevels:
    """The volatility levels of every candidate half-life on the training split (never another split)."""
    if train.split != "train":
        raise ValueError(f"the volatility levels are fitted on the training split only, got {train.split!r}")
    half_lives = VOL_TIMING_GRID["half_life"]
    warm = (train.price_returns**2).mean(0)
    level = tuple(tuple(np.median(ewma_variance(train.price_returns, h, warm), 0).tolist()) for h in half_lives)
    partial = VolLevels(half_lives, level, (1.0,) * len(half_lives))
    star = tuple(float(np.median(market_sigma(train, partial, h))) for h in half_lives)
    return VolLevels(half_lives, level, star)


@dataclass(frozen=True)
class VolTiming:
    """One volatility-managed baseline's choice (`rules.pick_vol_timing`)."""

    half_life: int
    power: int
    picked_on: str
    """The split the choice was made on (`val`)."""
    val_sharpe: float
    """The choice's Sharpe ratio there (the scaled book's returns, see `rules.pick_vol_timing`)."""


def vol_appetite(market: MarketData, levels: VolLevels, timing: VolTiming) -> np.ndarray:
    """The appetite per bar [T], `min(1, (sigma_star / sigma_hat_t)^p)` (module docstring)."""
    sigma = market_sigma(market, levels, timing.half_life)
    star = levels.sigma_star[levels.half_lives.index(timing.half_life)]
    return np.minimum(1.0, (star / np.maximum(sigma, 1e-12)) ** timing.power)
