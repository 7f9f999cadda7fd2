"""MTQuant's shared library: what the phase scripts (`phase1_ppo.py`, `phase2_meta.py`, `phase3_joint.py`) import.

Its rooms, from the bottom up (a room imports only from the rooms above it in this list, and `kernels/`):

* `training/`: the run plumbing every script shares: the config (`config`, `settings`: YAML file and flags),
  checkpoints, ranks (`distributed`) and a run's loop helpers (`plumbing`: logging, `latest.pt`, TensorBoard).
* `data/`: the market: `MarketData`, the synthetic generator, CSV files, train/val/test and walk-forward
  `splits`, causal `features`, the normalised `volatility` and the per-bar `tables` the environments read.
* `envs/`: the batched environments (`engine`: one step's formulas; `trading_env`, `portfolio_env`) and their
  Gymnasium adapters (`gym_env`).
* `agents/`: the networks, the hierarchy of specialists and meta-controller, and the PPO pieces (advantages,
  compiled update, gradient coordination, curriculum).
* `evaluation/`: the rule-based baselines (`rules`), backtests, metrics, bootstrap intervals, the reports and
  plots, the tear sheet and the live book (`live_book`, what `pipeline.py --mode act` writes).

Importing the package registers two Gymnasium ids, `MTQ/Specialist-v0` and `MTQ/Portfolio-v0`, for
`gymnasium.make` (a single-environment adapter) and `gymnasium.make_vec` (the native batched env).

The public API for a trained run is `load_policy(run_dir)` (`mtq_common.policy`): a `Policy` whose
`book(prices, holdings=None, capital=None)` gives the target book of `pipeline.py --mode act`. The
package loads `mtq_common.policy` (and with it torch) when one of the two is first used, not on import,
so registering the environment ids stays light.
"""

import importlib

import gymnasium

__all__ = ["Policy", "load_policy"]

_ENVIRONMENTS = {
    "MTQ/Specialist-v0": ("SpecialistSingleEnv", "make_specialist_vec"),
    "MTQ/Portfolio-v0": ("PortfolioSingleEnv", "make_portfolio_vec"),
}

for _env_id, (_single, _vector) in _ENVIRONMENTS.items():
    # A module reload or a second import path must not register twice (Gymnasium warns on overrides).
    if _env_id not in gymnasium.registry:
        gymnasium.register(
            id=_env_id,
            entry_point=f"mtq_common.envs.gym_env:{_single}",
            vector_entry_point=f"mtq_common.envs.gym_env:{_vector}",
        )


def __getattr__(name: str):
    """`mtq_common.load_policy` and `mtq_common.Policy`, loaded on first use (PEP 562)."""
    if name in __all__:
        return getattr(importlib.import_module("mtq_common.policy"), name)
    raise AttributeError(f"module 'mtq_common' has no attribute {name!r}")
