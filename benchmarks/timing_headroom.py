"""How much can risk timing add over the volatility-managed rule? The meta-controller's headroom, per seed.

    python -m benchmarks.timing_headroom --runs runs/bench_s7/default [--seeds 1 2 3 4 5] [--config C] [--json out.json]

The risk-timing meta-controller starts at the volatility-managed equal allocation and learns a residual
over it (DESIGN section 14). Before asking PPO to beat that rule, measure what beating it is worth. For each
seed's pipeline run (`--runs/seed_S`, its Phase 3 specialists: those the report's equal allocation uses),
on the test split, through the report's own backtest (one continuous backtest, execution alike, the risk
manager, cost 0.003 per unit of turnover), the same specialists' equal allocation is scaled by:

* `vol_managed_equal_allocation`: `min(1, (sigma* / sigma_t)^p)`, half-life and p picked on validation (the
  report's rule);
* `learned_timing`: `sigmoid(w . x_t + b)` of the evidence the meta-controller sees, `x_t` = the volatility
  ratios `log(sigma_t / sigma*)` at the three half-lives and the book's own recent return (EWMAs of half-life
  5, 20, 60 bars of the unscaled book's returns up to the bar before), standardised on train; `w, b` fit on
  the training split by gradient ascent on the Sharpe ratio of the scaled book after costs (Adam, 600 steps).
  What a learned timing reaches from that evidence without the noise of RL;
* `regime_timing` (synthetic markets only; **look-ahead**, not a tradable policy): `min(1, (m* / m_t)^p)`
  with `m_t` the true volatility multiplier of the regime the position is chosen in, `m*` its median on
  train, p picked on validation. The ceiling of pure risk timing, as the `oracle` baseline is of direction.

and the system itself (`phase3/best.pt`). Each row's difference to the volatility-managed rule comes with
its paired 90% interval (`bootstrap.paired_sharpe_difference`). Nothing here is trained on the test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tyro

from benchmarks.run import machine
from mtq_common.agents.hierarchy import HierarchyPolicy, instrument_specialist_index
from mtq_common.data.market import MarketData
from mtq_common.data.splits import load_splits
from mtq_common.data.synthetic import REGIME_VOL
from mtq_common.data.tables import cost_rates
from mtq_common.data.volatility import VolLevels, fit_vol_levels, market_sigma
from mtq_common.evaluation.backtest import Backtest, run_backtests
from mtq_common.evaluation.bootstrap import paired_sharpe_difference
from mtq_common.evaluation.portfolio_eval import validation_timings, vol_managed
from mtq_common.evaluation.rules import VolManagedPolicy, fit_trend_for
from mtq_common.policy import load_hierarchy
from mtq_common.training.checkpoint import atomic_write_json
from mtq_common.training.settings import load_config

PERFORMANCE_HALF_LIVES = (5, 20, 60)
POWERS = (1, 2)
POLICIES = ("equal_allocation", "vol_managed_equal_allocation", "learned_timing", "regime_timing", "system")
LABELS = dict(zip(POLICIES, ("eq.alloc", "vm eq.alloc", "learned", "regime*", "system"), strict=True))


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


def causal_ewma(x: np.ndarray, half_life: float) -> np.ndarray:
    """[T]: entry t is the EWMA of x[:t] (what is known before x[t]); 0 at t = 0."""
    alpha = 1.0 - 0.5 ** (1.0 / half_life)
    out, level = np.zeros_like(x), 0.0
    for t in range(len(x)):
        out[t] = level
        level += alpha * (x[t] - level)
    return out


def timing_features(market: MarketData, levels: VolLevels, bt: Backtest) -> np.ndarray:
    """[T', F] at the backtest's bars: the volatility ratios, then the unscaled book's recent returns (per 1e-3)."""
    gross = bt.pnl.sum(-1) + bt.cost
    pairs = zip(levels.half_lives, levels.sigma_star, strict=True)
    vol = [np.log(market_sigma(market, levels, h) / star)[bt.bars] for h, star in pairs]
    own = [causal_ewma(gross, h) * 1e3 for h in PERFORMANCE_HALF_LIVES]  # (per segment it runs on: fine on train)
    return np.stack(vol + own, -1)


def scaled_sharpe(a: torch.Tensor, bt: Backtest, cost: np.ndarray) -> torch.Tensor:
    """Per-bar Sharpe ratio (over cash) of the book `a_t * w_t` from the unscaled backtest `bt`: a plain
    vectorised backtest, as `rules.pick_vol_timing` ranks its candidates (costs on the scaled book's changes,
    each segment from flat). Differentiable in `a` [T']."""
    scaled = a[:, None] * torch.as_tensor(bt.weights)
    previous = torch.cat([torch.zeros_like(scaled[:1]), scaled[:-1]])
    starts = torch.as_tensor(np.arange(len(a)) % bt.segment_length == 0)[:, None]
    previous = torch.where(starts, 0.0, previous)
    net = a * torch.as_tensor(bt.pnl.sum(-1) + bt.cost) - (torch.as_tensor(cost) * (scaled - previous).abs()).sum(-1)
    return net.mean() / net.std()


def fit_learned_timing(features: np.ndarray, bt: Backtest, cost: np.ndarray, steps: int = 600):
    """`(mean, std, w, b)` of `sigmoid(w . (x - mean) / std + b)` maximising the scaled book's Sharpe on train."""
    mean, std = features.mean(0), features.std(0) + 1e-9
    x = torch.as_tensor((features - mean) / std)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.full((), 2.0, dtype=torch.float64, requires_grad=True)  # start near full appetite
    opt = torch.optim.Adam([w, b], lr=0.03)
    for _ in range(steps):
        loss = -scaled_sharpe(torch.sigmoid(x @ w + b), bt, cost) + 1e-3 * (w**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mean, std, w.detach().numpy(), float(b.detach())


def on_bars(values: np.ndarray, bars: np.ndarray, num_bars: int) -> torch.Tensor:
    """A per-bar appetite [num_bars] from values at `bars` (1 elsewhere: bars no position is chosen at)."""
    out = np.ones(num_bars)
    out[bars] = values
    return torch.as_tensor(out, dtype=torch.float32)


def seed_row(run: Path, cfg, splits: dict, levels: VolLevels, trend) -> dict:
    specialists, meta = load_hierarchy(run)
    size, rf = cfg.environment.max_position_size, cfg.reward.risk_free_rate

    def equal(market):
        owner = instrument_specialist_index(market.sectors, specialists.names)
        return lambda rows: HierarchyPolicy(specialists, None, owner, size, rows, "cpu")

    unscaled = {s: run_backtests(splits[s], cfg, {"ea": equal(splits[s])}, 8, "cpu")["ea"] for s in ("train", "val")}
    costs = {s: cost_rates(splits[s], cfg, "cpu").double().numpy() for s in splits}
    mean, std, w, b = fit_learned_timing(timing_features(splits["train"], levels, unscaled["train"]),
                                         unscaled["train"], costs["train"])  # fmt: skip

    test = splits["test"]
    owner = instrument_specialist_index(test.sectors, specialists.names)
    test_ea = run_backtests(test, cfg, {"ea": equal(test)}, 1, "cpu")["ea"]  # the own-return features need it

    def learned(_rows):
        x = (timing_features(test, levels, test_ea) - mean) / std
        return VolManagedPolicy(equal(test)(1), on_bars(1 / (1 + np.exp(-(x @ w + b))), test_ea.bars, test.num_bars),
                                size)  # fmt: skip

    timings = validation_timings(specialists, splits["val"], cfg, trend, levels)
    makers = {
        "equal_allocation": equal(test),
        "vol_managed_equal_allocation": vol_managed(
            equal(test), test, levels, timings["vol_managed_equal_allocation"], size, "cpu"
        ),  # fmt: skip
        "learned_timing": learned,
        "system": lambda rows: HierarchyPolicy(specialists, meta, owner, size, rows, "cpu", test),
    }
    picked = {"learned_timing": {"w": np.round(w, 3).tolist(), "b": round(b, 3)}}
    if test.regime is not None:  # the ceiling: the true regime's multiplier (look-ahead), p picked on val
        m_star = float(np.median(REGIME_VOL[splits["train"].regime]))

        def regime_appetite(market, power):
            return np.minimum(1.0, (m_star / REGIME_VOL[market.regime]) ** power)

        val = unscaled["val"]

        def val_score(power):
            appetite = torch.as_tensor(regime_appetite(splits["val"], power)[val.bars])
            return float(scaled_sharpe(appetite, val, costs["val"]))

        power = max(POWERS, key=val_score)
        picked["regime_timing"] = {"power": power}
        makers["regime_timing"] = lambda rows: VolManagedPolicy(
            equal(test)(rows), torch.as_tensor(regime_appetite(test, power), dtype=torch.float32), size
        )
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
    main(tyro.cli(Args))
