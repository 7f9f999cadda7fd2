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

Execution (`RulePolicy`): a rule's table is a *target*; it trades through the execution every policy
shares (DESIGN section 4): the partial adjustment `engine.partial_adjustment` at the rate of the
specialists it is compared with, and the env's stop-loss lock-out (a stopped instrument stays flat until
the target changes sign, flat counts). Two exceptions belong to the rules' definitions, not to the
execution: the long-only rules (equal weight, buy-and-hold, risk parity) have no sign to change, so they
ask for a flat position on the bar after a stop and then re-enter (without this they would stay flat for
the rest of a segment after their first 2% stop); buy-and-hold makes one purchase and never trades after
it, so it buys at full size (nothing to smooth).

Risk timing (`vol_managed_*`, DESIGN section 14): a policy's book scaled by the appetite
`a_t = min(1, (sigma_star / sigma_hat_t)^p)`, `sigma_hat_t` the causal EWMA volatility of the instruments
(each normalised by its training-split median), `sigma_star` the training-split median of `sigma_hat`;
the half-life and `p` are picked on the validation split (`pick_vol_timing`); the volatility itself
is `data/volatility.py`, which the risk-timing meta-controller reads too.

`backtest` is the whole-series form of the net-return formula that `kernels.portfolio_step` computes one
bar at a time (a test pins the two to the same numbers, for weights rebalanced every bar).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from mtq_common.data.features import FEATURE_CLIP, hysteresis, trend_zscore
from mtq_common.data.market import MarketData
from mtq_common.data.tables import cost_rates
from mtq_common.data.volatility import VOL_TIMING_GRID, VolLevels, VolTiming, vol_appetite
from mtq_common.envs.engine import partial_adjustment
from mtq_common.envs.portfolio_env import PortfolioEnv
from mtq_common.envs.trading_env import position_column
from mtq_common.evaluation.metrics import sharpe
from mtq_common.training.config import Config

MOMENTUM_LOOKBACK = 60
"""Bars of the time-series momentum rule (about a quarter of daily bars)."""

TREND_FILTER_GRID = {"half_life": (10, 20, 40, 80), "band": (0.0, 0.5, 1.0, 1.5)}
"""The trend filter's candidates (bars; z-score units), searched on the training split."""

RULES = ("momentum", "trend_filter", "vol_managed_trend_filter")
"""The rules the system is judged against (DESIGN section 14: a margin above the best of them, traded alike). The
report's targets, the seed table and the tear sheet name the same one (`best_rule`)."""


def best_rule(sharpes: dict[str, float]) -> str | None:
    """The one of `RULES` with the highest Sharpe ratio in `sharpes` (`{policy: Sharpe}`), None when none is there."""
    present = [name for name in RULES if name in sharpes]
    return max(present, key=sharpes.__getitem__) if present else None


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


def best_on_train(train, name: str, candidates: list, positions, cost_rate: np.ndarray) -> tuple[float, object]:
    """`(score, candidate)`: the candidate whose `positions(candidate)` [T, N] scores best on the training split
    `train`, the score the Sharpe ratio of the equally weighted book's net return (`backtest`, per-instrument
    `cost_rate`), a plain vectorised backtest without the stop-loss or the risk manager: cheap, and the ranking
    is what matters. Ties go to the first candidate. `name` is the rule's, for the error on another split."""
    if train.split != "train":
        raise ValueError(f"the {name} is fitted on the training split only, got {train.split!r}")
    scores = [sharpe(backtest(positions(c), train.returns, cost_rate).sum(-1), train.bars_per_year) for c in candidates]
    best = 0
    for i, score in enumerate(scores):  # (strictly greater: the first of equal maxima wins)
        if score > scores[best]:
            best = i
    return float(scores[best]), candidates[best]


def fit_trend_filter(train, cost_rate: np.ndarray) -> TrendFilter:
    """Pick the trend filter's half-life and band on the training split `train` (a `MarketData`).

    Each candidate of ``TREND_FILTER_GRID`` holds `max_position`-size sign positions in every instrument;
    scored by `best_on_train`.
    """
    candidates = [TrendFilter(h, b) for h, b in itertools.product(TREND_FILTER_GRID["half_life"],
                                                                   TREND_FILTER_GRID["band"])]  # fmt: skip
    score, rule = best_on_train(train, "trend filter", candidates, lambda r: trend_filter_positions(train.prices, r),
                                cost_rate)  # fmt: skip
    return TrendFilter(rule.half_life, rule.band, fitted_on="train", train_sharpe=float(score))


SCALED_TREND_GRID = {"half_life": (10, 20, 40, 80), "scale": (0.125, 0.25, 0.5, 1.0)}
"""The scaled trend's candidates (bars; position per unit of z-score), searched on the training split."""


@dataclass(frozen=True)
class ScaledTrend:
    """The scaled trend's parameters and where they were picked (`fit_scaled_trend`)."""

    half_life: int = 20
    scale: float = 0.25
    fitted_on: str = "default"
    train_sharpe: float | None = None


def scaled_trend_positions(prices: np.ndarray, rule: ScaledTrend) -> np.ndarray:
    """The scaled trend's positions `clip(scale * z, -1, 1)` ([T, N]; 0 before the z-score exists), `z` the EWMA
    drift z-score as the specialists observe it (the feature `trend_z_h`, clipped at `FEATURE_CLIP`).

    Why beside the sign rule: a position in proportion to the evidence for a drift holds little where the
    evidence is weak, which the sign rule cannot; traded alike on the built-in market it scores about 1 Sharpe
    above `trend_filter` (docs/benchmarks.md)."""
    z = np.clip(np.nan_to_num(trend_zscore(prices, rule.half_life)), -FEATURE_CLIP, FEATURE_CLIP)
    return np.clip(rule.scale * z, -1.0, 1.0)


def fit_scaled_trend(train, cost_rate: np.ndarray, position_rate: float) -> ScaledTrend:
    """Pick the scaled trend's half-life and scale on the training split `train`, each candidate traded at
    `position_rate` (the partial adjustment of the execution, `partially_adjusted`), scored by `best_on_train`."""
    candidates = [ScaledTrend(h, c) for h, c in itertools.product(SCALED_TREND_GRID["half_life"],
                                                                   SCALED_TREND_GRID["scale"])]  # fmt: skip
    # every candidate's book through the execution in one pass over the bars (each element as alone: the same bits)
    held = partially_adjusted(np.stack([scaled_trend_positions(train.prices, r) for r in candidates]), position_rate)
    score, rule = best_on_train(train, "scaled trend", candidates, lambda r: held[candidates.index(r)], cost_rate)
    return ScaledTrend(rule.half_life, rule.scale, fitted_on="train", train_sharpe=float(score))


def partially_adjusted(targets: np.ndarray, rate: float) -> np.ndarray:
    """The positions held when a book of `targets` [..., T, N] (leading axes: several books at once) trades
    through `engine.partial_adjustment` from flat (no stop-loss: for the vectorised picks)."""
    held = np.zeros_like(targets)
    previous = np.zeros_like(targets[..., 0, :])
    for t in range(targets.shape[-2]):
        previous = partial_adjustment(previous, targets[..., t, :], rate)  # (plain arithmetic: numpy arrays work)
        held[..., t, :] = previous
    return held


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

BASELINE_NAMES = ("equal_weight", "buy_and_hold", "risk_parity", "momentum", "trend_filter", "scaled_trend", "oracle")
"""The baselines of every portfolio evaluation, in report order (the scaled trend where the specialists start at it,
the oracle only on synthetic data)."""


class RulePolicy:
    """A rule that trades its position table through the shared execution: the target `table[t]` (units of
    `max_position`) at each row's bar t, partially adjusted at `position_rate` from the own position the
    observation carries (module docstring). `reenter=True` (the long-only rules): flat on the bar after a
    stop-loss, then the target again."""

    def __init__(self, table: torch.Tensor | None, max_position: float, position_rate: float = 1.0,
                 reenter: bool = False):  # fmt: skip
        if not 0.0 < position_rate <= 1.0:
            raise ValueError(f"position_rate {position_rate}: accepted 0 < rate <= 1")
        self.table = table  # [T, N] in units of max_position (None: the subclass computes its target)
        self.max_position, self.position_rate, self.reenter = max_position, position_rate, reenter
        self.stopped: torch.Tensor | None = None  # [B, N] instruments stopped out on the last bar

    def target(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        """The rule's target weights [B, N] at the env's current bars."""
        return self.table.index_select(0, env.bar) * self.max_position

    def propose(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        weights = self.target(obs, env)
        if self.reenter and self.stopped is not None:
            weights = torch.where(self.stopped, 0.0, weights)
        if self.position_rate == 1.0:
            return weights
        own = obs["instruments"][..., position_column(env.n)]  # the own position (0 while a stop holds it flat)
        return partial_adjustment(own, weights / self.max_position, self.position_rate) * self.max_position

    def observe(self, info: dict, done: torch.Tensor) -> None:
        if self.reenter:
            self.stopped = info["stop_loss"] & ~done.unsqueeze(-1)  # a new episode starts unlocked anyway


class BuyAndHoldPolicy(RulePolicy):
    """Long every instrument at `max_position` when flat, then hold what the account holds (the holdings
    drift with prices: no rebalancing, so no turnover after the purchase). One purchase, nothing to smooth:
    it trades at rate 1; it re-enters after a stop like the other long-only rules."""

    def __init__(self, max_position: float):
        super().__init__(None, max_position, position_rate=1.0, reenter=True)

    def target(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        held = env.holdings
        return torch.where(held != 0, held, self.max_position)


class RiskParityPolicy(RulePolicy):
    """Long every instrument inverse to its causal EWMA volatility, the largest at `max_position`."""

    def target(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        inverse_vol = env.now("variance").clamp_min(1e-20).rsqrt()
        return self.max_position * inverse_vol / inverse_vol.amax(-1, keepdim=True)


class VolManagedPolicy:
    """Another policy's book scaled by a per-bar appetite `a [T]` (`vol_appetite`): the proposal times
    `a[bar]`; the own positions (what the stop-loss and the observations follow) stay the inner policy's,
    so the scaled book has the same trades and stops, only smaller in volatile times."""

    def __init__(self, inner, appetite: torch.Tensor, max_position: float):
        self.inner, self.appetite, self.max_position = inner, appetite, max_position
        self.own_positions: torch.Tensor | None = None

    @property
    def last_allocation(self):
        return getattr(self.inner, "last_allocation", None)

    def propose(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        proposal = self.inner.propose(obs, env)
        own = getattr(self.inner, "own_positions", None)
        self.own_positions = (proposal / self.max_position).clamp(-1.0, 1.0) if own is None else own
        return proposal * self.appetite.index_select(0, env.bar).unsqueeze(-1)

    def observe(self, info: dict, done: torch.Tensor) -> None:
        self.inner.observe(info, done)


def rule_tables(market: MarketData, trend: TrendFilter, scaled: ScaledTrend | None = None) -> dict[str, np.ndarray]:
    """Position tables [T, N] of the table-driven rules on `market` (the scaled trend where `scaled` is given,
    the oracle only where drift exists)."""
    tables = {
        "equal_weight": np.ones_like(market.prices),
        "momentum": momentum_positions(market.prices),
        "trend_filter": trend_filter_positions(market.prices, trend),
    }
    if scaled is not None:
        tables["scaled_trend"] = scaled_trend_positions(market.prices, scaled)
    if market.drift is not None:
        tables["oracle"] = oracle_positions(market.expected_return)
    return tables


def baseline_policies(market: MarketData, cfg: Config, trend: TrendFilter, device="cpu",
                      position_rate: float = 1.0, scaled: ScaledTrend | None = None) -> dict:  # fmt: skip
    """Fresh baseline policies by name (`BASELINE_NAMES` order; the scaled trend where `scaled` is given, the
    oracle only on synthetic data), trading at `position_rate` (the evaluated specialists' rate: execution
    alike)."""
    size = cfg.environment.max_position_size
    tables = {
        name: torch.tensor(t, dtype=torch.float32, device=device)
        for name, t in rule_tables(market, trend, scaled).items()
    }
    long_only = ("equal_weight",)
    policies = {
        "buy_and_hold": BuyAndHoldPolicy(size),
        "risk_parity": RiskParityPolicy(None, size, position_rate, reenter=True),
        **{name: RulePolicy(t, size, position_rate, reenter=name in long_only) for name, t in tables.items()},
    }
    return {name: policies[name] for name in BASELINE_NAMES if name in policies}


def fit_trend_for(train: MarketData, cfg: Config) -> TrendFilter:
    """`rules.fit_trend_filter` on the training split with the environments' per-instrument costs."""
    return fit_trend_filter(train, cost_rates(train, cfg, "cpu").double().numpy())


# ---------------------------------------------------------------------------------------------
# Risk timing: the volatility-managed baselines (DESIGN section 14)
# ---------------------------------------------------------------------------------------------

VOL_MANAGED = {"vol_managed_equal_allocation": "equal_allocation", "vol_managed_trend_filter": "trend_filter"}
"""Each volatility-managed baseline and the policy whose book it scales."""


def pick_vol_timing(market: MarketData, levels: VolLevels, bars: np.ndarray, gross: np.ndarray, weights: np.ndarray,
                    segment_length: int, cost_rate: np.ndarray, risk_free_rate: float) -> VolTiming:  # fmt: skip
    """Pick the half-life and power on the validation split `market` from the unscaled policy's backtest
    there (`bars` [T], its trading return before costs `gross` [T], executed `weights` [T, N]): each
    candidate's Sharpe ratio of `a_t * gross_t - cost(a_t * w_t)`, costs charged on the scaled book's
    changes (a plain vectorised backtest: cheap, and the ranking is what matters). Ties go to the first."""
    if market.split != "val":
        raise ValueError(f"the volatility timing is picked on the validation split only, got {market.split!r}")
    cash = risk_free_rate / market.bars_per_year
    best = None
    for half_life, power in itertools.product(VOL_TIMING_GRID["half_life"], VOL_TIMING_GRID["power"]):
        a = vol_appetite(market, levels, VolTiming(half_life, power, "val", 0.0))[bars]
        scaled = a[:, None] * weights
        previous = np.concatenate([np.zeros_like(scaled[:1]), scaled[:-1]])
        previous[::segment_length] = 0.0  # each segment starts flat
        net = a * gross - (cost_rate * np.abs(scaled - previous)).sum(-1) + cash
        score = float(sharpe(net, market.bars_per_year, risk_free_rate))
        if best is None or score > best.val_sharpe:
            best = VolTiming(half_life, power, "val", score)
    return best
