"""Evaluation on held-out data: backtests of trained policies next to rule-based baselines.

Specialists are evaluated per instrument over a whole split: each instrument is traded by its
owning specialist with deterministic positions (the clipped mean) through `SpecialistEnv`, so costs,
stop-losses and timing are exactly those of training. To use the batch, the split is cut into
`segments` consecutive pieces that run in parallel rows; each piece starts flat, so the stitched
series pays one extra entry per piece (a conservative approximation of one unbroken run).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mtq_common import metrics
from mtq_common.baselines import backtest, buy_and_hold_positions, momentum_positions, oracle_positions
from mtq_common.config import Config
from mtq_common.envs import MarketTables, SpecialistEnv, build_tables
from mtq_common.market import MarketData
from mtq_common.nets import SpecialistAgents

METRIC_KEYS = ("sharpe", "sortino", "calmar", "max_drawdown", "win_rate", "total_return")


def segment_starts(tables: MarketTables, segments: int) -> tuple[list[int], int]:
    """Start bars and length of `segments` equal consecutive pieces of the tradable bars."""
    first, last = tables.first_bar, tables.num_bars - 2  # the last bar a position can be opened at
    segments = max(1, min(segments, (last - first + 1) // 2))
    length = (last - first + 1) // segments
    return [first + j * length for j in range(segments)], length


@torch.no_grad()
def evaluate_specialists(
    agents: SpecialistAgents,
    market: MarketData,
    cfg: Config,
    device: str | torch.device = "cpu",
    segments: int = 8,
    tables: MarketTables | None = None,
    next_return_diagnostic: bool = False,
) -> dict:
    """Per-instrument metrics of the specialists on `market`, with momentum, buy-and-hold and oracle.

    Returns `{specialist: {symbol: {sharpe, sortino, calmar, max_drawdown, win_rate, total_return,
    momentum_sharpe, buy_and_hold_sharpe, oracle_sharpe (synthetic only)}, "mean_sharpe": float}}`
    for the specialists in `agents.names` that own an instrument of `market`.
    """
    tables = tables or build_tables(market, cfg, device)
    instruments = [i for i, s in enumerate(market.sectors) if s in agents.names]
    owner = torch.tensor([agents.names.index(market.sectors[i]) for i in instruments], device=device)
    starts, length = segment_starts(tables, segments)
    n, s = len(instruments), len(starts)
    eval_cfg = dataclasses.replace(cfg, environment=dataclasses.replace(cfg.environment, episode_length=length))
    env = SpecialistEnv(
        market, eval_cfg, instruments * s, device=device, torch_mode=True, tables=tables,
        next_return_diagnostic=next_return_diagnostic,
    )  # fmt: skip
    env.reset(seed=0)
    start_rows = torch.tensor(starts, device=device).repeat_interleave(n)
    env.engine.reset_rows(torch.ones(n * s, dtype=torch.bool, device=device), start_rows)
    obs = env.observe()
    net = torch.zeros(length, s, n, device=device)
    held = torch.zeros(length, s, n, device=device)
    for t in range(length):
        positions = agents.positions(obs.reshape(s, n, -1), owner)  # [S, N]
        obs, _, _, _, info = env.step(positions.reshape(-1, 1))
        net[t] = info["net_return"].reshape(s, n)
        held[t] = info["position"].reshape(s, n)
    # Stitch the pieces in time order: [S * length, N], bar k earns k -> k+1 from starts[0].
    net = net.permute(1, 0, 2).reshape(s * length, n).cpu().double().numpy()
    held = held.permute(1, 0, 2).reshape(s * length, n).cpu().double().numpy()
    bars = slice(starts[0], starts[0] + s * length + 1)
    baselines = _baseline_returns(market, cfg, bars, [market.symbols[i] for i in instruments])
    rf = cfg.reward.risk_free_rate
    cash = rf / market.bars_per_year  # the account's cash yield: part of its return, not of any trade's PnL

    result: dict = {}
    for j, i in enumerate(instruments):
        row = {
            key: value
            for key, value in metrics.summarize(
                net[:, j], market.bars_per_year, rf, positions=held[:, j], pnl=net[:, j] - cash
            ).items()
            if key in METRIC_KEYS
        }
        for name, series in baselines.items():
            row[f"{name}_sharpe"] = metrics.sharpe(series[:, j], market.bars_per_year, rf)
        result.setdefault(market.sectors[i], {})[market.symbols[i]] = row
    for table in result.values():
        table["mean_sharpe"] = float(np.mean([v["sharpe"] for v in table.values()]))
    return result


def _baseline_returns(market: MarketData, cfg: Config, bars: slice, symbols: list[str]) -> dict[str, np.ndarray]:
    """Account returns of the rules at `max_position_size` on the same bars, with the cash yield the
    environments pay (see `kernels.portfolio_step`)."""
    cols = [market.symbols.index(s) for s in symbols]
    prices = market.prices[:, cols]
    size = cfg.environment.max_position_size
    cost = np.array([cfg.instruments[s].cost_multiplier for s in symbols]) * cfg.environment.transaction_cost
    cost = cost * market.cost_multiplier
    returns = market.returns[bars][:, cols]
    rules = {
        "momentum": momentum_positions(prices)[bars],
        "buy_and_hold": buy_and_hold_positions(prices)[bars],
    }
    if market.drift is not None:
        rules["oracle"] = oracle_positions(market.drift[:, cols])[bars]
    cash = cfg.reward.risk_free_rate / market.bars_per_year
    return {name: cash + backtest(pos * size, returns, cost) for name, pos in rules.items()}


def format_specialist_table(result: dict) -> str:
    """A plain-text table of `evaluate_specialists`' result, one row per instrument."""
    header = ["specialist", "instrument", "sharpe", "sortino", "max_dd", "win_rate", "return", "momentum", "b&h"]
    has_oracle = any("oracle_sharpe" in row for t in result.values() for k, row in t.items() if k != "mean_sharpe")
    if has_oracle:
        header.append("oracle")
    lines = ["  ".join(f"{h:>10}" for h in header)]
    for name, table in result.items():
        for symbol, row in table.items():
            if symbol == "mean_sharpe":
                continue
            cells = [name, symbol, row["sharpe"], row["sortino"], row["max_drawdown"], row["win_rate"]]
            cells += [row["total_return"], row["momentum_sharpe"], row["buy_and_hold_sharpe"]]
            if has_oracle:
                cells.append(row.get("oracle_sharpe", float("nan")))
            lines.append("  ".join(f"{c:>10.3f}" if isinstance(c, float) else f"{c:>10}" for c in cells))
    return "\n".join(lines)
