"""The train, validation and test splits a run reads (`load_splits`): the built-in market's three paths, a
CSV folder's split by `data.splits`, or one fold of walk-forward windows.

Walk-forward: K folds that each train on the past, validate on the next block, test on the one after. The
whole series of T bars (CSV: the three splits joined back together; synthetic: one path of `train_bars +
val_bars + test_bars` bars from one stream) is cut as follows, with `E = round(T * splits[0])` bars of first
training window and the `T - E` bars after it in `K + 1` equal blocks of `L` bars:

    fold k:  train  bars [0, E + k L)                    (an expanding window)
             val    bars [E + k L, E + (k + 1) L)          (the next block)
             test   bars [E + (k + 1) L, E + (k + 2) L)    (the block after it)

so the K test blocks are consecutive and, stitched, form one out-of-sample series of `K L` bars. A
validation or test split also carries the `W` bars before its block (`W` = the environments' warm-up,
the longest feature window): features are causal, so these past bars only let the features be defined
from the block's first bar, where trading starts (`tables.build_tables`' first tradable bar is `W`). No
bar is traded by two splits of one fold, and no fold trains on a bar it validates or tests on (tested).

The pipeline (`--mode walkforward`) sets `data.folds` and `data.fold` in a per-fold config, so every
phase script of a fold reads its windows through `splits.load_splits`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from mtq_common.data.csv_data import load_csv_market, load_csv_series
from mtq_common.data.features import FEATURE_WINDOW
from mtq_common.data.market import MarketData
from mtq_common.data.synthetic import config_options, generate_market, synthetic_splits

MIN_BLOCK = 50
"""The shortest validation/test block (bars): fewer make a meaningless backtest."""


@dataclass(frozen=True)
class FoldBounds:
    """Bar ranges `[start, stop)` of one fold in the whole series (`warmup` bars precede val and test)."""

    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]
    warmup: int


def fold_bounds(num_bars: int, folds: int, first_train_fraction: float, warmup: int) -> list[FoldBounds]:
    """The K folds' windows (module docstring); a clear `ValueError` when the data cannot hold them."""
    if folds < 2:
        raise ValueError(f"walk-forward needs at least 2 folds, got --folds {folds}")
    first = int(round(num_bars * first_train_fraction))
    block = (num_bars - first) // (folds + 1)
    if block < MIN_BLOCK or first < warmup + MIN_BLOCK:
        most = max(1, (num_bars - first) // MIN_BLOCK - 1)
        raise ValueError(
            f"--folds {folds} does not fit {num_bars} bars: after a first training window of {first} bars "
            f"(data.splits[0] = {first_train_fraction:g}), {folds + 1} blocks of {block} bars remain, and each "
            f"validation/test block needs at least {MIN_BLOCK}. Use at most {most} folds, or more data."
        )
    out = []
    for k in range(folds):
        val_start = first + k * block
        out.append(
            FoldBounds(
                train=(0, val_start),
                val=(val_start, val_start + block),
                test=(val_start + block, val_start + 2 * block),
                warmup=warmup,
            )
        )
    return out


def financed(market: MarketData, cfg) -> MarketData:
    """`market` with the financing its config's spot instruments pay (`instruments.SYMBOL.spot`): the risk-free
    rate per bar on what a position holds, deducted from their returns (`MarketData.financing`). Every market a
    run trades or fits on comes through here."""
    per_bar = cfg.reward.risk_free_rate / market.bars_per_year
    rates = np.array([per_bar if cfg.instruments[s].spot else 0.0 for s in market.symbols])
    return dataclasses.replace(market, financing=rates if rates.any() else None)


def spot_symbols(cfg, symbols: list[str]) -> list[str]:
    """The instruments of `symbols` that the config trades as spot (financed) instruments, for the report."""
    return [s for s in symbols if cfg.instruments[s].spot]


def full_market(cfg, strict_order: bool = False) -> MarketData:
    """The whole series the folds are cut from (module docstring), financed; `strict_order`: CSV rows out of order
    are an error, not repaired (`load_csv_series`; what `--mode act` reads)."""
    if cfg.data.source == "csv":
        market = load_csv_series(cfg.data.data_dir, list(cfg.data.instruments),
                                 {s: cfg.sector_of(s) for s in cfg.data.instruments}, strict_order=strict_order,
                                 csv=cfg.data.csv, allow_partial_overlap=cfg.data.allow_partial_overlap)  # fmt: skip
        return financed(market, cfg)
    s = cfg.data.synthetic
    symbols = list(cfg.data.instruments)
    market = generate_market(
        symbols,
        [cfg.sector_of(x) for x in symbols],
        [cfg.instruments[x].annual_vol for x in symbols],
        s.train_bars + s.val_bars + s.test_bars,
        seed=s.seed,
        split="train",
        **config_options(cfg, symbols),
    )
    return financed(market, cfg)


def warmup_bars(cfg) -> int:
    """Bars of history a split needs before its first tradable bar (the environments' first bar)."""
    return max(FEATURE_WINDOW, cfg.environment.warmup_steps, 1)


def fold_splits(cfg) -> dict[str, MarketData]:
    """Train, validation and test `MarketData` of fold `cfg.data.fold` of `cfg.data.folds`."""
    market = full_market(cfg)
    bounds = fold_bounds(market.num_bars, cfg.data.folds, cfg.data.splits[0], warmup_bars(cfg))[cfg.data.fold]
    w = bounds.warmup
    return {
        "train": market.window(*bounds.train, split="train"),
        "val": market.window(bounds.val[0] - w, bounds.val[1], split="val"),
        "test": market.window(bounds.test[0] - w, bounds.test[1], split="test"),
    }


def load_splits(cfg) -> dict[str, MarketData]:
    """Train, validation and test `MarketData` for a `Config`: synthetic, or CSV when `data.source` is csv.

    CSV splits must each hold at least the feature window plus a few bars; shorter data is refused
    by the loader with the row counts it found.
    """
    if cfg.data.folds:
        return fold_splits(cfg)  # (cut from `full_market`, financed)
    if cfg.data.source == "csv":
        splits = load_csv_market(
            cfg.data.data_dir,
            list(cfg.data.instruments),
            {s: cfg.sector_of(s) for s in cfg.data.instruments},
            splits=tuple(cfg.data.splits),
            min_bars_per_split=FEATURE_WINDOW + 10,
            csv=cfg.data.csv,
            allow_partial_overlap=cfg.data.allow_partial_overlap,
        )
    else:
        splits = synthetic_splits(cfg)
    return {name: financed(market, cfg) for name, market in splits.items()}
