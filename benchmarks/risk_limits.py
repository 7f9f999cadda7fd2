"""What the risk layer keeps of the books a trader proposes, universe by universe (DESIGN section 5).

    python -m benchmarks.risk_limits [--split test] [--json out.json]

Each case proposes one fixed book on every bar of a split of the built-in synthetic market, through
`PortfolioEnv` with the stop-loss off (so that only the risk manager acts), in one continuous backtest.
The table gives, per case: the share of bars whose executed book is flat, the mean share of the proposed
gross exposure kept, how often each limit bound, and whether VaR and the position cap held on every bar.
The cases are the ones that showed the old risk layer throwing trades away (one small sector shrank the
whole book; a long book of correlated indices went flat).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks import cli
from kernels import LIMIT_NAMES
from mtq_common.data.splits import load_splits
from mtq_common.envs.portfolio_env import PortfolioEnv
from mtq_common.training.checkpoint import atomic_write_json
from mtq_common.training.config import Config, ConfigError
from mtq_common.training.settings import load_config

CASES = {
    "8 built-in, all long at the cap": (
        ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD", "WTIUSD", "SPX500", "NAS100", "US30"],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ),
    "8 built-in, forex and equity at the cap, commodities at 0.001": (
        ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD", "WTIUSD", "SPX500", "NAS100", "US30"],
        [1, 1, 1, 0.01, 0.01, 1, 1, 1],
    ),
    "SPX500 NAS100 US30, all long at the cap": (["SPX500", "NAS100", "US30"], [1, 1, 1]),
    "SPX500 NAS100 WTIUSD, all long at the cap": (["SPX500", "NAS100", "WTIUSD"], [1, 1, 1]),
    "EURUSD alone": (["EURUSD"], [1]),
}
"""Case name -> (instruments, proposal in units of max_position_size)."""


@dataclass
class Args:
    config: str | None = None
    """YAML config (default: the built-in defaults)."""
    split: str = "test"
    """Split of the synthetic market to run on."""
    max_bars: int | None = None
    """Use at most this many bars of the split (all by default)."""
    json: str | None = None
    """Also write the table as JSON to this path."""


@torch.no_grad()
def run_case(cfg: Config, instruments: list[str], proposal: list[float], split: str = "test",
             max_bars: int | None = None) -> dict:  # fmt: skip
    """One case: the fixed `proposal` (units of max_position_size) on every bar, stop-loss off."""
    cfg = dataclasses.replace(
        cfg,
        environment=dataclasses.replace(cfg.environment, stop_loss_pct=1.0),  # off: only the risk manager acts
        data=dataclasses.replace(cfg.data, instruments=list(instruments)),
    )
    market = load_splits(cfg)[split]
    if max_bars is not None:
        market = dataclasses.replace(market, prices=market.prices[:max_bars], timestamps=market.timestamps[:max_bars],
                                     regime=None if market.regime is None else market.regime[:max_bars],
                                     drift=None if market.drift is None else market.drift[:max_bars])  # fmt: skip
    whole = dataclasses.replace(cfg.environment, episode_length=market.num_bars)  # one continuous run of the split
    env = PortfolioEnv(market, dataclasses.replace(cfg, environment=whole), 1, torch_mode=True)
    env.reset(seed=0)
    env.start_at(env.engine.tables.first_bar)
    book = torch.tensor([proposal], dtype=torch.float32) * cfg.environment.max_position_size
    flat, kept, binding, var_ok, cap_ok = [], [], [], [], []
    while True:
        _, _, _, truncated, info = env.step(book)
        w = info["executed_weights"]
        flat.append(bool((w == 0).all()))
        kept.append(float(info["gross_kept"]))
        binding.append(info["binding"][0].tolist())
        var_ok.append(bool(info["var"] <= env.limits.max_var * (1 + 1e-6)))
        cap_ok.append(bool((w.abs() <= env.limits.max_position * (1 + 1e-6)).all()))
        if bool(truncated):
            break
    binding = np.array(binding, dtype=float)
    return {
        "instruments": list(instruments),
        "bars": len(flat),
        "flat_share": float(np.mean(flat)),
        "gross_kept": float(np.mean(kept)),
        "min_gross_kept": float(np.min(kept)),
        "binding": {name: float(binding[:, k].mean()) for k, name in enumerate(LIMIT_NAMES)},
        "var_held_every_bar": all(var_ok),
        "cap_held_every_bar": all(cap_ok),
        "limit_notes": list(env.limit_notes),
    }


def main(args: Args) -> dict:
    if args.split not in ("train", "val", "test"):
        raise ConfigError(f"--split {args.split!r}: accepted train, val or test")
    cfg = load_config(args.config)
    rows = {name: run_case(cfg, *case, split=args.split, max_bars=args.max_bars) for name, case in CASES.items()}
    print(f"risk layer on the synthetic {args.split} split, stop-loss off, one fixed proposal per case")
    print(f"{'case':<64} {'bars':>5} {'flat':>6} {'kept':>6} {'min kept':>8}  binding (" + ", ".join(LIMIT_NAMES)
          + ")  VaR/cap held")  # fmt: skip
    for name, r in rows.items():
        binds = " ".join(f"{r['binding'][k]:.0%}" for k in LIMIT_NAMES)
        held = "yes" if r["var_held_every_bar"] and r["cap_held_every_bar"] else "NO"
        print(f"{name:<64} {r['bars']:>5} {r['flat_share']:>6.1%} {r['gross_kept']:>6.1%} {r['min_gross_kept']:>8.1%}"
              f"  {binds:<24} {held}")  # fmt: skip
    if args.json:
        atomic_write_json(args.json, rows, sort_keys=False)
    return rows


if __name__ == "__main__":
    cli(main, Args, "risk_limits")
