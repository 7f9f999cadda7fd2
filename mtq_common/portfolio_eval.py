"""Portfolio evaluation: backtests of the hierarchy and of rule-based baselines through `PortfolioEnv`.

Every evaluated policy, the system and each baseline alike, has the interface of `HierarchyPolicy`:
`propose(obs, env) -> proposed weights [B, N]` (signed fractions of equity, on the env's device) and
`observe(info, done)` after every step. All of them trade through the same `PortfolioEnv`, so the
stop-loss, the risk manager and the costs are identical: the comparison is fair by construction.

`run_backtest` cuts the split into `segments` consecutive pieces that run as parallel rows (each
piece starts flat, exactly as `evaluation.evaluate_specialists` does) and stitches them in time
order. `evaluate_portfolio` runs the system, the equal allocation over the same frozen specialists
and every baseline on the same bars and builds the report of DESIGN section 9; `format_report`
prints it for a person.

Conventions of the report (all values plain JSON floats, ints and strings):
* returns are the account's (`info["net_return"]`: cash yield + trading - costs); Sharpe and Sortino
  are over the configured risk-free rate, so they measure the trading itself;
* per-instrument pnl `pnl[t, i] = w[t, i] * r[t+1, i] - cost_rate_i * |w[t, i] - w[t-1, i]|` (executed
  weights, the bar's return, that instrument's own cost); `net_return = rf / bars_per_year + sum_i pnl`.
  The win rate pools the trades of every instrument (`metrics.win_rate`); a trade that runs across a
  segment boundary counts as one trade (the stitched series stands for one unbroken run);
* VaR: the environment's VaR is one-day (`z * sqrt(w' Sigma_bar w * bars_per_day)`). Compliance
  compares it with `max_portfolio_var`; the VaR backtest (`var_breach_rate`) compares each bar's
  account loss with the ex-ante VaR scaled to one bar, `VaR / sqrt(bars_per_day)` (the same thing
  on daily bars), so about 1 - var_confidence of the bars should breach it for a well-sized model;
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

import abc
import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

from mtq_common import metrics
from mtq_common.baselines import MOMENTUM_LOOKBACK
from mtq_common.config import Config
from mtq_common.envs import MarketTables, PortfolioEnv, build_tables
from mtq_common.evaluation import segment_starts
from mtq_common.hierarchy import HierarchyPolicy, instrument_specialist_index
from mtq_common.market import REGIME_NAMES, MarketData

PORTFOLIO_KEYS = (
    "sharpe", "sortino", "calmar", "max_drawdown", "win_rate", "total_return", "annual_return",
    "annual_volatility", "var_compliance", "var_breach_rate", "turnover",
)  # fmt: skip
"""Metrics reported for the system and for every baseline (DESIGN section 9, plus the annual return)."""
REGIME_KEYS = ("sharpe", "max_drawdown", "win_rate", "total_return", "annual_volatility")
VOL_TERCILES = ("low_vol", "mid_vol", "high_vol")
BASELINE_NAMES = ("equal_weight", "buy_and_hold", "risk_parity", "momentum", "oracle")

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
# Rule-based baselines: causal reads of env.engine.tables at env.engine.t
# ---------------------------------------------------------------------------------------------


class _RulePolicy(abc.ABC):
    """A rule that needs nothing but the market tables; sizes are in units of `max_position`."""

    def __init__(self, max_position: float, num_rows: int, device):
        self.max_position = max_position
        self.num_rows = num_rows
        self.device = torch.device(device)

        self.stopped: torch.Tensor | None = None  # [B, N] instruments stopped out on the last bar

    def propose(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        """The rule's weights, flat for one bar where a stop-loss just closed the trade (to re-open it)."""
        weights = self.target(obs, env)
        if self.stopped is None:
            return weights
        return torch.where(self.stopped, 0.0, weights)

    @abc.abstractmethod
    def target(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        """The rule's proposed weights [B, N] at the env's current bar (each rule defines it)."""

    def observe(self, info: dict, done: torch.Tensor) -> None:
        self.stopped = info["stop_loss"] & ~done.unsqueeze(-1)  # a new episode starts unlocked anyway


class EqualWeightPolicy(_RulePolicy):
    """Long every instrument at `max_position`, rebalanced every bar."""

    def target(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        return torch.full((env.num_envs, env.n), self.max_position, device=env.engine.device)


class BuyAndHoldPolicy(_RulePolicy):
    """Long every instrument at `max_position` at the row's first bar, never rebalanced.

    The weights drift with prices: `w_i = m g_i / (1 + sum_j m (g_j - 1))`, `g_i = P_i,t / P_i,start`
    (the value of each holding over the account's equity, costs and cash yield aside). A row's start
    prices are taken at its first `propose` after construction or after a `done`.
    """

    def __init__(self, max_position: float, num_rows: int, device):
        super().__init__(max_position, num_rows, device)
        self.fresh = torch.ones(num_rows, dtype=torch.bool, device=self.device)
        self.start_prices: torch.Tensor | None = None

    def target(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        prices = env.engine.tables.prices.index_select(0, env.engine.t)  # [B, N], bar t: known now
        start = prices if self.start_prices is None else self.start_prices
        self.start_prices = torch.where(self.fresh.unsqueeze(-1), prices, start)
        self.fresh = torch.zeros_like(self.fresh)
        m = self.max_position
        growth = prices / self.start_prices
        return m * growth / (1.0 + m * (growth - 1.0).sum(-1, keepdim=True))

    def observe(self, info: dict, done: torch.Tensor) -> None:
        super().observe(info, done)
        self.fresh = self.fresh | done


class RiskParityPolicy(_RulePolicy):
    """Long every instrument, inverse to its causal EWMA volatility, the largest weight at `max_position`."""

    def target(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        variance = env.engine.tables.variance.index_select(0, env.engine.t)  # EWMA through bar t
        inverse_vol = variance.clamp_min(1e-20).rsqrt()
        return self.max_position * inverse_vol / inverse_vol.amax(-1, keepdim=True)


class MomentumPolicy(_RulePolicy):
    """`max_position` times the sign of the `MOMENTUM_LOOKBACK`-bar log price change (0 before that)."""

    lookback = MOMENTUM_LOOKBACK

    def target(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        t, prices = env.engine.t, env.engine.tables.prices
        now = prices.index_select(0, t)
        then = prices.index_select(0, (t - self.lookback).clamp_min(0))
        signal = torch.sign(torch.log(now) - torch.log(then))
        return torch.where((t >= self.lookback).unsqueeze(-1), signal, 0.0) * self.max_position


class OraclePolicy(_RulePolicy):
    """`max_position` times the sign of the latent drift of bar t -> t+1 (synthetic data only).

    It reads what no other policy may, by definition: the upper reference of what the market allows.
    """

    def target(self, obs: dict, env: PortfolioEnv) -> torch.Tensor:
        drift = env.engine.tables.drift
        if drift is None:
            raise ValueError("the oracle needs the latent drift, which only synthetic markets have")
        return torch.sign(drift.index_select(0, env.engine.t)) * self.max_position


_BASELINE_CLASSES = {
    "equal_weight": EqualWeightPolicy,
    "buy_and_hold": BuyAndHoldPolicy,
    "risk_parity": RiskParityPolicy,
    "momentum": MomentumPolicy,
    "oracle": OraclePolicy,
}


def baseline_policies(market: MarketData, cfg: Config, num_rows: int, device="cpu") -> dict:
    """Fresh baseline policies by name for `num_rows` rows: the oracle only where `market.drift` exists."""
    names = [n for n in BASELINE_NAMES if n != "oracle" or market.drift is not None]
    return {n: _BASELINE_CLASSES[n](cfg.environment.max_position_size, num_rows, device) for n in names}


# ---------------------------------------------------------------------------------------------
# Backtest: S parallel segments of PortfolioEnv, stitched in time order
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Backtest:
    """One policy's stitched backtest. Time is axis 0; entry k is the position chosen at bar `bars[k]`
    and held over bar `bars[k]` -> `bars[k] + 1`. Arrays are float64 unless said otherwise."""

    net_return: np.ndarray  # [T] account return (cash yield + trading - cost)
    weights: np.ndarray  # [T, N] executed weights (after stop-loss lock and risk manager)
    proposed: np.ndarray  # [T, N] the policy's proposal
    pnl: np.ndarray  # [T, N] w * r - cost_rate * |w - w_prev| per instrument (module docstring)
    var: np.ndarray  # [T] one-day ex-ante VaR of the executed book
    correlation_exposure: np.ndarray  # [T]
    sector_allocation: np.ndarray  # [T, K] shares of gross exposure, in `sectors` order
    intervention: np.ndarray  # [T] the risk manager's relative move
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
    limits: dict  # every limit in force (`RiskLimits` as a dict)
    relaxed: list[str]  # notes on limits relaxed for a small universe

    @property
    def equity(self) -> np.ndarray:
        """Equity after each bar from 1.0 (the stitched series compounded)."""
        return metrics.equity_curve(self.net_return)


@torch.no_grad()
def run_backtest(
    market: MarketData,
    cfg: Config,
    make_policy: Callable[[int], object],
    segments: int = 8,
    device: str | torch.device = "cpu",
    tables: MarketTables | None = None,
) -> Backtest:
    """Backtest `make_policy(num_rows)` over the whole split through `PortfolioEnv` (see the module docstring).

    The tradable bars are cut by `evaluation.segment_starts` into S equal consecutive pieces, one per
    env row, all starting flat; each bar the policy proposes, the env steps, and the policy observes
    (`done` = the env's truncation, true for every row on the last bar only).
    """
    tables = tables or build_tables(market, cfg, device)
    device = tables.prices.device
    starts, length = segment_starts(tables, segments)
    s, n = len(starts), market.num_instruments
    eval_cfg = dataclasses.replace(cfg, environment=dataclasses.replace(cfg.environment, episode_length=length))
    env = PortfolioEnv(market, eval_cfg, s, device=device, torch_mode=True, tables=tables)
    env.reset(seed=0)
    env.engine.reset_rows(torch.ones(s, dtype=torch.bool, device=device), torch.tensor(starts, device=device))
    obs = env.observe()
    policy = make_policy(s)

    k_sectors = len(env.sectors)
    store = {
        "net_return": torch.zeros(length, s, device=device),
        "weights": torch.zeros(length, s, n, device=device),
        "proposed": torch.zeros(length, s, n, device=device),
        "pnl": torch.zeros(length, s, n, device=device),
        "var": torch.zeros(length, s, device=device),
        "correlation_exposure": torch.zeros(length, s, device=device),
        "sector_allocation": torch.zeros(length, s, k_sectors, device=device),
        "intervention": torch.zeros(length, s, device=device),
        "bar_returns": torch.zeros(length, s, n, device=device),
        "stop_loss": torch.zeros(length, s, n, device=device),
        "bars": torch.zeros(length, s, dtype=torch.long, device=device),
    }
    allocation = None
    for k in range(length):
        bar, prev_weights = env.engine.t, env.engine.weights
        proposed = policy.propose(obs, env)
        obs, _, _, truncated, info = env.step(proposed)
        policy.observe(info, truncated)
        w = info["executed_weights"]
        store["bars"][k] = bar
        store["proposed"][k] = proposed
        store["weights"][k] = w
        store["pnl"][k] = w * info["bar_returns"] - env.cost_rate * (w - prev_weights).abs()
        keys = ("net_return", "var", "correlation_exposure", "sector_allocation", "intervention", "bar_returns")
        store["stop_loss"][k] = info["stop_loss"].float()
        for key in keys:
            store[key][k] = info[key]
        last = getattr(policy, "last_allocation", None)
        if last is not None:
            if allocation is None:
                allocation = torch.zeros(length, s, last.shape[-1], device=device)
            allocation[k] = last

    def stitch(x: torch.Tensor, dtype=np.float64) -> np.ndarray:
        # [length, S, ...] -> [S * length, ...]: piece j covers bars starts[j] .. starts[j] + length - 1
        return x.transpose(0, 1).reshape(s * length, *x.shape[2:]).cpu().numpy().astype(dtype)

    out = {key: stitch(value) for key, value in store.items() if key != "bars"}
    bars = stitch(store["bars"], np.int64)
    vol = tables.vol.index_select(0, torch.as_tensor(bars, device=device)).mean(-1).cpu().numpy().astype(np.float64)
    regime = None if tables.regime is None else tables.regime.cpu().numpy().astype(np.int64)[bars]
    return Backtest(
        **out,
        realised_vol=vol,
        regime=regime,
        allocation=None if allocation is None else stitch(allocation),
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
        relaxed=list(env.relaxed),
    )


# ---------------------------------------------------------------------------------------------
# Metrics of a backtest
# ---------------------------------------------------------------------------------------------


def backtest_metrics(bt: Backtest, risk_free_rate: float) -> dict[str, float]:
    """`PORTFOLIO_KEYS` of one backtest (`metrics.summarize` with weights, per-instrument pnl and VaR).

    The VaR backtest compares each bar's account loss with the one-day VaR over sqrt(bars_per_day),
    the VaR of one bar; compliance (the same scaling on both sides) is one-day VaR <= max_var.
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
    return {key: summary[key] for key in PORTFOLIO_KEYS}


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


def _json_ready(x):
    """Plain Python types; a non-finite float becomes 0.0 (the `metrics` convention: JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else 0.0
    return x


# ---------------------------------------------------------------------------------------------
# The evaluation report
# ---------------------------------------------------------------------------------------------


def evaluate_portfolio(
    specialists,
    meta,
    market: MarketData,
    cfg: Config,
    device: str | torch.device = "cpu",
    segments: int = 16,
    tables: MarketTables | None = None,
    phase: int | str = 2,
    reference_cache: dict | None = None,
    specialists_frozen: bool = False,
) -> tuple[dict, dict[str, Backtest]]:
    """The report of DESIGN section 9 for the hierarchy (`specialists` + `meta`) on `market`.

    Runs, on the same bars: the system, the equal allocation over the same frozen specialists
    (`HierarchyPolicy(meta=None)`) and every baseline. Returns `(report, backtests)` with the
    backtests keyed "system", "equal_allocation" and by baseline name (for plots). `meta=None` makes
    the system the equal allocation itself (allocation efficiency 0). `phase` picks the column of
    targets: 1, 2, 3 or "final".

    The baselines depend on neither level of the hierarchy: pass the same dict as `reference_cache`
    to repeated evaluations on the same market (a training run's validations) and they are computed
    once. The equal allocation depends on the specialists only: with `specialists_frozen=True`
    (Phase 2) it is cached there too.
    """
    tables = tables or build_tables(market, cfg, device)
    rf = cfg.reward.risk_free_rate
    owner = instrument_specialist_index(market.sectors, specialists.names).to(tables.prices.device)
    size = cfg.environment.max_position_size

    def hierarchy(meta_controller):
        return lambda rows: HierarchyPolicy(specialists, meta_controller, owner, size, rows, tables.prices.device)

    def baseline(name):
        return lambda rows: baseline_policies(market, cfg, rows, tables.prices.device)[name]

    run = dict(market=market, cfg=cfg, segments=segments, device=device, tables=tables)
    references = reference_cache if reference_cache is not None else {}
    if not references:
        for name in baseline_policies(market, cfg, 1, tables.prices.device):
            references[name] = run_backtest(make_policy=baseline(name), **run)
    # unless frozen, the specialists may have changed since the last call (Phase 3): not cached
    equal_allocation = references.get("equal_allocation") if specialists_frozen else None
    if equal_allocation is None:
        equal_allocation = run_backtest(make_policy=hierarchy(None), **run)
        if specialists_frozen:
            references["equal_allocation"] = equal_allocation
    backtests = {
        "system": run_backtest(make_policy=hierarchy(meta), **run),
        "equal_allocation": equal_allocation,
        **references,  # (a cached equal allocation keeps its place)
    }

    system = backtests["system"]
    portfolio = backtest_metrics(system, rf)
    equal_allocation = backtest_metrics(backtests["equal_allocation"], rf)
    report = {
        "portfolio": portfolio,
        "equal_allocation": equal_allocation,
        "baselines": {name: backtest_metrics(bt, rf) for name, bt in backtests.items() if name in BASELINE_NAMES},
        "allocation_efficiency": portfolio["sharpe"] - equal_allocation["sharpe"],
        "specialist_utilization": specialist_utilization(system, list(specialists.names)),
        "per_regime": per_regime_metrics(system, rf),
        "phase": phase,
        "targets": target_checks(portfolio, phase),
        "limits": {**system.limits, "relaxed": system.relaxed},
        "data": {
            "source": market.source,
            "split": market.split,
            "start": str(system.timestamps[0]),
            # the last bar whose return is in the backtest (the last position is held until then)
            "end": str(np.asarray(market.timestamps)[system.bars[-1] + 1]),
            "bars": len(system.net_return),
            "instruments": list(market.symbols),
            "segments": len(system.net_return) // system.segment_length,
        },
    }
    return _json_ready(report), backtests


# ---------------------------------------------------------------------------------------------
# Plain-text report
# ---------------------------------------------------------------------------------------------

_COLUMNS = (
    ("sharpe", "sharpe", "{:+.2f}"),
    ("sortino", "sortino", "{:+.2f}"),
    ("calmar", "calmar", "{:+.2f}"),
    ("max_drawdown", "max_dd", "{:.1%}"),
    ("win_rate", "win", "{:.1%}"),
    ("total_return", "return", "{:+.1%}"),
    ("annual_volatility", "ann_vol", "{:.1%}"),
    ("var_compliance", "var_ok", "{:.1%}"),
    ("var_breach_rate", "var_brch", "{:.1%}"),
    ("turnover", "turnover", "{:.4f}"),
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

    lim = report["limits"]
    out.append(
        f"Limits: position <= {lim['max_position']:g}, one-day VaR <= {lim['max_var']:g}, "
        f"correlation exposure <= {lim['max_correlation']:g}, sector <= {lim['max_sector']:g}"
    )
    out += [f"  relaxed: {note}" for note in lim.get("relaxed", [])]
    return "\n".join(out)


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
    env.engine.reset_rows(torch.ones(episodes, dtype=torch.bool, device=env.engine.device), starts.to(device))
    policy = make_policy(episodes)
    obs = env.observe()
    net = torch.zeros(length, episodes, device=device)
    weights = torch.zeros(length, episodes, env.n, device=device)
    pnl = torch.zeros_like(weights)
    for k in range(length):
        prev = env.engine.weights
        proposed = policy.propose(obs, env)
        obs, _, _, truncated, info = env.step(proposed)
        policy.observe(info, truncated)
        w = info["executed_weights"]
        net[k], weights[k] = info["net_return"], w
        pnl[k] = w * info["bar_returns"] - env.cost_rate * (w - prev).abs()
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
