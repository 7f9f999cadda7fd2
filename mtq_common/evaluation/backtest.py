"""Backtests through `PortfolioEnv`: any policy, the system and each baseline alike, bar by bar.

Every evaluated policy has the interface of `HierarchyPolicy`: `propose(obs, env) -> proposed weights
[B, N]` (signed fractions of equity, on the env's device) and `observe(info, done)` after every step
(`policy_step` does both around the env's step). All of them trade through the same `PortfolioEnv`, so
the stop-loss, the risk manager and the costs are identical: the comparison is fair by construction.

`run_backtests` runs one continuous backtest of the whole split (`segments=1`, the test evaluation), or,
for validation during training, cuts the split into `segments` consecutive pieces that run as parallel
rows (each piece starts flat, as `specialist_eval.evaluate_specialists` does) and stitches them in time
order; `stitch_backtests` joins the walk-forward's test blocks the same way. The metrics of a
`Backtest` are `backtest_metrics.py`; `run_episodes` gives the mean and spread over repeated episodes.
`portfolio_eval` builds the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
import torch

from kernels import LIMIT_NAMES
from mtq_common.data.market import MarketData
from mtq_common.data.tables import MarketTables, build_tables
from mtq_common.envs.portfolio_env import PortfolioEnv
from mtq_common.evaluation import metrics
from mtq_common.evaluation.specialist_eval import segment_starts
from mtq_common.training.config import Config


def policy_step(policy, env: PortfolioEnv, obs: dict):
    """One bar of a policy in `env`: it proposes, the env trades, it observes; returns the env's step output.

    A policy with `own_positions` (the hierarchy: its specialists' positions) passes them to the env,
    so the specialists' observations and the stop-loss follow their own trades (`PortfolioEnv.step`)."""
    proposed = policy.propose(obs, env)
    out = env.step(proposed, getattr(policy, "own_positions", None))
    policy.observe(out[4], out[3])
    return out


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
    end_timestamps: np.ndarray | None = None  # [T] the market's timestamps of `bars + 1`: when each return is earned
    appetite: np.ndarray | None = None  # [T] the policy's `last_appetite` (a meta-controller's), if it has one

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
        return _RowsOf(x, rows)
    return x[rows] if isinstance(x, torch.Tensor) and x.ndim > 0 else x


class _RowsOf(Mapping):
    """A dict of the env's outputs restricted to `rows`, each entry cut when it is read. Why lazily: a policy
    reads two or three of the two dozen entries, and cutting them all for every policy at every bar took
    more time than the policies' own work."""

    def __init__(self, x: dict, rows: slice):
        self.x, self.rows = x, rows

    def __getitem__(self, key):
        return _rows_of(self.x[key], self.rows)

    def __iter__(self):
        return iter(self.x)

    def __len__(self) -> int:
        return len(self.x)


# inference mode rather than no_grad: no view or version tracking on the thousands of small tensors a bar makes
# (13-15% of a backtest's time); nothing made here reaches autograd, what leaves is NumPy
@torch.inference_mode()
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
    env = PortfolioEnv(market, eval_cfg, p * s, device=device, torch_mode=True, tables=tables, score=False)
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
    appetites: dict[int, torch.Tensor] = {}
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
                if j not in allocations:  # (not setdefault: its default would be allocated at every bar)
                    allocations[j] = torch.zeros(length, s, last.shape[-1], device=device)
                allocations[j][k] = last
            appetite = getattr(policy, "last_appetite", None)
            if appetite is not None:
                if j not in appetites:
                    appetites[j] = torch.zeros(length, s, device=device)
                appetites[j][k] = appetite
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
            appetite=stitch(appetites[j]) if j in appetites else None,
            bars=bars,
            timestamps=np.asarray(market.timestamps)[bars],
            end_timestamps=np.asarray(market.timestamps)[bars + 1],
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


def stitch_backtests(parts: list[Backtest]) -> Backtest:
    """Consecutive backtests (the walk-forward's test blocks, each one continuous run from flat) joined in
    time order: one out-of-sample series. `bars` become positions in the joined series; the timestamps,
    returns and everything else are the parts' own, concatenated."""
    first = parts[0]
    joined = {}
    for f in dataclasses.fields(Backtest):
        values = [getattr(p, f.name) for p in parts]
        if f.name in ("regime", "allocation", "appetite"):
            joined[f.name] = None if any(v is None for v in values) else np.concatenate(values)
        elif isinstance(values[0], np.ndarray):
            joined[f.name] = np.concatenate(values)
        else:
            joined[f.name] = getattr(first, f.name)
    joined["bars"] = np.arange(len(joined["net_return"]))
    joined["segment_length"] = min(p.segment_length for p in parts)
    return Backtest(**joined)


# ---------------------------------------------------------------------------------------------
# Repeated evaluation episodes: mean and spread of each metric
# ---------------------------------------------------------------------------------------------

EPISODE_METRICS = ("sharpe", "sortino", "max_drawdown", "win_rate", "total_return", "annual_volatility", "turnover")


@torch.inference_mode()  # (as `run_backtests`)
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
    Drawn windows of a split no longer than one episode would all be the same: then one episode is run
    (the result has one entry), not `episodes` copies whose spread of 0 would read as measured.
    """
    tables = tables or build_tables(market, cfg, device)
    available = tables.num_bars - 1 - tables.first_bar
    length = max(2, min(length or cfg.environment.episode_length, available))
    if not consecutive and length >= available:
        episodes = 1
    env_cfg = dataclasses.replace(cfg, environment=dataclasses.replace(cfg.environment, episode_length=length))
    env = PortfolioEnv(market, env_cfg, episodes, device=device, seed=seed, torch_mode=True, tables=tables,
                       score=False)  # fmt: skip
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
    return summary
