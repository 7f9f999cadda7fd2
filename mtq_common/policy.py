"""A trained run as an object: `load_policy(run_dir).book(prices)` gives the target book of `--mode act`.

    import pandas as pd
    from mtq_common import load_policy
    from mtq_common.evaluation.live_book import format_book

    policy = load_policy("models/checkpoints")  # a `pipeline.py --mode train` output folder
    prices = pd.read_csv("closes.csv", index_col="date", parse_dates=True)  # one column per instrument
    book = policy.book(prices, capital=100_000, holdings={"EURUSD": 20_000})
    print(format_book(book))

The run folder holds `pipeline.json` (the config the run was trained with, rebuilt by
`settings.config_from_dict`), `phase1/best.pt` (the instruments, sectors and bar frequency it was trained on)
and `phase3/best.pt` (the fine-tuned hierarchy). `pipeline.py` loads the hierarchy and checks the data with
the same functions (`load_hierarchy`, `trained_data`, `check_data`), so the CLI and this API cannot drift.

`import mtq_common` does not import this module until `mtq_common.load_policy` (or `Policy`) is first used, so
registering the Gymnasium ids stays light (see `mtq_common/__init__.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mtq_common.agents.nets import MetaController, SpecialistAgents
from mtq_common.data.csv_data import infer_bar_frequency
from mtq_common.data.market import MarketData
from mtq_common.data.splits import financed
from mtq_common.evaluation.live_book import target_book
from mtq_common.training import checkpoint as ckpt
from mtq_common.training.checkpoint import CheckpointError
from mtq_common.training.config import Config, ConfigError
from mtq_common.training.distributed import resolve_device
from mtq_common.training.settings import config_from_dict

UNTRAINED_HINT = "To write it, run `python pipeline.py --mode train` (or --mode resume)."
"""What to do when a run's checkpoint is missing or unreadable (not "nothing trained": a file may be corrupted)."""


def load_hierarchy(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[SpecialistAgents, MetaController]:
    """The fine-tuned hierarchy of `run_dir/phase3/best.pt`, in eval mode on `device`."""
    state = ckpt.load_checkpoint(Path(run_dir) / "phase3" / "best.pt", "phase3", hint=UNTRAINED_HINT)
    specialists = SpecialistAgents.from_spec(state["specialist_spec"])
    specialists.load_state_dict(state["specialists"])
    meta = MetaController.from_spec(state["meta_spec"])
    meta.load_state_dict(state["meta"])
    return specialists.to(device).eval(), meta.to(device).eval()


def trained_data(run_dir: str | Path) -> dict[str, Any]:
    """What the run was trained on, from `run_dir/phase1/best.pt`: `{"instruments", "sectors", "bars per year"}`
    (the last is None in a checkpoint written before the bar frequency was recorded)."""
    phase1 = ckpt.load_checkpoint(Path(run_dir) / "phase1" / "best.pt", "phase1", hint=UNTRAINED_HINT)
    return {"instruments": list(phase1["symbols"]), "sectors": list(phase1["sectors"]),
            "bars per year": phase1.get("bars_per_year")}  # fmt: skip


def check_data(market: MarketData, trained: dict[str, Any], run_dir: str | Path) -> None:
    """Refuse data whose instruments, sectors or bar frequency differ from the run's (`trained_data`)."""
    trained = dict(trained)
    if trained["bars per year"] is None:
        logging.getLogger("mtq").warning("%s does not record the bar frequency it was trained on: not checked",
                                         Path(run_dir) / "phase1" / "best.pt")  # fmt: skip
        trained.pop("bars per year")
    given = {"instruments": market.symbols, "sectors": market.sectors, "bars per year": market.bars_per_year}
    differ = [f"{key}: trained on {trained[key]}, given {given[key]}" for key in trained if trained[key] != given[key]]
    if differ:
        raise ConfigError(
            f"the data does not match the run trained in {run_dir}: " + "; ".join(differ) + ". Use data of the "
            "same instruments, sectors and bar frequency (the config's data.instruments and the files in --data-dir), "
            "or train a run on this data first."
        )


EXECUTION_KEYS = {
    "environment": ("transaction_cost", "max_position_size", "stop_loss_pct", "max_portfolio_var",
                    "max_correlation_exposure", "max_sector_allocation"),
    "risk": ("var_confidence", "correlation_window"),
}  # fmt: skip
"""The config values that decide a trained run's book beside its weights (costs, position size, stop-loss, the
portfolio limits, the risk model), with each instrument's `cost`, `cost_multiplier` and `spot`, and, where an
instrument is spot, the risk-free rate its positions pay. Not the data, contract sizes, budgets or reward
weights: `--mode act` reads new data and rounds to the broker's contracts."""


def execution_settings(config: dict, symbols: list[str]) -> dict[str, Any]:
    """`EXECUTION_KEYS` of a `Config.to_dict()` as `{"section.key": value}`, with each of `symbols`' costs and spot
    flag, and the risk-free rate where one of them is spot."""
    out = {f"{section}.{key}": config[section][key] for section, keys in EXECUTION_KEYS.items() for key in keys}
    specs = {symbol: config["instruments"].get(symbol, {}) for symbol in symbols}
    for symbol, spec in specs.items():
        keys = ("cost", "cost_multiplier", "spot")
        out |= {f"instruments.{symbol}.{key}": spec.get(key, "<absent>") for key in keys}
    spot = any(spec.get("spot") for spec in specs.values())  # (the rate moves a book of spot instruments only)
    out["reward.risk_free_rate"] = config["reward"]["risk_free_rate"] if spot else "unused: no spot instrument"
    return out


def check_execution_config(cfg: Config, run_dir: str | Path, trained: dict[str, Any], force: bool = False) -> None:
    """Refuse `cfg` where its execution (`EXECUTION_KEYS`, for the instruments of `trained_data`) differs from that
    of the config the run was trained with (`pipeline.json`), naming each difference: the book would not be the
    one the run's backtest trades.
    `force`: log the differences and go on. A run folder whose manifest records no readable config is not checked
    (a warning)."""
    log = logging.getLogger("mtq")
    try:
        run = read_run_config(run_dir).to_dict()
    except (CheckpointError, ConfigError) as err:  # (no manifest, or one this version cannot read)
        log.warning("the config's execution is not checked against the run's: %s", err)
        return
    ran, given = (execution_settings(c, trained["instruments"]) for c in (run, cfg.to_dict()))
    changed = [f"{key}: {ran[key]!r} in the run, {given[key]!r} now" for key in ran if ran[key] != given[key]]
    if not changed:
        return
    if force:
        log.warning("--force: trading with an execution other than the run's: %s", "; ".join(changed))
        return
    raise ConfigError(f"the config differs from the one {run_dir} was trained with (its pipeline.json) in how the "
                      f"book is traded: {'; '.join(changed)}. Pass the run's config (its data section may name new "
                      "data), or --force to trade with these values anyway.")  # fmt: skip


def read_run_config(run_dir: str | Path) -> Config:
    """The config a run was trained with: the `config` of `run_dir/pipeline.json`."""
    path = Path(run_dir) / "pipeline.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {run_dir} is not a `pipeline.py` run folder. {UNTRAINED_HINT}")
    manifest = ckpt.read_manifest(path)
    if not isinstance(manifest.get("config"), dict):
        raise CheckpointError(f"{path} holds no `config` mapping: not a manifest written by `pipeline.py`")
    return config_from_dict(manifest["config"], where=f"{path} (config)")


def market_from_prices(prices: pd.DataFrame, symbols: list[str], sectors: list[str]) -> MarketData:
    """A `MarketData` of close prices: a DataFrame with a strictly increasing, time-zone-naive DatetimeIndex
    and exactly one column per symbol of `symbols` (any order; reordered to `symbols`), every price finite and
    positive. The bar frequency is inferred as for CSV files (`csv_data.infer_bar_frequency`)."""

    if not isinstance(prices, pd.DataFrame):
        raise TypeError(f"prices must be a pandas DataFrame (one column per instrument), got {type(prices).__name__}")
    if not isinstance(prices.index, pd.DatetimeIndex):
        raise ValueError(
            f"prices must have a DatetimeIndex (the bar times), got a {type(prices.index).__name__}: e.g. "
            "pd.read_csv(path, index_col='date', parse_dates=True) or df.set_index(pd.to_datetime(df['date']))"
        )
    if prices.index.tz is not None:
        raise ValueError(
            f"the index is time-zone aware ({prices.index.tz}): convert it to naive times in the zone the run was "
            "trained in, e.g. df.tz_convert('America/New_York').tz_localize(None)"
        )
    columns = [str(c) for c in prices.columns]
    missing, extra = [s for s in symbols if s not in columns], [c for c in columns if c not in symbols]
    if missing or extra or len(set(columns)) != len(columns):
        raise ValueError(
            f"prices must have one column per instrument of the run: {', '.join(symbols)}; "
            f"missing: {', '.join(missing) or 'none'}; not traded by the run: {', '.join(extra) or 'none'}"
            + ("; some columns are duplicated" if len(set(columns)) != len(columns) else "")
        )
    if not prices.index.is_monotonic_increasing or prices.index.has_duplicates:
        raise ValueError("the index must be strictly increasing (one row per bar, oldest first): sort it and drop "
                         "duplicated times first (acting must not guess which row is the latest)")  # fmt: skip
    frame = prices.set_axis(columns, axis=1)[symbols]
    try:
        values = frame.to_numpy(dtype=np.float64, copy=True)  # writable: torch reads it
    except (TypeError, ValueError):
        bad = [c for c in symbols if not pd.api.types.is_numeric_dtype(frame[c])]
        raise ValueError(f"prices must be numbers; column(s) {', '.join(bad)} hold other values") from None
    bad_rows = ~(np.isfinite(values) & (values > 0))
    if bad_rows.any():
        t, i = np.argwhere(bad_rows)[0]
        raise ValueError(
            f"prices must be finite and positive: {symbols[i]} at {prices.index[t]} is {values[t, i]} "
            f"({int(bad_rows.sum())} such value(s)); fill or drop them first, e.g. df.ffill()"
        )
    timestamps = prices.index.to_numpy(dtype="datetime64[ns]", copy=True)
    bars_per_year, bars_per_day = infer_bar_frequency(timestamps)
    return MarketData(symbols=list(symbols), sectors=list(sectors), prices=values, timestamps=timestamps,
                      bars_per_year=bars_per_year, bars_per_day=bars_per_day, source="csv", split="all")  # fmt: skip


class Policy:
    """A trained hierarchy and its config, ready to give target books (see `load_policy`)."""

    def __init__(self, run_dir: Path, cfg: Config, specialists, meta, trained: dict, device):
        self.run_dir, self.cfg, self.device = run_dir, cfg, device
        self.specialists, self.meta, self.trained = specialists, meta, trained

    @property
    def symbols(self) -> list[str]:
        """The instruments the run trades, in its order (the columns `book` needs)."""
        return list(self.trained["instruments"])

    def book(self, prices: pd.DataFrame, holdings: Mapping[str, float] | None = None,
             capital: float | None = None) -> dict:  # fmt: skip
        """The target book for the bar after `prices`' last row: the dict `pipeline.py --mode act` writes.

        `prices`: close prices, one column per instrument of the run (`symbols`, any order) and a strictly
        increasing DatetimeIndex, at least the warm-up long (`live_book.warmup_needed`). `capital` (the account's
        value) adds notionals, units rounded to whole contracts and the trades in units; `holdings` (units held
        per symbol, a dict or a pandas Series; symbols left out hold none) needs `capital` and replaces the
        model's own simulated holdings as the book the trades start from. The data's age is not checked."""
        market = financed(market_from_prices(prices, self.symbols, list(self.trained["sectors"])), self.cfg)
        check_data(market, self.trained, self.run_dir)
        return target_book(self.specialists, self.meta, market, self.cfg, capital, self.device,
                           holdings=None if holdings is None else dict(holdings))  # fmt: skip


def load_policy(run_dir: str | Path, device: str = "cpu") -> Policy:
    """The trained run in `run_dir` (a `pipeline.py --mode train` output folder) as a `Policy`: its config
    from `pipeline.json`, its hierarchy from `phase3/best.pt`, its instruments from `phase1/best.pt`."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    device = resolve_device(device)
    specialists, meta = load_hierarchy(run_dir, device)
    return Policy(run_dir, cfg, specialists, meta, trained_data(run_dir), device)
