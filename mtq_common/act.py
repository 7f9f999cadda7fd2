"""What to hold now: the trained hierarchy's target book for the bar after the data's last one.

`target_book` runs the system causally over the data, one continuous backtest from its first tradable bar,
exactly as the test evaluation trades (`backtest.run_backtests` with one segment): the features,
the specialists' own books and stop-loss state, the meta-controller's observation and holdings, the
drifting account and the risk manager's covariance all evolve bar by bar. At the last bar, whose next
return is not known yet, the hierarchy proposes and the environment's `preview` applies the stop-loss
lock and the risk manager without stepping: the executed book of that bar, which is what the test
backtest would have traded at it (a test cuts the test split at several bars and compares).

It is a decision aid, not a broker: nothing is sent anywhere, no order is routed, prices are the last
closes of the data (no live quotes), and units are `weight x capital / close` with no lot sizes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from kernels import LIMIT_NAMES, NOT_APPLIED
from mtq_common.config import Config
from mtq_common.envs import PortfolioEnv
from mtq_common.hierarchy import HierarchyPolicy, instrument_specialist_index
from mtq_common.market import MarketData, iso_time
from mtq_common.market_tables import build_tables


def warmup_needed(cfg: Config) -> int:
    """The fewest bars `target_book` accepts: the environments' warm-up plus two bars."""
    from mtq_common.walkforward import warmup_bars

    return warmup_bars(cfg) + 2


@torch.no_grad()
def target_book(specialists, meta, market: MarketData, cfg: Config, capital: float | None = None,
                device: str | torch.device = "cpu") -> dict:  # fmt: skip
    """The target book at `market`'s last bar (module docstring); a JSON-ready dict."""
    if market.num_bars < warmup_needed(cfg):
        raise ValueError(
            f"the data has {market.num_bars} bars; acting needs at least {warmup_needed(cfg)} (a warm-up of "
            f"{warmup_needed(cfg) - 2} bars for the features and the risk model, then bars to trade)"
        )
    tables = build_tables(market, cfg, device)
    last = market.num_bars - 1
    whole = dataclasses.replace(cfg, environment=dataclasses.replace(cfg.environment, episode_length=market.num_bars))
    env = PortfolioEnv(market, whole, 1, device=device, torch_mode=True, tables=tables)
    env.autoreset = False  # the run ends at the last bar and stays there
    env.reset(seed=0)
    obs = env.start_at(tables.first_bar)
    owner = instrument_specialist_index(market.sectors, specialists.names).to(device)
    policy = HierarchyPolicy(specialists, meta, owner, cfg.environment.max_position_size, 1, device)
    for _ in range(last - tables.first_bar):  # every bar with a known next return, in order
        proposed = policy.propose(obs, env)
        obs, _, _, truncated, info = env.step(proposed, policy.own_positions)
        # the data's end is not the end of the run: the policy keeps its state (in the backtest of longer
        # data this bar is an ordinary one)
        policy.observe(info, torch.zeros_like(truncated))
    proposed = policy.propose(obs, env)
    proposal, own, risk = env.preview(proposed, policy.own_positions)

    held = env.holdings[0]
    closes = tables.prices[last]
    k_of = {name: k for k, name in enumerate(specialists.names)}
    allocation, appetite = policy.last_allocation[0], float(policy.tracker.appetite[0])
    when = iso_time(market.timestamps[last], market.bars_per_day)
    instruments = {}
    for i, symbol in enumerate(market.symbols):
        weight = float(risk.weights[0, i])
        row = {
            "time": when,
            "close": float(market.prices[last, i]),
            "specialist": market.sectors[i],
            "signal": float(own[0, i]),
            "allocation": float(allocation[k_of[market.sectors[i]]]),
            "risk_appetite": appetite,
            "proposed_weight": float(proposal[0, i]),
            "executed_weight": weight,
            "current_weight": float(held[i]),
            "trade_weight": weight - float(held[i]),
        }
        if capital is not None:
            row["notional"] = weight * capital
            row["units"] = weight * capital / float(closes[i])
            row["trade_units"] = (weight - float(held[i])) * capital / float(closes[i])
        instruments[symbol] = row
    limits = {k: (None if v == NOT_APPLIED else v) for k, v in dataclasses.asdict(env.limits).items()}
    return {
        "last_bar": when,
        "bars_used": market.num_bars,
        "capital": capital,
        "instruments": instruments,
        "book": {
            "gross": float(risk.weights[0].abs().sum()),
            "net": float(risk.weights[0].sum()),
            "var": float(risk.var[0]),
            "correlation_exposure": float(risk.correlation_exposure[0]),
            "sector_shares": dict(zip(env.sectors, risk.sector_allocation[0].tolist(), strict=True)),
            "binding": {name: bool(risk.binding[0, k]) for k, name in enumerate(LIMIT_NAMES)},
            "gross_kept": float(risk.gross_kept[0]),
            "turnover": float((risk.weights[0] - held).abs().sum()),
        },
        "limits": {**limits, "notes": list(env.limit_notes)},
    }


def format_book(book: dict) -> str:
    """The target book as a plain-text table."""
    has_units = book["capital"] is not None
    header = ["instrument", "close", "signal", "alloc", "proposed", "executed", "current", "trade"]
    header += ["units", "trade units"] if has_units else []
    lines = ["  ".join(f"{h:>11}" for h in header)]
    for symbol, r in book["instruments"].items():
        cells = [symbol, f"{r['close']:.4g}", f"{r['signal']:+.3f}", f"{r['allocation']:.3f}",
                 f"{r['proposed_weight']:+.4f}", f"{r['executed_weight']:+.4f}", f"{r['current_weight']:+.4f}",
                 f"{r['trade_weight']:+.4f}"]  # fmt: skip
        if has_units:
            cells += [f"{r['units']:+.2f}", f"{r['trade_units']:+.2f}"]
        lines.append("  ".join(f"{c:>11}" for c in cells))
    b = book["book"]
    bound = [name for name, on in b["binding"].items() if on] or ["none"]
    lines.append(
        f"book: gross {b['gross']:.4f}, net {b['net']:+.4f}, one-day VaR {b['var']:.4%}, correlation exposure "
        f"{b['correlation_exposure']:.3f}, sector shares "
        + ", ".join(f"{s} {v:.1%}" for s, v in b["sector_shares"].items())
        + f"; limits that bound: {', '.join(bound)}; turnover to reach it {b['turnover']:.4f}"
    )
    return "\n".join(lines)


def stale_days(market: MarketData, as_of: np.datetime64) -> float:
    """Calendar days from the data's last bar to `as_of`."""
    return float((as_of - np.datetime64(market.timestamps[-1], "s")) / np.timedelta64(1, "D"))
