"""Portfolio evaluation: backtests of the hierarchy and of rule-based baselines through `PortfolioEnv`.

Every evaluated policy, the system and each baseline alike, has the interface of `HierarchyPolicy`:
`propose(obs, env) -> proposed weights [B, N]` (signed fractions of equity, on the env's device) and
`observe(info, done)` after every step. All of them trade through the same `PortfolioEnv`, so the
stop-loss, the risk manager and the costs are identical: the comparison is fair by construction.

`run_backtest` runs one continuous backtest of the whole split (`segments=1`, the test evaluation), or,
for validation during training, cuts the split into `segments` consecutive pieces that run as parallel
rows (each piece starts flat, as `specialist_eval.evaluate_specialists` does) and stitches them in time
order. `evaluate_portfolio` runs the system, the equal allocation over the same frozen specialists
and every baseline on the same bars and builds the report of DESIGN section 9; `format_report`
prints it for a person.

Conventions of the report (all values plain JSON floats, ints and strings):
* returns are the account's (`info["net_return"]`: cash yield + trading - costs); Sharpe and Sortino
  are over the configured risk-free rate, so they measure the trading itself;
* per-instrument pnl `pnl[t, i] = w[t, i] * r[t+1, i] - cost_rate_i * |w[t, i] - h[t, i]|` (executed
  weights, the bar's return, that instrument's own cost on the trade from the holdings `h`, the last
  book drifted by the last bar); `net_return = rf / bars_per_year + sum_i pnl`.
  The win rate pools the trades of every instrument (`metrics.win_rate`); a trade that runs across a
  segment boundary counts as one trade (the stitched series stands for one unbroken run);
* VaR: the environment's VaR is one-day (`z * sqrt(w' Sigma_bar w * bars_per_day)`). Compliance
  compares it with `max_portfolio_var`; the VaR backtest (`var_breach_rate`) compares each bar's
  account loss with the ex-ante VaR scaled to one bar, `VaR / sqrt(bars_per_day)` (the same thing
  on daily bars), so about 1 - var_confidence of the bars should breach it for a well-sized model;
* `sharpe_before_costs` is the Sharpe ratio of `net_return + cost`; `turnover_per_vol` is the mean
  turnover per bar over the annual volatility (what a policy trades per unit of the risk it takes);
* the risk layer (`risk_layer_stats`): the share of bars on which each limit changed the book, the mean
  share of the proposed gross exposure kept, and the share of non-flat proposals executed flat (0 by
  construction, DESIGN section 5);
* per-regime metrics use the bars whose position was chosen in that regime (synthetic) or realised
  volatility tercile (CSV); the drawdown of such a non-contiguous subset is that of its bars
  concatenated in time order, not a drawdown the account actually went through.

Stop-loss and the rules: the env holds a stopped instrument flat while the policy keeps asking for
the stopped trade's sign, and a new trade opens once the policy asks for another sign (flat counts).
Every rule therefore asks for a flat position in an instrument on the bar after its stop and then
re-opens its trade: without this, the long-only rules (equal weight, buy-and-hold, risk parity)
would stay flat after their first 2% stop for the rest of a segment (measured before the change:
about 95% of instrument-bars flat in the first quarter of a 949-bar segment).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

from kernels import LIMIT_NAMES, NOT_APPLIED
from mtq_common import metrics
from mtq_common.baselines import (
    TrendFilter,
    fit_trend_filter,
    momentum_positions,
    oracle_positions,
    trend_filter_positions,
)
from mtq_common.config import Config
from mtq_common.envs import MarketTables, PortfolioEnv, build_tables, cost_rates
from mtq_common.hierarchy import HierarchyPolicy, instrument_specialist_index
from mtq_common.market import REGIME_NAMES, MarketData, iso_time
from mtq_common.specialist_eval import segment_starts

PORTFOLIO_KEYS = (
    "sharpe", "sortino", "calmar", "max_drawdown", "win_rate", "total_return", "annual_return",
    "annual_volatility", "var_compliance", "var_breach_rate", "turnover", "sharpe_before_costs", "turnover_per_vol",
)  # fmt: skip
"""Metrics reported for the system and for every baseline (DESIGN section 9, plus the annual return)."""
REGIME_KEYS = ("sharpe", "max_drawdown", "win_rate", "total_return", "annual_volatility")
VOL_TERCILES = ("low_vol", "mid_vol", "high_vol")
BASELINE_NAMES = ("equal_weight", "buy_and_hold", "risk_parity", "momentum", "trend_filter", "oracle")

TARGETS = {
    1: (("sharpe", ">", 1.5), ("max_drawdown", "<", 0.20), ("win_rate", ">", 0.55)),
    2: (("sharpe", ">", 1.8), ("max_drawdown", "<", 0.18), ("win_rate", ">", 0.60), ("var_compliance", ">", 0.95)),
    3: (("sharpe", ">", 2.0), ("max_drawdown", "<", 0.15), ("win_rate", ">", 0.65), ("var_compliance", ">", 0.98)),
    "final": (
        ("sharpe", ">", 2.0), ("max_drawdown", "<", 0.15), ("win_rate", ">", 0.60), ("var_compliance", ">=", 1.0),
    ),
}  # fmt: skip
"""DESIGN section 10, one column per phase ("final" is the last column; VaR compliance 100% is >= 1.0)."""
_COMPARE = {">": lambda v, x: v > x, "<": lambda v, x: v < x, ">=": lambda v, x: v >= x}


# ---------------------------------------------------------------------------------------------
# Rule-based baselines: the position tables of `mtq_common.baselines`, traded through the env
# ---------------------------------------------------------------------------------------------


def policy_step(policy, env: PortfolioEnv, obs: dict):
    """One bar of a policy in `env`: it proposes, the env trades, it observes; returns the env's step output.

    A policy with `own_positions` (the hierarchy: its specialists' positions) passes them to the env,
    so the specialists' observations and the stop-loss follow their own trades (`PortfolioEnv.step`)."""
    proposed = policy.propose(obs, env)
    out = env.step(proposed, getattr(policy, "own_positions", None))
    policy.observe(out[4], out[3])
    return out


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


# ---------------------------------------------------------------------------------------------
# Backtest: S parallel segments of PortfolioEnv, stitched in time order
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Backtest:
    """One policy's stitched backtest. Time is axis 0; entry k is the position chosen at bar `bars[k]`
    and held over bar `bars[k]` -> `bars[k] + 1`. Arrays are float64 unless said otherwise."""

    net_return: np.ndarray  # [T] account return (cash yield + trading - cost)
    cost: np.ndarray  # [T] transaction cost paid
    traded: np.ndarray  # [T] sum_i |w_i - h_i|: the trade from the drifted holdings
    weights: np.ndarray  # [T, N] executed weights (after stop-loss lock and risk manager)
    proposed: np.ndarray  # [T, N] the policy's proposal (after the stop-loss lock)
    pnl: np.ndarray  # [T, N] w * r - cost_rate * |w - w_held| per instrument (module docstring)
    var: np.ndarray  # [T] one-day ex-ante VaR of the executed book
    correlation_exposure: np.ndarray  # [T]
    sector_allocation: np.ndarray  # [T, K] shares of the largest book, in `sectors` order
    intervention: np.ndarray  # [T] the risk manager's relative move
    gross_kept: np.ndarray  # [T] executed / proposed gross exposure
    binding: np.ndarray  # [T, 4] bool: which limits changed the book (`kernels.LIMIT_NAMES`)
    bar_returns: np.ndarray  # [T, N] returns of bar bars[k] -> bars[k] + 1
    stop_loss: np.ndarray  # [T, N] 1.0 where a stop-loss closed the trade at the end of the bar
    realised_vol: np.ndarray  # [T] mean over instruments of the causal annualised volatility at the bar
    regime: np.ndarray | None  # [T] int64, synthetic only: regime at the bar the position was chosen
    allocation: np.ndarray | None  # [T, K'] the policy's `last_allocation`, if it has one
    bars: np.ndarray  # [T] int64 bar index at which each position was chosen
    timestamps: np.ndarray  # [T] the market's timestamps of `bars`
    symbols: list[str]
    sectors: list[str]  # sector of each column of `sector_allocation`
    instrument_sectors: list[str]  # sector of each instrument (column of `weights`)
    segment_length: int
    bars_per_year: float
    bars_per_day: float
    max_var: float  # the VaR limit in force (one-day)
    limits: dict  # every limit in force (`RiskLimits` as a dict; inf: not applied)
    limit_notes: list[str]  # limits not applied in a small universe, and why

    @property
    def equity(self) -> np.ndarray:
        """Equity after each bar from 1.0 (the stitched series compounded)."""
        return metrics.equity_curve(self.net_return)


class _RowsView:
    """What a policy may read of the env, restricted to its own rows (several policies share one env)."""

    def __init__(self, env: PortfolioEnv, rows: slice):
        self.env, self.rows = env, rows
        self.num_envs, self.n = rows.stop - rows.start, env.n

    @property
    def bar(self) -> torch.Tensor:
        return self.env.bar[self.rows]

    @property
    def holdings(self) -> torch.Tensor:
        return self.env.holdings[self.rows]

    def now(self, name: str) -> torch.Tensor:
        return self.env.now(name)[self.rows]


def _rows_of(x, rows: slice):
    """`x` (a tensor, or a dict of them, nested) restricted to `rows`."""
    if isinstance(x, dict):
        return {k: _rows_of(v, rows) for k, v in x.items()}
    return x[rows] if isinstance(x, torch.Tensor) and x.ndim > 0 else x


@torch.no_grad()
def run_backtests(
    market: MarketData,
    cfg: Config,
    make_policies: dict[str, Callable[[int], object]],
    segments: int = 8,
    device: str | torch.device = "cpu",
    tables: MarketTables | None = None,
) -> dict[str, Backtest]:
    """Backtest every `make_policies[name](num_rows)` over the whole split through one `PortfolioEnv`.

    The tradable bars are cut by `specialist_eval.segment_starts` into S equal consecutive pieces, all
    starting flat (`segments=1`: one continuous backtest of the whole split). Every policy gets S rows
    of the same env (policy-major), so P policies step together, bar by bar: each proposes for its rows
    (seeing only them, through `_RowsView`), the env steps once, and each observes its rows (`done` = the
    env's truncation, true for every row on the last bar only). A rule's own positions are its proposal
    over `max_position`, as the env assumes for a single policy.
    """
    tables = tables or build_tables(market, cfg, device)
    device = tables.prices.device
    starts, length = segment_starts(tables, segments)
    names = list(make_policies)
    p, s, n = len(names), len(starts), market.num_instruments
    eval_cfg = dataclasses.replace(cfg, environment=dataclasses.replace(cfg.environment, episode_length=length))
    env = PortfolioEnv(market, eval_cfg, p * s, device=device, torch_mode=True, tables=tables)
    env.reset(seed=0)
    obs = env.start_at(torch.tensor(starts, device=device).repeat(p))
    rows = [slice(j * s, (j + 1) * s) for j in range(p)]
    views = [_RowsView(env, r) for r in rows]
    policies = [make_policies[name](s) for name in names]
    size = cfg.environment.max_position_size

    k_sectors = len(env.sectors)
    store = {
        "net_return": torch.zeros(length, p * s, device=device),
        "cost": torch.zeros(length, p * s, device=device),
        "traded": torch.zeros(length, p * s, device=device),
        "weights": torch.zeros(length, p * s, n, device=device),
        "proposed": torch.zeros(length, p * s, n, device=device),
        "pnl": torch.zeros(length, p * s, n, device=device),
        "var": torch.zeros(length, p * s, device=device),
        "correlation_exposure": torch.zeros(length, p * s, device=device),
        "sector_allocation": torch.zeros(length, p * s, k_sectors, device=device),
        "intervention": torch.zeros(length, p * s, device=device),
        "gross_kept": torch.zeros(length, p * s, device=device),
        "binding": torch.zeros(length, p * s, len(LIMIT_NAMES), device=device),
        "bar_returns": torch.zeros(length, p * s, n, device=device),
        "stop_loss": torch.zeros(length, p * s, n, device=device),
        "bars": torch.zeros(length, p * s, dtype=torch.long, device=device),
    }
    allocations: dict[int, torch.Tensor] = {}
    for k in range(length):
        bar, held = env.bar, env.holdings
        proposed, own = [], []
        for j, policy in enumerate(policies):
            proposed.append(policy.propose(_rows_of(obs, rows[j]), views[j]))
            own.append(getattr(policy, "own_positions", (proposed[-1] / size).clamp(-1.0, 1.0)))
        obs, _, _, truncated, info = env.step(torch.cat(proposed), torch.cat(own))
        for j, policy in enumerate(policies):
            policy.observe(_rows_of(info, rows[j]), truncated[rows[j]])
            last = getattr(policy, "last_allocation", None)
            if last is not None:
                allocations.setdefault(j, torch.zeros(length, s, last.shape[-1], device=device))[k] = last
        w = info["executed_weights"]
        store["bars"][k] = bar
        store["proposed"][k] = info["proposed_weights"]
        store["weights"][k] = w
        store["pnl"][k] = w * info["bar_returns"] - env.cost_rate * (w - held).abs()
        store["traded"][k] = (w - held).abs().sum(-1)
        store["stop_loss"][k] = info["stop_loss"].float()
        store["binding"][k] = info["binding"].float()
        for key in ("net_return", "cost", "var", "correlation_exposure", "sector_allocation", "intervention",
                    "gross_kept", "bar_returns"):  # fmt: skip
            store[key][k] = info[key]

    def stitch(x: torch.Tensor, dtype=np.float64) -> np.ndarray:
        # [length, S, ...] -> [S * length, ...]: piece j covers bars starts[j] .. starts[j] + length - 1
        return x.transpose(0, 1).reshape(s * length, *x.shape[2:]).cpu().numpy().astype(dtype)

    out = {}
    for j, name in enumerate(names):
        mine = {key: value[:, rows[j]] for key, value in store.items()}
        bars = stitch(mine["bars"], np.int64)
        vol = tables.vol.index_select(0, torch.as_tensor(bars, device=device)).mean(-1).cpu().double().numpy()
        out[name] = Backtest(
            **{key: stitch(value) for key, value in mine.items() if key not in ("bars", "binding")},
            binding=stitch(mine["binding"]).astype(bool),
            realised_vol=vol,
            regime=None if tables.regime is None else tables.regime.cpu().numpy().astype(np.int64)[bars],
            allocation=stitch(allocations[j]) if j in allocations else None,
            bars=bars,
            timestamps=np.asarray(market.timestamps)[bars],
            symbols=list(market.symbols),
            sectors=list(env.sectors),
            instrument_sectors=list(market.sectors),
            segment_length=length,
            bars_per_year=float(tables.bars_per_year),
            bars_per_day=float(tables.bars_per_day),
            max_var=float(env.limits.max_var),
            limits=dataclasses.asdict(env.limits),
            limit_notes=list(env.limit_notes),
        )
    return out


def run_backtest(market: MarketData, cfg: Config, make_policy: Callable[[int], object], segments: int = 8,
                 device: str | torch.device = "cpu", tables: MarketTables | None = None) -> Backtest:  # fmt: skip
    """One policy's backtest (`run_backtests` with a single policy)."""
    return run_backtests(market, cfg, {"policy": make_policy}, segments, device, tables)["policy"]


# ---------------------------------------------------------------------------------------------
# Metrics of a backtest
# ---------------------------------------------------------------------------------------------


def backtest_metrics(bt: Backtest, risk_free_rate: float) -> dict[str, float]:
    """`PORTFOLIO_KEYS` of one backtest (`metrics.summarize` with weights, per-instrument pnl and VaR).

    Turnover is what was traded, `sum_i |w_i - h_i|` per bar (from the drifted holdings h), averaged
    over bars. The VaR backtest compares each bar's account loss with the one-day VaR over
    sqrt(bars_per_day), the VaR of one bar; compliance (the same scaling on both sides) is one-day
    VaR <= max_var.
    """
    per_bar = 1.0 / math.sqrt(bt.bars_per_day)
    summary = metrics.summarize(
        bt.net_return,
        bt.bars_per_year,
        risk_free_rate,
        pnl=bt.pnl,
        weights=bt.weights,
        var=bt.var * per_bar,
        var_limit=bt.max_var * per_bar,
    )
    summary["turnover"] = float(bt.traded.mean()) if len(bt.traded) else 0.0
    summary["sharpe_before_costs"] = metrics.sharpe(bt.net_return + bt.cost, bt.bars_per_year, risk_free_rate)
    vol = summary["annual_volatility"]
    summary["turnover_per_vol"] = summary["turnover"] / vol if vol > 0 else 0.0
    return {key: summary[key] for key in PORTFOLIO_KEYS}


def risk_layer_stats(bt: Backtest) -> dict:
    """What the risk manager did to a policy's proposals (DESIGN section 5), over the bars whose
    proposal was not flat: the share of those bars on which each limit changed the book, the mean
    share of the proposed gross exposure kept, and the share executed flat (0 by construction)."""
    active = np.abs(bt.proposed).sum(-1) > 0
    if not active.any():
        return {"binding": dict.fromkeys(LIMIT_NAMES, 0.0), "gross_kept": 1.0, "flat_books": 0.0, "bars": 0}
    flat = (bt.weights[active] == 0).all(-1)
    return {
        "binding": {name: float(bt.binding[active, k].mean()) for k, name in enumerate(LIMIT_NAMES)},
        "gross_kept": float(bt.gross_kept[active].mean()),
        "flat_books": float(flat.mean()),
        "bars": int(active.sum()),
    }


def _subset_metrics(bt: Backtest, mask: np.ndarray, risk_free_rate: float) -> dict:
    """REGIME_KEYS over the bars in `mask`, concatenated in time order, plus the bar count."""
    summary = metrics.summarize(
        bt.net_return[mask], bt.bars_per_year, risk_free_rate, pnl=bt.pnl[mask], weights=bt.weights[mask]
    )
    return {**{key: summary[key] for key in REGIME_KEYS}, "bars": int(mask.sum())}


def per_regime_metrics(bt: Backtest, risk_free_rate: float) -> dict[str, dict]:
    """Metrics by market state: the synthetic regime of the bar the position was chosen at
    (`calm, volatile, crisis`), or without regimes (CSV) terciles of the realised volatility
    (`low_vol, mid_vol, high_vol`: mean over instruments of the causal EWMA volatility at that bar).

    Each subset's drawdown is that of its bars concatenated in time order (see the module docstring).
    """
    if bt.regime is not None:
        return {name: _subset_metrics(bt, bt.regime == k, risk_free_rate) for k, name in enumerate(REGIME_NAMES)}
    vol = bt.realised_vol
    low, high = np.quantile(vol, [1 / 3, 2 / 3]) if len(vol) else (0.0, 0.0)
    masks = (vol <= low, (vol > low) & (vol <= high), vol > high)
    return {name: _subset_metrics(bt, mask, risk_free_rate) for name, mask in zip(VOL_TERCILES, masks, strict=True)}


def specialist_utilization(bt: Backtest, specialists: list[str]) -> dict[str, float]:
    """Each specialist's average share of gross exposure, plus `entropy` (normalised; 1 = even use).

    A bar's share of specialist k is `sum_{i of k} |w_i| / sum_i |w_i|`; the average is over the bars
    with a non-flat book (a flat bar has no shares). The entropy of the average shares is normalised by
    log of the number of specialists that own an instrument (0 with one such specialist or no exposure).
    """
    owner = np.array([specialists.index(s) for s in bt.instrument_sectors])
    onehot = np.eye(len(specialists))[owner]  # [N, K]
    exposure = np.abs(bt.weights) @ onehot  # [T, K]
    gross = exposure.sum(-1)
    held = gross > 0
    shares = (exposure[held] / gross[held, None]).mean(0) if held.any() else np.zeros(len(specialists))
    active = len(set(owner.tolist()))
    positive = shares[shares > 0]
    entropy = float(-(positive * np.log(positive)).sum() / math.log(active)) if active > 1 else 0.0
    out = {name: float(shares[k]) for k, name in enumerate(specialists)}
    out["entropy"] = max(0.0, min(1.0, entropy))  # rounding can leave -0.0 or 1 + eps
    return out


def mean_allocation(bt: Backtest, specialists: list[str]) -> dict[str, float]:
    """The allocation the hierarchy held, averaged over the bars (equal when it has no meta-controller)."""
    if bt.allocation is None or not len(bt.allocation):
        return {name: 1.0 / len(specialists) for name in specialists}
    return {name: float(share) for name, share in zip(specialists, bt.allocation.mean(0), strict=True)}


def target_checks(portfolio: dict, phase: int | str = 2) -> list[dict]:
    """The phase's column of DESIGN section 10: `{metric, target, threshold, op, value, pass}` per row."""
    if phase not in TARGETS:
        raise ValueError(f"phase must be one of {list(TARGETS)}, got {phase!r}")
    rows = []
    for metric, op, threshold in TARGETS[phase]:
        value = float(portfolio[metric])
        rows.append(
            {
                "metric": metric,
                "target": f"{op} {threshold:g}",
                "threshold": float(threshold),
                "op": op,
                "value": value,
                "pass": bool(_COMPARE[op](value, threshold)),
            }
        )
    return rows


CONFIDENCE = 0.9
BOOTSTRAP_SAMPLES = 2000


def confidence_stats(backtests: dict[str, Backtest], risk_free_rate: float, seed: int = 0) -> dict:
    """How much of each Sharpe ratio is luck (`mtq_common.statistics`), from the policies' return series:

    * `sharpe`: per policy, the Sharpe ratio with a 90% stationary-bootstrap interval;
    * `vs_system`: per reference, the paired difference `Sharpe(system) - Sharpe(reference)` (the same
      resampled bars for both, so the market they share cancels), its 90% interval and `win_share`, the
      share of bootstrap samples in which the system's Sharpe is higher;
    * `psr`: the probabilistic Sharpe ratio of the system against 0 (Bailey and Lopez de Prado).

    Seeded; the mean block length is `statistics.default_block_length` of the series (T^(1/3) bars)."""
    from mtq_common import statistics

    system = backtests["system"]
    bars_per_year = system.bars_per_year
    common = dict(bars_per_year=bars_per_year, risk_free_rate=risk_free_rate, confidence=CONFIDENCE,
                  num_samples=BOOTSTRAP_SAMPLES, seed=seed)  # fmt: skip
    keep = ("sharpe", "low", "high")
    out = {
        "confidence": CONFIDENCE,
        "samples": BOOTSTRAP_SAMPLES,
        "block": statistics.default_block_length(len(system.net_return)),
        "sharpe": {
            name: {k: v for k, v in statistics.sharpe_interval(bt.net_return, **common).items() if k in keep}
            for name, bt in backtests.items()
        },
        "vs_system": {},
        "psr": statistics.probabilistic_sharpe_ratio(
            system.net_return, 0.0, bars_per_year=bars_per_year, risk_free_rate=risk_free_rate
        ),  # fmt: skip
    }
    for name, bt in backtests.items():
        if name != "system":
            diff = statistics.paired_sharpe_difference(system.net_return, bt.net_return, **common)
            out["vs_system"][name] = {k: diff[k] for k in ("difference", "low", "high", "win_share")}
    return out


def relative_targets(report: dict) -> list[dict]:
    """DESIGN section 14's targets against the rules on the same bars, `{metric, target, value, pass}` each:
    Sharpe at least 1.1x momentum's, above the equal allocation's and above trend_filter's, and turnover
    per unit of volatility no higher than momentum's. (The seed's absolute table is `target_checks`.)"""
    system, base = report["portfolio"], report["baselines"]
    rows = [
        ("sharpe", ">=", "1.1 x momentum", 1.1 * base["momentum"]["sharpe"]),
        ("sharpe", ">", "equal_allocation", report["equal_allocation"]["sharpe"]),
        ("sharpe", ">", "trend_filter", base["trend_filter"]["sharpe"]),
        ("turnover_per_vol", "<=", "momentum", base["momentum"]["turnover_per_vol"]),
    ]
    compare = {">=": lambda v, x: v >= x, ">": lambda v, x: v > x, "<=": lambda v, x: v <= x}
    return [
        {"metric": metric, "target": f"{op} {name}", "threshold": float(threshold), "value": float(system[metric]),
         "pass": bool(compare[op](system[metric], threshold))}
        for metric, op, name, threshold in rows
    ]  # fmt: skip


def _json_ready(x):
    """Plain Python types (NaN stays NaN here; `checkpoint.atomic_write_json` writes it as null)."""
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x)
    return x


# ---------------------------------------------------------------------------------------------
# The evaluation report
# ---------------------------------------------------------------------------------------------


def evaluate_portfolio(
    specialists,
    meta,
    market: MarketData,
    cfg: Config,
    trend: TrendFilter,
    device: str | torch.device = "cpu",
    segments: int = 16,
    tables: MarketTables | None = None,
    phase: int | str = 2,
    reference_cache: dict | None = None,
    specialists_frozen: bool = False,
    confidence: bool = False,
) -> tuple[dict, dict[str, Backtest]]:
    """The report of DESIGN section 9 for the hierarchy (`specialists` + `meta`) on `market`.

    Runs, on the same bars: the system, the equal allocation over the same frozen specialists
    (`HierarchyPolicy(meta=None)`) and every baseline (`trend`: the trend filter's parameters, picked on
    the training split by `fit_trend_for`). `segments=1` is one continuous backtest of the whole split
    (the test evaluation); more segments run in parallel (validation). Returns `(report, backtests)` with
    the backtests keyed "system", "equal_allocation" and by baseline name (for plots). `meta=None` makes
    the system the equal allocation itself (allocation efficiency 0). `phase` picks the column of
    targets: 1, 2, 3 or "final".

    The baselines depend on neither level of the hierarchy: pass the same dict as `reference_cache`
    to repeated evaluations on the same market (a training run's validations) and they are computed
    once. The equal allocation depends on the specialists only: with `specialists_frozen=True`
    (Phase 2) it is cached there too. `confidence=True` adds bootstrap intervals (`confidence_stats`).
    """
    tables = tables or build_tables(market, cfg, device)
    rf = cfg.reward.risk_free_rate
    owner = instrument_specialist_index(market.sectors, specialists.names).to(tables.prices.device)
    size = cfg.environment.max_position_size

    def hierarchy(meta_controller):
        return lambda rows: HierarchyPolicy(specialists, meta_controller, owner, size, rows, tables.prices.device)

    def baseline(name):
        return lambda rows: baseline_policies(market, cfg, trend, tables.prices.device)[name]

    references = reference_cache if reference_cache is not None else {}
    makers = {"system": hierarchy(meta)}
    # unless frozen, the specialists may have changed since the last call (Phase 3): not cached
    if not (specialists_frozen and "equal_allocation" in references):
        makers["equal_allocation"] = hierarchy(None)
    if not references:
        makers.update({name: baseline(name) for name in baseline_policies(market, cfg, trend, tables.prices.device)})
    ran = run_backtests(market, cfg, makers, segments, device, tables)  # every policy in one env, bar by bar
    for name, bt in ran.items():
        if name in BASELINE_NAMES or (name == "equal_allocation" and specialists_frozen):
            references[name] = bt
    backtests = {
        "system": ran["system"],
        "equal_allocation": ran.get("equal_allocation", references.get("equal_allocation")),
        **{name: bt for name, bt in references.items() if name != "equal_allocation"},
    }

    end = np.asarray(market.timestamps)[backtests["system"].bars[-1] + 1]  # the last bar whose return is in
    data = {"source": market.source, "split": market.split, "end": iso_time(end, market.bars_per_day)}
    report = report_from_backtests(backtests, list(specialists.names), rf, phase, data, confidence)
    report["trend_filter"] = dataclasses.asdict(trend)
    return _json_ready(report), backtests


def report_from_backtests(backtests: dict[str, Backtest], specialists: list[str], risk_free_rate: float,
                          phase: int | str, data: dict, confidence: bool = False) -> dict:  # fmt: skip
    """The report of DESIGN section 9 from finished backtests ("system", "equal_allocation" and the
    baselines): `evaluate_portfolio`'s, and the walk-forward's over its stitched test blocks. `data` gives
    at least the source, the split and the end date; the rest is read from the system's backtest."""
    rf = risk_free_rate
    system = backtests["system"]
    portfolio = backtest_metrics(system, rf)
    equal_allocation = backtest_metrics(backtests["equal_allocation"], rf)
    limits = {k: (None if v == NOT_APPLIED else v) for k, v in system.limits.items()}  # None: not applied
    report = {
        "portfolio": portfolio,
        "equal_allocation": equal_allocation,
        "baselines": {name: backtest_metrics(bt, rf) for name, bt in backtests.items() if name in BASELINE_NAMES},
        "allocation_efficiency": portfolio["sharpe"] - equal_allocation["sharpe"],
        "specialist_utilization": specialist_utilization(system, specialists),
        "mean_allocation": mean_allocation(system, specialists),
        "per_regime": per_regime_metrics(system, rf),
        "risk_layer": {name: risk_layer_stats(bt) for name, bt in backtests.items()},
        "phase": phase,
        "targets": target_checks(portfolio, phase),
        "limits": {**limits, "notes": system.limit_notes},
        "data": {
            "start": iso_time(system.timestamps[0], system.bars_per_day),
            **data,
            "bars": len(system.net_return),
            "instruments": list(system.symbols),
            "segments": len(system.net_return) // system.segment_length,
            "bars_per_year": float(system.bars_per_year),
        },
    }
    report["relative_targets"] = relative_targets(report)
    if confidence:
        report["confidence"] = confidence_stats(backtests, rf)
    return report


def stitch_backtests(parts: list[Backtest]) -> Backtest:
    """Consecutive backtests (the walk-forward's test blocks, each one continuous run from flat) joined in
    time order: one out-of-sample series. `bars` become positions in the joined series; the timestamps,
    returns and everything else are the parts' own, concatenated."""
    first = parts[0]
    joined = {}
    for f in dataclasses.fields(Backtest):
        values = [getattr(p, f.name) for p in parts]
        if isinstance(values[0], np.ndarray):
            joined[f.name] = np.concatenate(values)
        elif f.name in ("regime", "allocation"):
            joined[f.name] = None if any(v is None for v in values) else np.concatenate(values)
        else:
            joined[f.name] = getattr(first, f.name)
    joined["bars"] = np.arange(len(joined["net_return"]))
    joined["segment_length"] = min(p.segment_length for p in parts)
    return Backtest(**joined)


# ---------------------------------------------------------------------------------------------
# Plain-text report
# ---------------------------------------------------------------------------------------------

_COLUMNS = (
    ("sharpe", "sharpe", "{:+.2f}"),
    ("sharpe_before_costs", "pre-cost", "{:+.2f}"),
    ("sortino", "sortino", "{:+.2f}"),
    ("calmar", "calmar", "{:+.2f}"),
    ("max_drawdown", "max_dd", "{:.1%}"),
    ("win_rate", "win", "{:.1%}"),
    ("total_return", "return", "{:+.1%}"),
    ("annual_volatility", "ann_vol", "{:.1%}"),
    ("var_compliance", "var_ok", "{:.1%}"),
    ("var_breach_rate", "var_brch", "{:.1%}"),
    ("turnover", "turnover", "{:.4f}"),
    ("turnover_per_vol", "turn/vol", "{:.2f}"),
)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def cells(line):  # the first column left-aligned (names), the rest right-aligned (numbers)
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        return "  ".join(padded)

    lines = [cells([str(c) for c in line]) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """`evaluate_portfolio`'s report as plain-text tables: system vs baselines, allocation efficiency,
    specialist utilisation, per-regime metrics, targets (PASS/FAIL), limits and data."""
    data = report["data"]
    out = [
        f"Portfolio evaluation: {data['source']} {data['split']} split, {data['start']} .. {data['end']}, "
        f"{data['bars']} bars, {len(data['instruments'])} instruments ({', '.join(data['instruments'])})",
        "",
    ]
    policies = {"system": report["portfolio"]}
    if "equal_allocation" in report:
        policies["equal_allocation"] = report["equal_allocation"]
    policies.update(report["baselines"])
    rows = [[name] + [fmt.format(m.get(key, 0.0)) for key, _, fmt in _COLUMNS] for name, m in policies.items()]
    out += [_table(["policy"] + [label for _, label, _ in _COLUMNS], rows), ""]

    out.append(
        f"Allocation efficiency (Sharpe with the meta-controller - with the equal allocation): "
        f"{report['allocation_efficiency']:+.3f}"
    )
    util = report["specialist_utilization"]
    shares = "  ".join(f"{k} {v:.1%}" for k, v in util.items() if k != "entropy")
    out += [f"Specialist utilisation (share of gross exposure): {shares}  entropy {util['entropy']:.3f}", ""]

    regime_rows = [
        [name, str(m["bars"]), f"{m['sharpe']:+.2f}", f"{m['max_drawdown']:.1%}", f"{m['win_rate']:.1%}",
         f"{m['total_return']:+.1%}", f"{m['annual_volatility']:.1%}"]
        for name, m in report["per_regime"].items()
    ]  # fmt: skip
    header = ["regime", "bars", "sharpe", "max_dd", "win", "return", "ann_vol"]
    out += ["Per regime (drawdown of each subset's bars concatenated):", _table(header, regime_rows), ""]

    target_rows = [
        [t["metric"], t["target"], f"{t['value']:.4g}", "PASS" if t["pass"] else "FAIL"] for t in report["targets"]
    ]
    phase = report.get("phase", "")
    out += [f"Targets (phase {phase}):", _table(["metric", "target", "value", "result"], target_rows), ""]
    if "confidence" in report:
        conf = report["confidence"]
        level = f"{conf['confidence']:.0%}"
        rows = [
            [
                r["policy"],
                f"{r['sharpe']} {r['interval']}",
                f"{r['difference']} {r['difference_interval']}  {r['wins']}",
            ]
            for r in confidence_rows(conf)
        ]
        header = ["policy", f"sharpe [{level} interval]", f"system - policy [{level}]  system wins"]
        title = (
            f"Bootstrap ({conf['samples']} stationary-bootstrap samples, mean block {conf['block']} bars); "
            f"probabilistic Sharpe ratio of the system vs 0: {conf['psr']:.3f}"
        )
        out += [title, _table(header, rows), ""]
    if report.get("relative_targets"):
        rows = [[t["metric"], t["target"], f"{t['threshold']:.4g}", f"{t['value']:.4g}", "PASS" if t["pass"] else
                 "FAIL"] for t in report["relative_targets"]]  # fmt: skip
        out += ["Targets against the rules on the same bars (DESIGN 14):",
                _table(["metric", "target", "threshold", "value", "result"], rows), ""]  # fmt: skip

    if "risk_layer" in report:
        names = list(policies)
        risk_rows = [
            [name]
            + [f"{r['binding'][k]:.1%}" for k in LIMIT_NAMES]
            + [f"{r['gross_kept']:.1%}", f"{r['flat_books']:.1%}"]
            for name, r in ((n, report["risk_layer"][n]) for n in names if n in report["risk_layer"])
        ]
        header = ["policy", *(f"{k} binds" for k in LIMIT_NAMES), "gross kept", "flat books"]
        out += ["Risk layer (share of bars with a non-flat proposal):", _table(header, risk_rows), ""]

    lim = report["limits"]
    out.append(
        f"Limits: position <= {lim['max_position']:g}, one-day VaR <= {lim['max_var']:g}, "
        f"correlation exposure <= {limit_text(lim['max_correlation'])}, sector <= {limit_text(lim['max_sector'])}"
    )
    out += [f"  {note}" for note in lim.get("notes", [])]
    if "trend_filter" in report:
        tf = report["trend_filter"]
        out.append(f"trend_filter: half-life {tf['half_life']} bars, band {tf['band']:g} (picked on the "
                   f"{tf['fitted_on']} split)")  # fmt: skip
    return "\n".join(out)


def confidence_rows(conf: dict) -> list[dict[str, str]]:
    """The report's `confidence` as printable cells, one row per policy (the system's own row has no
    difference): what the plain-text and the Markdown reports both show."""
    rows = []
    for name, s in conf["sharpe"].items():
        paired = conf["vs_system"].get(name)
        row = {"policy": name, "sharpe": f"{s['sharpe']:+.2f}", "interval": f"[{s['low']:+.2f}, {s['high']:+.2f}]",
               "difference": "", "difference_interval": "", "wins": ""}  # fmt: skip
        if paired is not None:
            row.update(difference=f"{paired['difference']:+.2f}", wins=f"{paired['win_share']:.0%}",
                       difference_interval=f"[{paired['low']:+.2f}, {paired['high']:+.2f}]")  # fmt: skip
        rows.append(row)
    return rows


def limit_text(value) -> str:
    """A limit as printed: its value, or "not applied" (None in the report, `NOT_APPLIED` in the kernel)."""
    return "not applied" if value is None or value == NOT_APPLIED else f"{value:g}"


# ---------------------------------------------------------------------------------------------
# Repeated evaluation episodes: mean and spread of each metric
# ---------------------------------------------------------------------------------------------

EPISODE_METRICS = ("sharpe", "sortino", "max_drawdown", "win_rate", "total_return", "annual_volatility", "turnover")


@torch.no_grad()
def run_episodes(
    market: MarketData,
    cfg: Config,
    make_policy,
    episodes: int,
    length: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    tables: MarketTables | None = None,
    consecutive: bool = False,
) -> list[dict]:
    """Metrics of `episodes` episodes of `length` bars (default `episode_length`, at most what the
    split allows), all run at once as rows of one env, each starting flat.

    Start bars are drawn with `seed` (windows may overlap), or with `consecutive=True` laid end to end
    from the first tradable bar (non-overlapping: `market` must be long enough). On a synthetic
    market pass a fresh path (a seed no split uses); on CSV data the episodes are windows of the split.
    """
    tables = tables or build_tables(market, cfg, device)
    available = tables.num_bars - 1 - tables.first_bar
    length = max(2, min(length or cfg.environment.episode_length, available))
    env_cfg = dataclasses.replace(cfg, environment=dataclasses.replace(cfg.environment, episode_length=length))
    env = PortfolioEnv(market, env_cfg, episodes, device=device, seed=seed, torch_mode=True, tables=tables)
    high = tables.num_bars - 1 - length  # the last start that leaves `length` bars
    if consecutive:
        starts = tables.first_bar + length * torch.arange(episodes)
        if int(starts[-1]) > high:
            raise ValueError(f"{episodes} consecutive episodes of {length} bars need {int(starts[-1]) + length + 1} "
                             f"bars; the market has {tables.num_bars}")  # fmt: skip
    else:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(tables.first_bar, max(high, tables.first_bar) + 1, (episodes,), generator=generator)
    env.reset(seed=seed)
    obs = env.start_at(starts.to(device))
    policy = make_policy(episodes)
    net = torch.zeros(length, episodes, device=device)
    weights = torch.zeros(length, episodes, env.n, device=device)
    pnl = torch.zeros_like(weights)
    for k in range(length):
        held = env.holdings
        obs, _, _, truncated, info = policy_step(policy, env, obs)
        w = info["executed_weights"]
        net[k], weights[k] = info["net_return"], w
        pnl[k] = w * info["bar_returns"] - env.cost_rate * (w - held).abs()
    net, weights, pnl = (x.double().cpu().numpy() for x in (net, weights, pnl))
    rf = cfg.reward.risk_free_rate
    out = []
    for e in range(episodes):  # evaluation only: a loop over finished episodes
        summary = metrics.summarize(net[:, e], tables.bars_per_year, rf, positions=weights[:, e], pnl=pnl[:, e],
                                    weights=weights[:, e])  # fmt: skip
        out.append({key: summary[key] for key in EPISODE_METRICS})
    return out


def summarize_episodes(results: list[dict]) -> dict[str, dict[str, float]]:
    """`{metric: {mean, std, min, max}}` over episodes (std with ddof=1; 0 for a single episode)."""
    summary = {}
    for key in results[0]:
        values = np.array([r[key] for r in results], dtype=np.float64)
        summary[key] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()),
            "max": float(values.max()),
        }
    return _json_ready(summary)
