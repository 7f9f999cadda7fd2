"""What could the meta-controller add over the volatility-managed equal allocation? Its headroom, per seed.

    python -m benchmarks.meta_headroom --runs runs/bench_s7/default [--seeds 1 2 3 4 5] [--config C] [--json out.json]

The risk-timing meta-controller starts at the volatility-managed equal allocation and learns a residual over
it (DESIGN section 14): it can time risk and move capital between the specialists. Before asking PPO to beat
that rule, measure what each is worth. For each seed's pipeline run (`--runs/seed_S`, its Phase 3
specialists: those the report's equal allocation uses), on the test split, through the report's own backtest
(one continuous backtest, execution alike, the risk manager, cost 0.003 per unit of turnover):

* `vol_managed_equal_allocation`: the equal allocation scaled by `min(1, (sigma* / sigma_t)^p)`, half-life
  and p picked on validation (the report's rule);
* `learned_timing`: the equal allocation scaled by `sigmoid(w . x_t + b)` of the evidence the meta-controller
  sees, `x_t` = the volatility ratios `log(sigma_t / sigma*)` at the three half-lives and the book's own recent
  return (EWMAs of half-life 5, 20, 60 bars of the unscaled book's returns up to the bar before);
* `learned_allocation`: the volatility-managed book with the capital moved between the specialists by
  `softmax(W x_t)`, `x_t` = each specialist's recent sleeve return (EMAs of half-life 5, 20, 60 bars, up to
  the bar before), fit alone;
* `phase2_start`: what Phase 2 fits and starts from (`evaluation.allocation_fit`): that allocation and a
  fitted factor on the volatility-managed rule's appetite, one map of the sleeves and the volatility ratios;
* `regime_timing` (synthetic markets only; **look-ahead**, not a tradable policy): the equal allocation scaled
  by `min(1, (m* / m_t)^p)`, `m_t` the true volatility multiplier of the regime the position is chosen in,
  `m*` its median on train, p picked on validation: the ceiling of pure risk timing, as the `oracle` baseline
  is of direction;

and the system itself (`phase3/best.pt`). The learned maps are linear in features standardised on train and
fit on the training split by gradient ascent on the Sharpe ratio of the book after costs (Adam, 600 steps; a
plain vectorised backtest of the unscaled book, as `rules.pick_vol_timing` ranks its candidates): what a
learned meta-controller could reach from that evidence without the noise of RL. Each row's difference to the
volatility-managed rule comes with its paired 90% interval (`bootstrap.paired_sharpe_difference`). Nothing
here is fit on the test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks import cli
from benchmarks.run import machine
from mtq_common.agents.hierarchy import HierarchyPolicy, compose_weights, instrument_specialist_index, timing_spec
from mtq_common.data.market import MarketData
from mtq_common.data.splits import load_splits
from mtq_common.data.synthetic import REGIME_VOL
from mtq_common.data.tables import cost_rates
from mtq_common.data.volatility import VolLevels, fit_vol_levels, market_sigma, vol_appetite
from mtq_common.evaluation.allocation_fit import (
    allocation_scale,
    causal_ewma,
    fit_allocation_rule,
    fit_linear,
    rule_book,
    rule_inputs,
    scaled_sharpe,
    sleeve_features,
)
from mtq_common.evaluation.backtest import Backtest, run_backtests
from mtq_common.evaluation.bootstrap import paired_sharpe_difference
from mtq_common.evaluation.portfolio_eval import validation_timings, vol_managed
from mtq_common.evaluation.rules import fit_trend_for
from mtq_common.policy import load_hierarchy
from mtq_common.training.checkpoint import atomic_write_json
from mtq_common.training.settings import load_config

PERFORMANCE_HALF_LIVES = (5, 20, 60)
POWERS = (1, 2)
POLICIES = ("equal_allocation", "vol_managed_equal_allocation", "learned_timing", "learned_allocation", "phase2_start",
            "regime_timing", "system")  # fmt: skip
LABELS = dict(zip(POLICIES, ("eq.alloc", "vm eq.alloc", "timing", "allocation", "p2 start", "regime*", "system"),
                  strict=True))  # fmt: skip


@dataclass
class Args:
    runs: str
    """Folder of the pipeline runs, one `seed_S` per seed (a `benchmarks.run` group: OUT/default)."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """Seeds to read."""
    config: str | None = None
    """The runs' YAML config (unset: the built-in synthetic market)."""
    json: str | None = None
    """Also write the table as JSON to this path."""


def timing_features(market: MarketData, levels: VolLevels, bt: Backtest) -> np.ndarray:
    """[T', F] at the backtest's bars: the volatility ratios, then the unscaled book's recent returns (per 1e-3)."""
    gross = (bt.weights * bt.bar_returns).sum(-1)
    pairs = zip(levels.half_lives, levels.sigma_star, strict=True)
    vol = [np.log(market_sigma(market, levels, h) / star)[bt.bars] for h, star in pairs]
    own = [causal_ewma(gross, h) * 1e3 for h in PERFORMANCE_HALF_LIVES]  # (across a segment's start: fine on train)
    return np.stack(vol + own, -1)


def timing_scale(z):
    """The learned timing's appetite [T', 1] from its linear output."""
    return torch.sigmoid(z)


class TablePolicy:
    """The equal allocation's specialists traded with a per-bar allocation `[T, K]` and appetite `[T]` from
    tables (indexed by the market's bar, as the volatility-managed baselines are)."""

    def __init__(self, inner: HierarchyPolicy, allocation: np.ndarray, appetite: np.ndarray, size: float):
        self.inner, self.size = inner, size
        self.allocation = torch.as_tensor(allocation, dtype=torch.float32)
        self.appetite = torch.as_tensor(appetite, dtype=torch.float32)
        self.own_positions = inner.own_positions

    def propose(self, obs: dict, env) -> torch.Tensor:
        self.inner.propose(obs, env)
        self.own_positions = self.inner.own_positions
        allocation, appetite = self.allocation.index_select(0, env.bar), self.appetite.index_select(0, env.bar)
        return compose_weights(allocation, appetite, self.own_positions, self.inner.owner, self.size)

    def observe(self, info: dict, done: torch.Tensor) -> None:
        self.inner.observe(info, done)


def on_bars(values: np.ndarray, bars: np.ndarray, num_bars: int, fill: float) -> np.ndarray:
    """A per-bar table [num_bars, ...] from `values` at `bars` (`fill` elsewhere: bars no position is chosen at)."""
    out = np.full((num_bars, *values.shape[1:]), fill)
    out[bars] = values
    return out


def seed_row(run: Path, cfg, splits: dict, levels: VolLevels, trend) -> dict:
    specialists, meta = load_hierarchy(run)
    size, rf, k = cfg.environment.max_position_size, cfg.reward.risk_free_rate, len(specialists.names)
    test = splits["test"]
    owner = {s: instrument_specialist_index(m.sectors, specialists.names) for s, m in splits.items()}

    def equal(split):
        return lambda rows: HierarchyPolicy(specialists, None, owner[split], size, rows, "cpu")

    def tables(allocation, appetite):
        return lambda rows: TablePolicy(equal("test")(rows), allocation, appetite, size)

    # the unscaled book on each split: what the learned maps are fit (train) and picked (val) on, and read (test)
    unscaled = {
        s: run_backtests(splits[s], cfg, {"ea": equal(s)}, 8 if s != "test" else 1, "cpu")["ea"] for s in splits
    }
    costs = {s: cost_rates(splits[s], cfg, "cpu").double().numpy() for s in splits}
    timings = validation_timings(specialists, splits["val"], cfg, trend, levels)
    vm = timings["vol_managed_equal_allocation"]
    train, ea = unscaled["train"], unscaled["test"]
    mean, std, w, b = fit_linear(timing_features(splits["train"], levels, train), 1, timing_scale, train,
                                 costs["train"], bias=2.0)  # start near full appetite  # fmt: skip
    x = (timing_features(test, levels, ea) - mean) / std
    learned_appetite = on_bars(timing_scale(torch.as_tensor(x @ w + b))[:, 0].numpy(), ea.bars, test.num_bars, 1.0)
    sleeves = sleeve_features(train, owner["train"].numpy(), k, size)
    alone = allocation_scale(vol_appetite(splits["train"], levels, vm)[train.bars], owner["train"].numpy())
    mean, std, w_alloc, _ = fit_linear(sleeves, k, alone, train, costs["train"])
    x = (sleeve_features(ea, owner["test"].numpy(), k, size) - mean) / std
    shares = torch.softmax(torch.as_tensor(x @ w_alloc), -1).numpy()
    learned_allocation = on_bars(shares, ea.bars, test.num_bars, 1.0 / k)
    spec = timing_spec(levels, vm)
    rule = fit_allocation_rule(specialists, splits["train"], cfg, spec)  # what Phase 2 fits
    start_shares, start_appetite = rule_book(rule, *rule_inputs(ea, test, spec, owner["test"].numpy(), k, size), k)
    even = np.full((test.num_bars, k), 1.0 / k)
    makers = {
        "equal_allocation": equal("test"),
        "vol_managed_equal_allocation": vol_managed(equal("test"), test, levels, vm, size, "cpu"),
        "learned_timing": tables(even, learned_appetite),
        "learned_allocation": tables(learned_allocation, vol_appetite(test, levels, vm)),
        "phase2_start": tables(
            on_bars(start_shares, ea.bars, test.num_bars, 1.0 / k), on_bars(start_appetite, ea.bars, test.num_bars, 1.0)
        ),
        "system": lambda rows: HierarchyPolicy(specialists, meta, owner["test"], size, rows, "cpu", test),
    }
    picked = {"learned_timing": {"w": np.round(w[:, 0], 3).tolist(), "b": round(float(b[0]), 3)},
              "learned_allocation": {"w": np.round(w_alloc, 3).tolist()},
              "phase2_start": {"w": np.round(rule["weights"], 3).tolist(),
                               "b": np.round(rule["bias"], 3).tolist()}}  # fmt: skip
    if test.regime is not None:  # the ceiling: the true regime's multiplier (look-ahead), p picked on val
        m_star = float(np.median(REGIME_VOL[splits["train"].regime]))

        def regime_appetite(market, power):
            return np.minimum(1.0, (m_star / REGIME_VOL[market.regime]) ** power)

        val = unscaled["val"]

        def val_score(power):
            return float(scaled_sharpe(torch.as_tensor(regime_appetite(splits["val"], power)[val.bars])[:, None], val,
                                       costs["val"]))  # fmt: skip

        power = max(POWERS, key=val_score)
        picked["regime_timing"] = {"power": power}
        makers["regime_timing"] = tables(even, regime_appetite(test, power))
    ran = run_backtests(test, cfg, makers, 1, "cpu")
    reference = ran["vol_managed_equal_allocation"].net_return
    row = {"picked": picked}
    for name, bt in ran.items():
        diff = paired_sharpe_difference(bt.net_return, reference, test.bars_per_year, rf, seed=0)
        row[name] = {"sharpe": diff["sharpe_a"], "minus_vm": [diff["difference"], diff["low"], diff["high"]]}
    return row


def format_table(rows: dict[int, dict]) -> str:
    names = [n for n in POLICIES if any(n in r for r in rows.values())]
    others = [n for n in names if n != "vol_managed_equal_allocation"]
    lines = [
        f"{'seed':<5}"
        + "".join(f"{LABELS[n]:>12}" for n in names)
        + "".join(f"{'- vm: ' + LABELS[n]:>22}" for n in others)
    ]
    for seed, r in rows.items():
        diffs = "".join("{:>+8.2f} [{:+.2f},{:+.2f}]".format(*r[n]["minus_vm"]) for n in others)
        lines.append(f"{seed:<5}" + "".join(f"{r[n]['sharpe']:>12.3f}" for n in names) + diffs)
    lines.append(
        f"{'mean':<5}"
        + "".join(f"{np.mean([r[n]['sharpe'] for r in rows.values()]):>12.3f}" for n in names)
        + "".join(f"{np.mean([r[n]['minus_vm'][0] for r in rows.values()]):>+8.2f}{'':14}" for n in others)
    )
    return "\n".join(lines)


def main(args: Args) -> dict:
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    splits = load_splits(cfg)
    levels, trend = fit_vol_levels(splits["train"]), fit_trend_for(splits["train"], cfg)
    rows = {seed: seed_row(Path(args.runs) / f"seed_{seed}", cfg, splits, levels, trend) for seed in args.seeds}
    print(f"Test split, Sharpe after costs; CPU: {machine()}")
    print(format_table(rows))
    result = {"machine": machine(), "runs": args.runs, "seeds": rows}
    if args.json:
        atomic_write_json(Path(args.json), result)
    return result


if __name__ == "__main__":
    cli(main, Args, "meta_headroom")
