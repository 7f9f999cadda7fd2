"""What to hold now: the trained hierarchy's target book for the bar after the data's last one.

`target_book` runs the system causally over the data, one continuous backtest from its first tradable bar,
exactly as the test evaluation trades (`backtest.run_backtests` with one segment): the features,
the specialists' own books and stop-loss state, the meta-controller's observation and holdings, the
drifting account and the risk manager's covariance all evolve bar by bar. At the last bar, whose next
return is not known yet, the hierarchy proposes and the environment's `preview` applies the stop-loss
lock and the risk manager without stepping: the executed book of that bar, which is what the test
backtest would have traded at it (a test cuts the test split at several bars and compares).

The book the trades start from is the model's own simulated holdings, or, given `holdings` (units held per
instrument, e.g. `pipeline.py --mode act --holdings FILE`, read by `read_holdings`), the user's. With a
`capital`, every target is turned into units, `weight x capital / close`, rounded to whole contracts of
the instrument's `instruments.SYMBOL.contract_size` (default 1 unit); what the rounding leaves untraded is
reported per instrument and in total (`residual_weight`, `residual_notional`, the book's
`rounding_residual`). The trade in units takes the held book to the rounded target exactly: held units
plus trade units equal the target units (whole contracts whenever the holding is).

It is a decision aid, not a broker: nothing is sent anywhere, no order is routed, and prices are the last
closes of the data (no live quotes).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from kernels import LIMIT_NAMES, NOT_APPLIED
from mtq_common.agents.hierarchy import HierarchyPolicy, instrument_specialist_index
from mtq_common.data.market import MarketData, iso_time
from mtq_common.data.splits import warmup_bars
from mtq_common.data.tables import build_tables
from mtq_common.envs.portfolio_env import PortfolioEnv
from mtq_common.training.config import Config, ConfigError


def warmup_needed(cfg: Config) -> int:
    """The fewest bars `target_book` accepts: the environments' warm-up plus two bars."""
    return warmup_bars(cfg) + 2


@torch.no_grad()
def target_book(specialists, meta, market: MarketData, cfg: Config, capital: float | None = None,
                device: str | torch.device = "cpu", holdings: Mapping[str, float] | None = None,
                holdings_source: str = "holdings") -> dict:  # fmt: skip
    """The target book at `market`'s last bar (module docstring); a JSON-ready dict. `holdings`: units held per
    symbol (symbols left out hold none; needs `capital`); `holdings_source` names them in errors and the book."""
    if capital is not None and not (math.isfinite(capital) and capital > 0):
        raise ValueError(f"capital {capital}: accepted a positive amount")
    held_units = None
    if holdings is not None:
        if capital is None:
            raise ValueError(f"{holdings_source}: holdings in units need the account's capital (--capital) to "
                             "become weights")  # fmt: skip
        held_units = check_holdings(holdings, market.symbols, holdings_source)
    if market.num_bars < warmup_needed(cfg):
        raise ValueError(
            f"the data has {market.num_bars} bars; acting needs at least {warmup_needed(cfg)} (a warm-up of "
            f"{warmup_needed(cfg) - 2} bars for the features and the risk model, then bars to trade)"
        )
    tables = build_tables(market, cfg, device)
    last = market.num_bars - 1
    whole = dataclasses.replace(cfg, environment=dataclasses.replace(cfg.environment, episode_length=market.num_bars))
    env = PortfolioEnv(market, whole, 1, device=device, torch_mode=True, tables=tables, score=False)
    env.autoreset = False  # the run ends at the last bar and stays there
    env.reset(seed=0)
    obs = env.start_at(tables.first_bar)
    owner = instrument_specialist_index(market.sectors, specialists.names).to(device)
    policy = HierarchyPolicy(specialists, meta, owner, cfg.environment.max_position_size, 1, device, market)
    for _ in range(last - tables.first_bar):  # every bar with a known next return, in order
        proposed = policy.propose(obs, env)
        obs, _, _, truncated, info = env.step(proposed, policy.own_positions)
        # the data's end is not the end of the run: the policy keeps its state (in the backtest of longer
        # data this bar is an ordinary one)
        policy.observe(info, torch.zeros_like(truncated))
    proposed = policy.propose(obs, env)
    proposal, own, risk = env.preview(proposed, policy.own_positions)

    closes = market.prices[last]
    held = env.holdings[0].double().cpu().numpy()  # the model's simulated weights before this bar's trade
    if held_units is not None:
        held = held_units * closes / capital
    k_of = {name: k for k, name in enumerate(specialists.names)}
    # the appetite traded (a risk-timing meta-controller's tracker holds its factor over the rule's appetite)
    allocation = policy.last_allocation[0]
    appetite = 1.0 if policy.last_appetite is None else float(policy.last_appetite[0])
    when = iso_time(market.timestamps[last], market.bars_per_day)
    instruments = {}
    for i, symbol in enumerate(market.symbols):
        weight = float(risk.weights[0, i])
        row = {
            "time": when,
            "close": float(closes[i]),
            "specialist": market.sectors[i],
            "signal": float(own[0, i]),
            "allocation": float(allocation[k_of[market.sectors[i]]]),
            "risk_appetite": appetite,
            "sizing": 1.0 if policy.scale is None else float(policy.scale[i]),  # Phase 3's joint sizing, if kept
            "proposed_weight": float(proposal[0, i]),
            "executed_weight": weight,
            "current_weight": float(held[i]),
            "trade_weight": weight - float(held[i]),
        }
        if capital is not None:
            size = cfg.instruments[symbol].contract_size
            if held_units is None:  # the simulated book, held in whole contracts like the target
                units_held = whole_contracts(float(held[i]) * capital / float(closes[i]), size) * size
            else:
                units_held = float(held_units[i])
            row.update(contract_units(weight, units_held, float(closes[i]), capital, size))
        instruments[symbol] = row
    residual = None
    if capital is not None:
        w = np.array([r["residual_weight"] for r in instruments.values()])
        n = np.array([r["residual_notional"] for r in instruments.values()])
        residual = {"gross_weight": float(np.abs(w).sum()), "net_weight": float(w.sum()),
                    "gross_notional": float(np.abs(n).sum()), "net_notional": float(n.sum())}  # fmt: skip
    limits = {k: (None if v == NOT_APPLIED else v) for k, v in dataclasses.asdict(env.limits).items()}
    return {
        "last_bar": when,
        "bars_used": market.num_bars,
        "capital": capital,
        "holdings": "simulated (the model's own book)" if held_units is None else f"given: {holdings_source}",
        "instruments": instruments,
        "book": {
            "gross": float(risk.weights[0].abs().sum()),
            "net": float(risk.weights[0].sum()),
            "var": float(risk.var[0]),
            "correlation_exposure": float(risk.correlation_exposure[0]),
            "sector_shares": dict(zip(env.sectors, risk.sector_allocation[0].tolist(), strict=True)),
            "binding": {name: bool(risk.binding[0, k]) for k, name in enumerate(LIMIT_NAMES)},
            "gross_kept": float(risk.gross_kept[0]),
            "turnover": float(np.abs(risk.weights[0].double().cpu().numpy() - held).sum()),
            "rounding_residual": residual,
        },
        "limits": {**limits, "notes": list(env.limit_notes)},
    }


def whole_contracts(units: float, contract_size: float) -> int:
    """`units` as the nearest whole number of contracts of `contract_size` units (halves to even)."""
    return int(round(units / contract_size))


def contract_units(weight: float, held_units: float, close: float, capital: float, contract_size: float) -> dict:
    """One instrument's target weight in units and whole contracts, the trade from `held_units` to it, and
    what the rounding leaves untraded (as a weight of `capital` and as a notional)."""
    target = weight * capital / close
    contracts = whole_contracts(target, contract_size)
    units = contracts * contract_size
    return {
        "contract_size": contract_size,
        "notional": weight * capital,
        "target_units": target,
        "contracts": contracts,
        "units": units,
        "held_units": held_units,
        "trade_units": units - held_units,
        "trade_contracts": contracts - held_units / contract_size,
        "residual_weight": weight - units * close / capital,
        "residual_notional": weight * capital - units * close,
    }


HOLDINGS_FORMATS = (
    'a CSV file with the header `symbol,units` and one row per instrument, or a JSON object {"SYMBOL": units}'
)


def read_holdings(path: str | Path) -> dict[str, object]:
    """The units held per symbol in `path` (`--holdings`), as written: a `.json` file holds one object
    `{SYMBOL: units}`, any other file is a CSV with the columns `symbol` and `units` (any order, more columns
    ignored). `check_holdings` checks the symbols and the numbers."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--holdings {path}: file not found; expected {HOLDINGS_FORMATS}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:  # (a binary file, say: the error must name the file)
        raise ConfigError(f"--holdings {path}: not a readable text file ({exc}); expected {HOLDINGS_FORMATS}") from None
    if path.suffix.lower() == ".json":
        try:
            held = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"--holdings {path}: not valid JSON ({exc}); expected {HOLDINGS_FORMATS}") from None
        if not isinstance(held, dict):
            raise ConfigError(f"--holdings {path}: holds a {type(held).__name__}; expected {HOLDINGS_FORMATS}")
        return held
    rows = [row for row in csv.reader(text.splitlines()) if any(cell.strip() for cell in row)]
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    if "symbol" not in header or "units" not in header:
        raise ConfigError(
            f"--holdings {path}: the header is {rows[0] if rows else 'missing'}; expected {HOLDINGS_FORMATS}"
        )
    at_symbol, at_units = header.index("symbol"), header.index("units")
    held = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) <= max(at_symbol, at_units):
            raise ConfigError(f"--holdings {path}, row {line}: {row} has no symbol or no units")
        symbol = row[at_symbol].strip()
        if symbol in held:
            raise ConfigError(f"--holdings {path}, row {line}: {symbol} is listed twice; list each instrument once")
        held[symbol] = row[at_units].strip()
    return held


def check_holdings(holdings: Mapping, symbols: list[str], where: str) -> np.ndarray:
    """Units held per instrument of `symbols` (0 for one left out) from `holdings` (symbol -> units: a number,
    or its text as a CSV holds it); unknown symbols and values that are not finite numbers are refused."""
    if not isinstance(holdings, Mapping):
        raise ValueError(f"{where}: expected a mapping of symbol to units held, got {type(holdings).__name__}")
    unknown = [str(s) for s in holdings if s not in symbols]
    if unknown:
        raise ValueError(f"{where}: unknown symbol(s) {', '.join(unknown)}; the run trades {', '.join(symbols)}")
    units = np.zeros(len(symbols))
    for symbol, value in holdings.items():
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(
                f"{where}: the units of {symbol} are {value!r}; expected a finite number (negative: short)"
            )
        units[symbols.index(symbol)] = number
    return units


def format_book(book: dict) -> str:
    """The target book as plain-text tables: the weights, then (with a capital) units and contracts."""
    header = ["instrument", "close", "signal", "alloc", "proposed", "executed", "current", "trade"]
    lines = ["  ".join(f"{h:>11}" for h in header)]
    for symbol, r in book["instruments"].items():
        cells = [symbol, f"{r['close']:.4g}", f"{r['signal']:+.3f}", f"{r['allocation']:.3f}",
                 f"{r['proposed_weight']:+.4f}", f"{r['executed_weight']:+.4f}", f"{r['current_weight']:+.4f}",
                 f"{r['trade_weight']:+.4f}"]  # fmt: skip
        lines.append("  ".join(f"{c:>11}" for c in cells))
    if book["capital"] is not None:
        lines.append(f"in units of a capital of {book['capital']:,.2f}, rounded to whole contracts:")
        header = ["instrument", "contract", "target units", "units", "held units", "trade units", "trade contr",
                  "residual"]  # fmt: skip
        lines.append("  ".join(f"{h:>12}" for h in header))
        for symbol, r in book["instruments"].items():
            cells = [symbol, f"{r['contract_size']:g}", f"{r['target_units']:+.2f}", f"{r['units']:+.6g}",
                     f"{r['held_units']:+.6g}", f"{r['trade_units']:+.6g}", f"{r['trade_contracts']:+.6g}",
                     f"{r['residual_notional']:+,.2f}"]  # fmt: skip
            lines.append("  ".join(f"{c:>12}" for c in cells))
    b = book["book"]
    bound = [name for name, on in b["binding"].items() if on] or ["none"]
    lines.append(
        f"book: gross {b['gross']:.4f}, net {b['net']:+.4f}, one-day VaR {b['var']:.4%}, correlation exposure "
        f"{b['correlation_exposure']:.3f}, sector shares "
        + ", ".join(f"{s} {v:.1%}" for s, v in b["sector_shares"].items())
        + f"; limits that bound: {', '.join(bound)}; turnover to reach it {b['turnover']:.4f}"
    )
    lines.append(f"held book: {book['holdings']}")
    residual = b["rounding_residual"]
    if residual is not None:
        lines.append(
            f"rounding to whole contracts leaves untraded: {residual['gross_weight']:.4%} of the capital in all "
            f"({residual['gross_notional']:,.2f}), net {residual['net_weight']:+.4%} ({residual['net_notional']:+,.2f})"
        )
    return "\n".join(lines)


def stale_days(market: MarketData, as_of: np.datetime64) -> float:
    """Calendar days from the data's last bar to `as_of`."""
    return float((as_of - np.datetime64(market.timestamps[-1], "s")) / np.timedelta64(1, "D"))
