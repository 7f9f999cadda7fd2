"""Market tables: everything the environments need that depends only on the market path and the config,
computed once per dataset (`build_tables`): features, the causal covariance and volatility, each
instrument's cost per unit of turnover (`cost_rates`), the risk limits in force (`feasible_limits`) and the
first tradable bar. Every environment, backtest and the act mode read the same tables, so they see the
same numbers for the same bar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import kernels
from kernels.risk import NOT_APPLIED, correlation_from_covariance
from mtq_common.data.features import FEATURE_NAMES, FEATURE_WINDOW, compute_features
from mtq_common.data.market import MarketData
from mtq_common.training.config import Config

OBS_CLIP = 10.0
"""Observations are clipped to +-OBS_CLIP so they always lie inside the observation space."""
STATE_SIZE = 4
"""Per-instrument state columns of an observation: position, unrealised PnL, drawdown, time in trade."""


def portfolio_state_size(n: int) -> int:
    """State columns of the portfolio observation: drawdown, the N weights, three risk usages."""
    return 1 + n + 3


NORMAL_QUANTILES = {0.9: 1.2815515655446004, 0.95: 1.6448536269514722, 0.99: 2.3263478740408408}


def normal_quantile(p: float) -> float:
    """z such that P(Z <= z) = p for a standard normal (bisection on erf; exact for the common levels)."""
    if p in NORMAL_QUANTILES:
        return NORMAL_QUANTILES[p]
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------
# Market tables: everything that depends only on the market path, computed once per dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class MarketTables:
    """Device tensors of one `MarketData` that every step gathers from (no per-step recomputation)."""

    prices: torch.Tensor  # [T, N] closes
    returns: torch.Tensor  # [T, N] simple return of bar t-1 -> t
    features: torch.Tensor  # [T, N, F] causal features
    instrument_static: torch.Tensor  # [T, N, F + N + STATE] features, one-hot, zeros for the state (one gather)
    portfolio_static: torch.Tensor  # [T, 3N + N(N-1)/2 + portfolio_state_size(N)] 1- and 20-bar scaled returns, vols,
    # correlations, zeros for the state (the portfolio observation's layout: one gather)
    cov: torch.Tensor  # [T, N, N] per-bar EWMA covariance through bar t
    corr: torch.Tensor  # [T, N, N] its correlation R (`kernels.risk.correlation_from_covariance`), for the risk manager
    variance: torch.Tensor  # [T, N] per-bar variance (the diagonal of cov)
    vol: torch.Tensor  # [T, N] annualised volatility from cov
    corr_ut: torch.Tensor  # [T, N(N-1)/2] upper triangle of the correlation matrix
    regime: torch.Tensor | None  # [T] synthetic only (info, for evaluation)
    drift: torch.Tensor | None  # [T, N] synthetic only (info, for evaluation)
    first_bar: int  # earliest bar an episode may start at
    bars_per_year: float
    bars_per_day: float

    @property
    def num_bars(self) -> int:
        return self.prices.shape[0]


def build_tables(market: MarketData, cfg: Config, device: torch.device | str = "cpu") -> MarketTables:
    """Features, returns and the EWMA risk tables of `market`, as float32 tensors on `device`."""
    dtype = torch.float32
    cov = kernels.ewma_covariance(torch.as_tensor(market.price_returns), cfg.risk.correlation_window)  # risk: prices
    sigma = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(1e-20).sqrt()
    corr = cov / (sigma.unsqueeze(-1) * sigma.unsqueeze(-2))
    iu = torch.triu_indices(market.num_instruments, market.num_instruments, offset=1)
    first_bar = max(FEATURE_WINDOW, cfg.environment.warmup_steps, 1)
    if market.num_bars < first_bar + 2:
        raise ValueError(
            f"market split '{market.split}' has {market.num_bars} bars; an episode needs at least "
            f"{first_bar + 2} (feature window {FEATURE_WINDOW} / warmup_steps plus two bars)"
        )

    def put(x):
        # contiguous: a strided table would make every per-step gather copy the whole table
        return None if x is None else torch.as_tensor(x).to(device=device, dtype=dtype).contiguous()

    # The observation parts that depend only on (bar, instrument) are laid out once, so a step
    # gathers them in one go instead of concatenating small pieces along the last dimension.
    n = market.num_instruments
    features = torch.as_tensor(compute_features(market.prices), dtype=torch.float64)
    onehot = torch.eye(n, dtype=torch.float64).expand(market.num_bars, n, n)
    vol = sigma * math.sqrt(market.bars_per_year)
    corr_ut = corr[:, iu[0], iu[1]]
    portfolio_static = torch.cat(
        [features[..., FEATURE_NAMES.index("ret_1")], features[..., FEATURE_NAMES.index("ret_20")], vol, corr_ut], -1
    )
    # zero state columns, as in instrument_static: rows of the observation's full width need no masked loads in a
    # compiled step (4,096 rows: the gather of 52-wide rows was about a tenth of the step)
    portfolio_static = torch.cat([portfolio_static, torch.zeros(market.num_bars, portfolio_state_size(n))], -1)
    return MarketTables(
        prices=put(market.prices),
        returns=put(market.returns),
        features=put(features),
        instrument_static=put(torch.cat([features, onehot, torch.zeros(market.num_bars, n, STATE_SIZE)], -1)),
        portfolio_static=put(portfolio_static.clamp(-OBS_CLIP, OBS_CLIP)),
        cov=put(cov),
        corr=put(correlation_from_covariance(cov)),  # per bar, not per row and step
        variance=put(sigma**2),
        vol=put(vol),
        corr_ut=put(corr_ut),
        regime=None if market.regime is None else torch.as_tensor(market.regime, device=device),
        drift=put(market.drift),
        first_bar=first_bar,
        bars_per_year=market.bars_per_year,
        bars_per_day=market.bars_per_day,
    )


def feasible_limits(cfg: Config, n_instruments: int, n_sectors: int, bars_per_day: float):
    """The configured limits for a universe of `n_instruments` in `n_sectors`; returns `(RiskLimits, notes)`.

    Every limit is reachable by scaling (DESIGN section 5), so none is ever relaxed; two are undefined
    in the smallest universes and not applied there (`kernels.risk.NOT_APPLIED`), each with a note:
    the sector limit with one sector (the whole book is that sector), the correlation exposure with
    one instrument (it is then the position's size relative to the cap, which the position cap bounds).
    """
    env = cfg.environment
    notes = []
    max_sector = env.max_sector_allocation
    if n_sectors == 1:
        max_sector = NOT_APPLIED
        notes.append("max_sector_allocation is not applied: the universe has one sector")
    max_corr = env.max_correlation_exposure
    if n_instruments == 1:
        max_corr = NOT_APPLIED
        notes.append("max_correlation_exposure is not applied: the universe has one instrument")
    z = normal_quantile(cfg.risk.var_confidence)
    limits = kernels.RiskLimits(
        max_position=env.max_position_size,
        max_var=env.max_portfolio_var,
        max_correlation=max_corr,
        max_sector=max_sector,
        var_scale=z * math.sqrt(bars_per_day),
    )
    return limits, notes


def cost_rates(market: MarketData, cfg: Config, device) -> torch.Tensor:
    """Cost per unit of turnover of each instrument [N]: its `cost` from the config (default
    `transaction_cost` x its `cost_multiplier`), times the market's multiplier (the curriculum's)."""
    rates = []
    for symbol in market.symbols:
        spec = cfg.instruments[symbol]
        rates.append(spec.cost if spec.cost is not None else cfg.environment.transaction_cost * spec.cost_multiplier)
    return torch.tensor(rates, dtype=torch.float32, device=device) * market.cost_multiplier
