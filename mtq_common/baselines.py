"""The rule-based baselines' positions, one implementation each, and a vectorised backtest.

Each rule is a causal table of positions ``[T, N]`` in units of ``max_position`` (sign rules give -1, 0
or +1): the position a rule holds from bar t to t+1 uses prices up to bar t. The evaluations trade these
tables through the same environments as the learned policies (`RulePolicy` below for the
portfolio, `specialist_eval` per instrument), with the same stop-loss, risk manager and costs.

* momentum: the sign of the ``MOMENTUM_LOOKBACK``-bar log price change;
* trend_filter: the sign of the EWMA drift estimate over its standard error (`features.trend_zscore`),
  with a no-trade band (`features.hysteresis`): the position changes only when the z-score crosses
  +-band, which cuts the turnover that costs eat. Half-life and band are picked on the **training
  split** from ``TREND_FILTER_GRID`` (`fit_trend_filter`), never on the data it is evaluated on;
* oracle (synthetic only): the sign of the latent drift of bar t -> t+1, the upper reference;
* buy-and-hold and equal weight: always long (buy-and-hold lets its holdings drift, see
  `BuyAndHoldPolicy`); risk parity: long, inverse to the causal EWMA volatility (`RiskParityPolicy`).

Stop-loss and the rules (`RulePolicy`): the env holds a stopped instrument flat while the policy keeps
asking for the stopped trade's sign, and a new trade opens once the policy asks for another sign (flat counts).
Every rule therefore asks for a flat position in an instrument on the bar after its stop and then
re-opens its trade: without this, the long-only rules (equal weight, buy-and-hold, risk parity)
would stay flat after their first 2% stop for the rest of a segment (measured before the change:
about 95% of instrument-bars flat in the first quarter of a 949-bar segment).

`backtest` is the whole-series form of the net-return formula that `kernels.portfolio_step` computes one
bar at a time (a test pins the two to the same numbers, for weights rebalanced every bar).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from mtq_common.config import Config
from mtq_common.envs import PortfolioEnv
from mtq_common.features import hysteresis, trend_zscore
from mtq_common.market import MarketData
from mtq_common.market_tables import cost_rates

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


def backtest(positions: np.ndarray, returns: np.ndarray, cost: float | np.ndarray) -> np.ndarray:
    """Net return per bar and instrument of holding `positions` ([T, N]) over `returns` ([T, N]).

    Row k of the result is the bar k -> k+1: `w_k * returns[k+1] - cost * |w_k - w_{k-1}|` with
    w_{-1} = 0, so the result has T - 1 rows (weights rebalanced to `positions` every bar, no drift).
    """
    w = positions[:-1]
    w_prev = np.concatenate([np.zeros_like(w[:1]), w[:-1]], axis=0)
    return w * returns[1:] - cost * np.abs(w - w_prev)


# ---------------------------------------------------------------------------------------------
# The rules as policies traded through PortfolioEnv (the evaluations' baselines)
# ---------------------------------------------------------------------------------------------

BASELINE_NAMES = ("equal_weight", "buy_and_hold", "risk_parity", "momentum", "trend_filter", "oracle")
"""The baselines of every portfolio evaluation, in report order (the oracle only on synthetic data)."""


class RulePolicy:
    """A rule that trades its position table: `max_position * table[t]` at each row's bar t.

    On the bar after a stop-loss closed a trade the rule asks for a flat position in that instrument,
    then re-opens it (the env holds a stopped instrument flat while its sign is asked for again).
    """

    def __init__(self, table: torch.Tensor | None, max_position: float):
        self.table = table  # [T, N] in units of max_position (None: the subclass computes its target)
        self.max_position = max_position
        self.stopped: torch.Tensor | None = None  # [B, N] instruments stopped out on the last bar

    def target(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        """The rule's proposed weights [B, N] at the env's current bars."""
        return self.table.index_select(0, env.bar) * self.max_position

    def propose(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        weights = self.target(obs, env)
        return weights if self.stopped is None else torch.where(self.stopped, 0.0, weights)

    def observe(self, info: dict, done: torch.Tensor) -> None:
        self.stopped = info["stop_loss"] & ~done.unsqueeze(-1)  # a new episode starts unlocked anyway


class BuyAndHoldPolicy(RulePolicy):
    """Long every instrument at `max_position` when flat, then hold what the account holds (the holdings
    drift with prices: no rebalancing, so no turnover after the purchase)."""

    def target(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        held = env.holdings
        return torch.where(held != 0, held, self.max_position)


class RiskParityPolicy(RulePolicy):
    """Long every instrument inverse to its causal EWMA volatility, the largest at `max_position`."""

    def target(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        inverse_vol = env.now("variance").clamp_min(1e-20).rsqrt()
        return self.max_position * inverse_vol / inverse_vol.amax(-1, keepdim=True)


def rule_tables(market: MarketData, trend: TrendFilter) -> dict[str, np.ndarray]:
    """Position tables [T, N] of the table-driven rules on `market` (the oracle only where drift exists)."""
    tables = {
        "equal_weight": np.ones_like(market.prices),
        "momentum": momentum_positions(market.prices),
        "trend_filter": trend_filter_positions(market.prices, trend),
    }
    if market.drift is not None:
        tables["oracle"] = oracle_positions(market.drift)
    return tables


def baseline_policies(market: MarketData, cfg: Config, trend: TrendFilter, device="cpu") -> dict:
    """Fresh baseline policies by name (`BASELINE_NAMES` order; the oracle only on synthetic data)."""
    size = cfg.environment.max_position_size
    tables = rule_tables(market, trend)
    policies = {
        "buy_and_hold": BuyAndHoldPolicy(None, size),
        "risk_parity": RiskParityPolicy(None, size),
        **{name: RulePolicy(torch.tensor(t, dtype=torch.float32, device=device), size) for name, t in tables.items()},
    }
    return {name: policies[name] for name in BASELINE_NAMES if name in policies}


def fit_trend_for(train: MarketData, cfg: Config) -> TrendFilter:
    """`baselines.fit_trend_filter` on the training split with the environments' per-instrument costs."""
    return fit_trend_filter(train, cost_rates(train, cfg, "cpu").double().numpy())
