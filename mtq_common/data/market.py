"""The market data every phase trains and evaluates on: one split of aligned close prices.

A `MarketData` is produced by the synthetic generator (`mtq_common.data.synthetic`) or the CSV loader
(`mtq_common.data.csv_data`). Conventions shared by every consumer:

* ``prices[t, i]`` is the close of bar ``t`` for instrument ``i``.
* ``returns[t, i] = prices[t, i] / prices[t - 1, i] - 1 - financing[i]`` (simple return a position earns
  from bar ``t - 1`` to bar ``t``); ``returns[0] = 0``. A position chosen at bar ``t`` earns
  ``returns[t + 1]``. ``financing`` is 0 for futures and CFDs and the risk-free rate per bar for a spot
  instrument: the account earns the rate on its equity (`kernels.portfolio_step`), so a long stock
  bought with that cash must give it up. Every book, reward and baseline reads P&L from ``returns``.
* ``drift[t, i]`` (synthetic only) is the latent expected return of bar ``t -> t + 1``; it is for
  evaluation (the oracle baseline) and must never reach an observation.
* ``regime[t]`` (synthetic only) is the volatility regime of bar ``t`` (0 calm, 1 volatile, 2 crisis).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

REGIME_NAMES = ("calm", "volatile", "crisis")


@dataclass
class MarketData:
    """One split (train, val or test) of aligned bars for ``N`` instruments."""

    symbols: list[str]
    """Instrument symbols, length N, in column order."""
    sectors: list[str]
    """Asset class (= sector = specialist) of each symbol, length N."""
    prices: np.ndarray
    """Close prices, float64 ``[T, N]``, all positive."""
    timestamps: np.ndarray
    """Bar times, ``datetime64`` ``[T]`` (any unit), strictly increasing."""
    bars_per_year: float
    """Bars in one year of this data (252 for daily bars), used for annualisation."""
    bars_per_day: float
    """Bars in one trading day (1 for daily bars, 24 for hourly FX), used for the one-day VaR."""
    source: str
    """``"synthetic"`` or ``"csv"``."""
    split: str
    """``"train"``, ``"val"`` or ``"test"``."""
    regime: np.ndarray | None = None
    """Synthetic only: volatility regime per bar, int64 ``[T]``."""
    drift: np.ndarray | None = None
    """Synthetic only: latent expected return of bar t -> t+1, float64 ``[T, N]``. Evaluation only."""
    cost_multiplier: float = 1.0
    """Scales the configured transaction cost (the curriculum's cost knob)."""
    financing: np.ndarray | None = None
    """Cost per bar of the cash a position ties up, float64 ``[N]`` (None: 0, futures and CFDs; set from the
    config by `splits.financed`)."""

    def __post_init__(self) -> None:
        self.prices = np.asarray(self.prices, dtype=np.float64)
        if self.prices.ndim != 2 or self.prices.shape[1] != len(self.symbols):
            raise ValueError(f"prices must be [T, {len(self.symbols)}], got {self.prices.shape}")
        if len(self.sectors) != len(self.symbols):
            raise ValueError("sectors and symbols must have the same length")
        if len(self.timestamps) != len(self.prices):
            raise ValueError("timestamps and prices must have the same length")

    @property
    def num_bars(self) -> int:
        return self.prices.shape[0]

    @property
    def num_instruments(self) -> int:
        return self.prices.shape[1]

    @property
    def price_returns(self) -> np.ndarray:
        """Simple price returns ``[T, N]`` with ``[0] = 0``: what the risk model and volatility estimates read."""
        out = np.zeros_like(self.prices)
        out[1:] = self.prices[1:] / self.prices[:-1] - 1.0
        return out

    @property
    def returns(self) -> np.ndarray:
        """What a position earns per bar ``[T, N]``, the price return net of financing, with ``returns[0] = 0``
        (see the module docstring): every P&L reads it."""
        out = self.price_returns
        if self.financing is not None:
            out[1:] -= self.financing
        return out

    @property
    def expected_return(self) -> np.ndarray | None:
        """Synthetic only: what a position chosen at bar t expects to earn, the drift net of financing."""
        if self.drift is None or self.financing is None:
            return self.drift
        return self.drift - self.financing

    def window(self, start: int, stop: int, split: str) -> MarketData:
        """Bars `start` to `stop - 1` as a split of its own (the same instruments and frequency)."""
        return dataclasses.replace(
            self,
            prices=self.prices[start:stop].copy(),
            timestamps=self.timestamps[start:stop].copy(),
            split=split,
            regime=None if self.regime is None else self.regime[start:stop].copy(),
            drift=None if self.drift is None else self.drift[start:stop].copy(),
        )

    def select(self, symbols: list[str]) -> MarketData:
        """The same split restricted to ``symbols`` (in that order)."""
        idx = [self.symbols.index(s) for s in symbols]
        return MarketData(
            symbols=list(symbols),
            sectors=[self.sectors[i] for i in idx],
            prices=self.prices[:, idx],
            timestamps=self.timestamps,
            bars_per_year=self.bars_per_year,
            bars_per_day=self.bars_per_day,
            source=self.source,
            split=self.split,
            regime=self.regime,
            drift=None if self.drift is None else self.drift[:, idx],
            cost_multiplier=self.cost_multiplier,
            financing=None if self.financing is None else self.financing[idx],
        )


def iso_time(timestamp, bars_per_day: float) -> str:
    """A bar's time for people: an ISO date for daily (or slower) bars, ISO date and time for intraday ones."""
    ts = np.datetime64(timestamp)
    return str(np.datetime_as_string(ts, unit="D" if bars_per_day <= 1.0 else "m"))
