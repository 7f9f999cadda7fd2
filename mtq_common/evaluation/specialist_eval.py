"""Evaluation of the specialists on held-out data, instrument by instrument, next to the rules.

Each instrument is traded by its owning specialist with deterministic positions (the clipped mean)
through `SpecialistEnv`, and so is every rule (momentum, trend filter, buy-and-hold and, on synthetic
data, the oracle): the same stop-loss, costs and timing as in training, and the same execution
(`baselines` module docstring): each rule's table is a target, partially adjusted at the specialists'
`position_rate`, and a stopped instrument stays flat until the target changes sign; buy-and-hold buys at
full size and re-enters on the bar after a stop. To use the batch, the split is cut into `segments`
consecutive pieces that run in parallel rows (policies x pieces x instruments in one env); each piece
starts flat, so the stitched series pays one extra entry per piece (a conservative approximation of one
unbroken run).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mtq_common.agents.nets import SpecialistAgents
from mtq_common.data.market import MarketData
from mtq_common.data.tables import MarketTables, build_tables
from mtq_common.envs.engine import partial_adjustment
from mtq_common.envs.trading_env import SpecialistEnv, position_column
from mtq_common.evaluation import metrics
from mtq_common.evaluation.rules import (
    TrendFilter,
    buy_and_hold_positions,
    momentum_positions,
    oracle_positions,
    trend_filter_positions,
)
from mtq_common.training.config import Config

METRIC_KEYS = ("sharpe", "sortino", "calmar", "max_drawdown", "win_rate", "total_return")


def segment_starts(tables: MarketTables, segments: int) -> tuple[list[int], int]:
    """Start bars and length of `segments` equal consecutive pieces of the tradable bars."""
    first, last = tables.first_bar, tables.num_bars - 2  # the last bar a position can be opened at
    segments = max(1, min(segments, (last - first + 1) // 2))
    length = (last - first + 1) // segments
    return [first + j * length for j in range(segments)], length


def rule_positions(market: MarketData, trend: TrendFilter) -> dict[str, np.ndarray]:
    """The rules' position tables [T, N] (units of max_position) that the specialists are compared with."""
    rules = {
        "momentum": momentum_positions(market.prices),
        "trend_filter": trend_filter_positions(market.prices, trend),
        "buy_and_hold": buy_and_hold_positions(market.prices),
    }
    if market.drift is not None:
        rules["oracle"] = oracle_positions(market.expected_return)
    return rules


@torch.inference_mode()  # (as `backtest.run_backtests`)
def evaluate_specialists(
    agents: SpecialistAgents,
    market: MarketData,
    cfg: Config,
    trend: TrendFilter,
    device: str | torch.device = "cpu",
    segments: int = 8,
    tables: MarketTables | None = None,
    next_return_diagnostic: bool = False,
) -> dict:
    """Per-instrument metrics of the specialists on `market`, with the rules traded through the same env.

    Returns `{specialist: {symbol: {sharpe, sortino, calmar, max_drawdown, win_rate, total_return,
    momentum_sharpe, trend_filter_sharpe, buy_and_hold_sharpe, oracle_sharpe (synthetic only)},
    "mean_sharpe": float}}` for the specialists in `agents.names` that own an instrument of `market`.
    """
    tables = tables or build_tables(market, cfg, device)
    instruments = [i for i, s in enumerate(market.sectors) if s in agents.names]
    owner = torch.tensor([agents.names.index(market.sectors[i]) for i in instruments], device=device)
    rules = {name: table[:, instruments] for name, table in rule_positions(market, trend).items()}
    names = ["specialist", *rules]
    starts, length = segment_starts(tables, segments)
    p, s, n = len(names), len(starts), len(instruments)
    eval_cfg = dataclasses.replace(cfg, environment=dataclasses.replace(cfg.environment, episode_length=length))
    env = SpecialistEnv(
        market, eval_cfg, instruments * (p * s), device=device, torch_mode=True, tables=tables,
        next_return_diagnostic=next_return_diagnostic,
    )  # fmt: skip
    env.reset(seed=0)
    # rows: policy-major, then piece, then instrument
    obs = env.start_at(torch.tensor(starts, device=device).repeat_interleave(n).repeat(p))
    rule_table = torch.as_tensor(np.stack(list(rules.values())), dtype=torch.float32, device=device)  # [R, T, n]
    net = torch.zeros(length, p, s, n, device=device)
    held = torch.zeros(length, p, s, n, device=device)
    # execution alike: the rules at the specialists' rate, buy-and-hold at rate 1 with its re-entry
    reenter = torch.tensor([name == "buy_and_hold" for name in rules], device=device).view(-1, 1, 1)
    stopped = torch.zeros(p - 1, s, n, dtype=torch.bool, device=device)
    for t in range(length):
        bars = env.bar.view(p, s, n)[0, :, 0]  # the pieces' current bars (the same for every policy)
        grid = obs.view(p, s, n, -1)
        positions = agents.positions(grid[0], owner)  # [S, n]
        targets = rule_table.index_select(1, bars)  # [R, S, n]
        targets = torch.where(stopped & reenter, 0.0, targets)  # buy-and-hold: flat for a bar, then re-enter
        own = grid[1:, ..., position_column(market.num_instruments)]  # 0 while a stop holds it flat
        targets = torch.where(reenter, targets, partial_adjustment(own, targets, agents.position_rate))
        actions = torch.cat([positions.unsqueeze(0), targets], 0)
        obs, _, _, _, info = env.step(actions.reshape(-1, 1))
        net[t] = info["net_return"].view(p, s, n)
        held[t] = info["position"].view(p, s, n)
        stopped = info["stop_loss"].view(p, s, n)[1:]
    # Stitch the pieces in time order: [P, S * length, n], bar k earns k -> k+1 from starts[0].
    net = net.permute(1, 2, 0, 3).reshape(p, s * length, n).cpu().double().numpy()
    held = held.permute(1, 2, 0, 3).reshape(p, s * length, n).cpu().double().numpy()
    rf = cfg.reward.risk_free_rate
    cash = rf / market.bars_per_year  # the account's cash yield: part of its return, not of any trade's PnL

    result: dict = {}
    for j, i in enumerate(instruments):
        summary = metrics.summarize(net[0, :, j], market.bars_per_year, rf, positions=held[0, :, j],
                                    pnl=net[0, :, j] - cash)  # fmt: skip
        row = {key: value for key, value in summary.items() if key in METRIC_KEYS}
        for r, name in enumerate(names[1:], start=1):
            row[f"{name}_sharpe"] = metrics.sharpe(net[r, :, j], market.bars_per_year, rf)
        result.setdefault(market.sectors[i], {})[market.symbols[i]] = row
    for table in result.values():
        table["mean_sharpe"] = float(np.mean([v["sharpe"] for v in table.values()]))
    return result


def format_specialist_table(result: dict) -> str:
    """A plain-text table of `evaluate_specialists`' result, one row per instrument."""
    header = ["specialist", "instrument", "sharpe", "sortino", "max_dd", "win_rate", "return", "momentum",
              "trend_flt", "b&h"]  # fmt: skip
    has_oracle = any("oracle_sharpe" in row for t in result.values() for k, row in t.items() if k != "mean_sharpe")
    if has_oracle:
        header.append("oracle")
    lines = ["  ".join(f"{h:>10}" for h in header)]
    for name, table in result.items():
        for symbol, row in table.items():
            if symbol == "mean_sharpe":
                continue
            cells = [name, symbol, row["sharpe"], row["sortino"], row["max_drawdown"], row["win_rate"]]
            cells += [
                row["total_return"],
                row["momentum_sharpe"],
                row["trend_filter_sharpe"],
                row["buy_and_hold_sharpe"],
            ]
            if has_oracle:
                cells.append(row.get("oracle_sharpe", float("nan")))
            lines.append("  ".join(f"{c:>10.3f}" if isinstance(c, float) else f"{c:>10}" for c in cells))
    return "\n".join(lines)
