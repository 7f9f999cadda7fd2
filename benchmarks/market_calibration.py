"""Measure what the synthetic market allows: Sharpe of the oracle, the trend filter, momentum and buy-and-hold.

    python -m benchmarks.market_calibration [--bars 100000] [--seed 7] [--json out.json]

Each rule trades every instrument at unit size with each instrument's configured cost per unit of
turnover (plain vectorised backtest: no stop-loss, no risk manager); the table is per instrument plus an
equally weighted portfolio of the eight. These are the reference points the README quotes: the oracle
(it knows the latent drift) is an upper reference, momentum a plain rule, and the trend filter the rule
with a no-trade band whose half-life and band are picked on the config's training split (never on the
path measured here, a fresh one of the `test` stream). `oracle_sized` knows the drift too and sizes by it,
`clip(drift / (k sigma_i), -1, 1)` (`sigma_i` the instrument's bar volatility, `k` picked on the training
split): the ceiling of direction and size together, where the sign oracle is that of direction alone.
`vol_managed_trend_filter` scales the trend filter's book by the volatility appetite
`min(1, (sigma* / sigma_t)^p)` (levels from the training split, half-life and p picked on the validation split,
`rules.pick_vol_timing`); the equal allocation and its
volatility-managed form need trained specialists and are in the pipeline's reports, not here.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from benchmarks import cli
from mtq_common.data.splits import financed, load_splits
from mtq_common.data.synthetic import config_options, generate_market
from mtq_common.data.tables import cost_rates
from mtq_common.data.volatility import fit_vol_levels, vol_appetite
from mtq_common.evaluation.metrics import sharpe
from mtq_common.evaluation.rules import (
    backtest,
    buy_and_hold_positions,
    fit_scaled_trend,
    fit_trend_for,
    momentum_positions,
    oracle_positions,
    pick_vol_timing,
    scaled_trend_positions,
    trend_filter_positions,
)
from mtq_common.training.checkpoint import atomic_write_json
from mtq_common.training.config import ConfigError
from mtq_common.training.settings import load_config

ORACLE_SCALES = (0.05, 0.1, 0.2, 0.4, 0.8)
"""Candidate drift-to-volatility ratios `k` at which the sized oracle reaches the position limit."""


def sized_oracle_positions(market, k: float) -> np.ndarray:
    """Positions `clip(expected_return / (k sigma_i), -1, 1)` [T, N] (the drift net of financing), `sigma_i` the
    standard deviation of the instrument's bar returns on `market` (synthetic data only: the drift is known)."""
    return np.clip(market.expected_return / (k * market.returns[1:].std(0)), -1.0, 1.0)


def fit_oracle_scale(train, cost: np.ndarray) -> float:
    """The `k` of `ORACLE_SCALES` whose sized oracle has the best portfolio Sharpe on the training split."""

    def score(k):
        return sharpe(backtest(sized_oracle_positions(train, k), train.returns, cost).mean(axis=1), train.bars_per_year)

    return max(ORACLE_SCALES, key=score)


@dataclass
class Args:
    config: str = "config/agents.yaml"
    """YAML config (instruments, costs, synthetic-market settings)."""
    bars: int = 100_000
    """Bars to generate."""
    seed: int = 7
    """Market seed."""
    json: str | None = None
    """Also write the table as JSON to this path."""


def main(args: Args) -> dict:
    if args.bars < 200:  # (what a synthetic split accepts: the features need 100 bars of history)
        raise ConfigError(f"--bars {args.bars}: accepted a whole number >= 200")
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed {args.seed}: accepted a whole number 0 <= seed < 2**32")
    cfg = load_config(args.config)
    symbols = cfg.data.instruments
    s = cfg.data.synthetic
    start = time.perf_counter()
    market = generate_market(
        symbols,
        [cfg.sector_of(x) for x in symbols],
        [cfg.instruments[x].annual_vol for x in symbols],
        args.bars,
        seed=args.seed,
        split="test",
        **config_options(cfg, symbols),
    )
    market = financed(market, cfg)  # (spot instruments pay the cash rate, as in every run)
    seconds = time.perf_counter() - start
    cost = cost_rates(market, cfg, "cpu").double().numpy()
    splits = load_splits(cfg)
    trend = fit_trend_for(splits["train"], cfg)
    levels, val = fit_vol_levels(splits["train"]), splits["val"]
    val_positions = trend_filter_positions(val.prices, trend)[:-1]  # the rule's book on validation, for the pick
    timing = pick_vol_timing(val, levels, np.arange(len(val_positions)), (val_positions * val.returns[1:]).sum(-1),
                             val_positions, len(val_positions), cost_rates(val, cfg, "cpu").double().numpy(),
                             cfg.reward.risk_free_rate)  # fmt: skip
    train_cost = cost_rates(splits["train"], cfg, "cpu").double().numpy()
    scale = fit_oracle_scale(splits["train"], train_cost)
    scaled = fit_scaled_trend(splits["train"], train_cost, 1.0)  # rate 1: this table rebalances every bar
    rules = {
        "oracle": oracle_positions(market.expected_return),
        "oracle_sized": sized_oracle_positions(market, scale),
        "trend_filter": trend_filter_positions(market.prices, trend),
        "scaled_trend": scaled_trend_positions(market.prices, scaled),
        "vol_managed_trend_filter": trend_filter_positions(market.prices, trend)
        * vol_appetite(market, levels, timing)[:, None],
        "momentum": momentum_positions(market.prices),
        "buy_and_hold": buy_and_hold_positions(market.prices),
    }
    table = {}
    for name, positions in rules.items():
        net = backtest(positions, market.returns, cost)
        row = dict(zip(symbols, np.round(sharpe(net, market.bars_per_year), 2).tolist(), strict=True))
        row["portfolio"] = round(sharpe(net.mean(axis=1), market.bars_per_year), 2)
        table[name] = row
    print(f"synthetic market: {args.bars} bars x {len(symbols)} instruments generated in {seconds:.3f} s")
    costs = [round(c, 6) for c in cost.tolist()]
    print(f"drift_half_life={s.drift_half_life} drift_scale={s.drift_scale} cost per unit of turnover={costs}")
    print(f"trend_filter: half-life {trend.half_life}, band {trend.band} (picked on the training split)")
    print(f"scaled_trend: half-life {scaled.half_life}, scale {scaled.scale} (picked on the training split)")
    print(f"oracle_sized: full position at drift = {scale} x the bar volatility (picked on the training split)")
    print(f"vol_managed_trend_filter: half-life {timing.half_life}, power {timing.power} (picked on the validation "
          f"split, Sharpe there {timing.val_sharpe:.2f})")  # fmt: skip
    header = f"{'rule':<26}" + "".join(f"{x:>10}" for x in [*symbols, "portfolio"])
    print(header)
    for name, row in table.items():
        print(f"{name:<26}" + "".join(f"{v:>10.2f}" for v in row.values()))
    result = {"bars": args.bars, "seed": args.seed, "generate_seconds": seconds, "sharpe": table,
              "trend_filter": {"half_life": trend.half_life, "band": trend.band}, "oracle_scale": scale,
              "scaled_trend": dataclasses.asdict(scaled),
              "vol_managed_trend_filter": dataclasses.asdict(timing)}  # fmt: skip
    if args.json:
        atomic_write_json(args.json, result, sort_keys=False)
    return result


if __name__ == "__main__":
    cli(main, Args, "market_calibration")
