"""Gymnasium entry points: single-environment adapters and vector constructors for the batched envs.

The environments proper are the native batched `SpecialistEnv` and `PortfolioEnv` of
`mtq_common.envs.trading_env`: training steps thousands of rows at once through them. This module adds what the
Gymnasium ecosystem expects on top:

* `SpecialistSingleEnv` and `PortfolioSingleEnv`: plain `gymnasium.Env`s (one row of the batched env,
  NumPy mode) that `gymnasium.utils.env_checker.check_env`, `gymnasium.make` and third-party
  single-environment tools accept. They do **not** autoreset: at the end of an episode `step` returns
  the episode's final observation with `truncated=True`, and the caller resets.
* `make_specialist_vec` and `make_portfolio_vec`: the `vector_entry_point`s of the registered ids, so
  `gymnasium.make_vec(..., vectorization_mode="vector_entry_point")` returns the batched env itself
  (SAME_STEP autoreset, `info["final_obs"]`), not a Python loop over single environments.

Both ids are registered by `import mtq_common`:

    env = gymnasium.make("MTQ/Specialist-v0", instrument="XAUUSD")
    envs = gymnasium.make_vec("MTQ/Portfolio-v0", num_envs=4096, vectorization_mode="vector_entry_point")
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from mtq_common.data.market import MarketData
from mtq_common.data.splits import financed, load_splits
from mtq_common.envs.portfolio_env import PortfolioEnv
from mtq_common.envs.trading_env import SpecialistEnv
from mtq_common.training.config import Config


def _market_for(config: Config | None, split: str, market: MarketData | None) -> tuple[Config, MarketData]:
    """The config (default `Config()`) and the market (default: that config's `split`), with the financing the
    config's spot instruments pay (`splits.financed`; a market passed in gets it too)."""
    config = config if config is not None else Config()
    if market is None:
        market = load_splits(config)[split]
    return config, financed(market, config)


def _fresh_seed() -> int:
    """A random 63-bit seed: an unseeded environment is random, as every Gymnasium environment is."""
    return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))


def _row0(x: Any) -> Any:
    """Row 0 of a batched value as a fresh object: a Python scalar for a per-row scalar, else an array copy."""
    if isinstance(x, dict):
        return {k: _row0(v) for k, v in x.items()}
    row = np.asarray(x)[0]
    # a NumPy scalar's `tolist()` is a Python float/bool/int; `.copy()` so no two calls share a buffer (check_env
    # asserts it). (NumPy, one row, after the batched step: no device sync.)
    return row.tolist() if row.ndim == 0 else row.copy()


class _SingleEnvAdapter(gym.Env):
    """One row of a batched env, NumPy mode, without autoreset (what both adapters share).

    The batched env resets a finished row in the same step (SAME_STEP) and keeps the finished
    episode's last observation in `info["final_obs"]`; this adapter returns that one instead, so the
    caller sees the true end of the episode and calls `reset` itself. Stepping past the end without a
    reset is not an error: it continues in the episode the batched env has already started.
    """

    metadata = {"render_modes": []}

    def __init__(self, batched: SpecialistEnv | PortfolioEnv):
        self.batched = batched
        self.observation_space = batched.single_observation_space
        self.action_space = batched.single_action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start a new episode; `seed` seeds both `self.np_random` and the batched env's start bars."""
        super().reset(seed=seed)
        obs, _ = self.batched.reset(seed=seed)
        return _row0(obs), {}

    def step(self, action):
        """One bar: `(obs, reward, terminated, truncated, info)` of row 0; the final obs at an episode's end."""
        # Add the batch axis; the batched env rejects NaN/inf and a wrong size, and clips to [-1, 1].
        batch = np.asarray(action, dtype=np.float32).reshape(1, *self.action_space.shape)
        obs, reward, terminated, truncated, info = self.batched.step(batch)
        done = bool(terminated[0]) or bool(truncated[0])
        if done:
            obs = info["final_obs"]  # the auto-reset observation would belong to the next episode
        row_info = {k: _row0(v) for k, v in info.items() if not k.startswith("_") and k not in ("final_obs", "episode")}
        if done:
            row_info["episode"] = _row0(info["episode"])
        return _row0(obs), float(reward[0]), bool(terminated[0]), bool(truncated[0]), row_info


class SpecialistSingleEnv(_SingleEnvAdapter):
    """`SpecialistEnv` as a single `gymnasium.Env`: one instrument, Box observation, action `[1]` in [-1, 1].

    Args:
        config: the configuration (default `Config()`, the built-in synthetic market).
        split: which split of the config's market to trade when `market` is not given.
        market: the market to trade (overrides `config` / `split` for the data).
        instrument: the symbol this environment trades (default: the market's first).
        seed: seed of the start bars before the first seeded `reset` (default: random).
        next_return_diagnostic: append the next bar's return to the observation (a look-ahead test aid).
    """

    def __init__(
        self,
        config: Config | None = None,
        split: str = "train",
        market: MarketData | None = None,
        instrument: str | None = None,
        seed: int | None = None,
        next_return_diagnostic: bool = False,
    ):
        config, market = _market_for(config, split, market)
        symbol = instrument if instrument is not None else market.symbols[0]
        if symbol not in market.symbols:
            raise ValueError(f"instrument {symbol!r} is not in the market's symbols {market.symbols}")
        self.instrument = symbol
        batched = SpecialistEnv(
            market,
            config,
            row_instrument=[market.symbols.index(symbol)],
            seed=_fresh_seed() if seed is None else seed,
            next_return_diagnostic=next_return_diagnostic,
        )
        super().__init__(batched)


class PortfolioSingleEnv(_SingleEnvAdapter):
    """`PortfolioEnv` as a single `gymnasium.Env`: all instruments under the risk manager.

    Observation `{"instruments": [N, F_obs], "portfolio": [P]}`, action: proposed weights `[N]` in
    [-1, 1]. Arguments as `SpecialistSingleEnv` (without `instrument`).
    """

    def __init__(
        self,
        config: Config | None = None,
        split: str = "train",
        market: MarketData | None = None,
        seed: int | None = None,
        next_return_diagnostic: bool = False,
    ):
        config, market = _market_for(config, split, market)
        batched = PortfolioEnv(
            market,
            config,
            num_envs=1,
            seed=_fresh_seed() if seed is None else seed,
            next_return_diagnostic=next_return_diagnostic,
        )
        super().__init__(batched)


def make_specialist_vec(
    num_envs: int = 64,
    config: Config | None = None,
    split: str = "train",
    market: MarketData | None = None,
    seed: int = 0,
    torch_mode: bool = False,
    device: str | torch.device = "cpu",
    **kwargs,
) -> SpecialistEnv:
    """A batched `SpecialistEnv` whose rows cycle over all the market's instruments (row b trades b mod N).

    Extra `kwargs` go to `SpecialistEnv` (`next_return_diagnostic`, `check_actions`, `tables`, `compiled`).
    """
    config, market = _market_for(config, split, market)
    rows = np.arange(num_envs) % market.num_instruments
    return SpecialistEnv(market, config, rows, device=device, seed=seed, torch_mode=torch_mode, **kwargs)


def make_portfolio_vec(
    num_envs: int = 64,
    config: Config | None = None,
    split: str = "train",
    market: MarketData | None = None,
    seed: int = 0,
    torch_mode: bool = False,
    device: str | torch.device = "cpu",
    **kwargs,
) -> PortfolioEnv:
    """A batched `PortfolioEnv` of `num_envs` rows; extra `kwargs` go to `PortfolioEnv`."""
    config, market = _market_for(config, split, market)
    return PortfolioEnv(market, config, num_envs, device=device, seed=seed, torch_mode=torch_mode, **kwargs)
