"""Batched trading environments: `SpecialistEnv` (one instrument per row) here and `PortfolioEnv` (all of them,
under the risk manager) in `portfolio_env.py`, on the base class they share (`BatchedTradingEnv`).

Both are native `gymnasium.vector.VectorEnv`s whose state is a set of `(num_envs, ...)` tensors on one
device, stepped without a Python loop over rows, instruments or specialists and without a host sync
(PureJaxRL style: the reset state is computed for every row and selected with the done mask).

Shared mechanics (DESIGN section 4):
* a row's episode starts at a random bar of the split after the warm-up window (the longest feature
  lookback and `warmup_steps`) and lasts `episode_length` bars or until the data end; either end is a
  **truncation** (`terminated` is always False: the market goes on), so PPO bootstraps from the final
  observation, which `info["final_obs"]` carries;
* `autoreset_mode` is SAME_STEP: the observation returned for a finished row is already the first one
  of its next episode;
* the position chosen at bar t earns the return of bar t -> t+1; costs, equity, drawdown and the
  reward come from `kernels.portfolio_step` (the one place those formulas live);
* stop-loss: a trade (a run of one position sign) whose price has moved more than `stop_loss_pct`
  against its entry is closed at that bar's close: the instrument is held flat until the policy asks
  for a position of another sign (`info["stop_loss"]` flags the bar).

Actions may be NumPy arrays (Gymnasium's convention; NumPy comes back) or, with `torch_mode=True`,
tensors on the environment's device (tensors come back). Finite actions outside [-1, 1] are clipped
(documented); NaN/inf, a wrong shape or a non-float dtype raise `ValueError`.

`next_return_diagnostic=True` appends the next bar's (volatility-scaled) return to every instrument's
observation. It is look-ahead by design, **a test aid only**: it proves the PPO machinery can learn
when the signal is there, separately from whether the market is learnable.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv

from mtq_common.data.features import FEATURE_NAMES
from mtq_common.data.market import MarketData
from mtq_common.data.tables import OBS_CLIP, STATE_SIZE, MarketTables, build_tables, cost_rates
from mtq_common.envs.engine import TradingEngine
from mtq_common.training.compiling import compile_options
from mtq_common.training.config import Config


def position_column(num_instruments: int) -> int:
    """Index of the own position in an instrument observation (after the features and the one-hot)."""
    return len(FEATURE_NAMES) + num_instruments


def instrument_obs_size(num_instruments: int, diagnostic: bool = False) -> int:
    """Length of one instrument's observation (the layout of `TradingEngine.instrument_obs`)."""
    return len(FEATURE_NAMES) + num_instruments + STATE_SIZE + int(diagnostic)


def as_actions(actions, shape: tuple[int, ...], device, check: bool) -> torch.Tensor:
    """Actions as a float32 tensor of `shape`, clipped to [-1, 1] (always: what trades is the clipped
    action, in every phase). With `check`, a clear error for NaN/inf (naming the row), a wrong shape or
    dtype; without it (the training scripts' fast path, which guard the proposals themselves) only the
    clip is applied."""
    if not check:
        return actions.clamp(-1.0, 1.0)
    if isinstance(actions, np.ndarray):
        if not np.issubdtype(actions.dtype, np.floating):
            raise ValueError(f"actions must be floating point, got dtype {actions.dtype}")
        actions = torch.from_numpy(np.ascontiguousarray(actions))
    elif not isinstance(actions, torch.Tensor):
        raise ValueError(f"actions must be a numpy array or a torch tensor, got {type(actions).__name__}")
    if not actions.is_floating_point():
        raise ValueError(f"actions must be floating point, got dtype {actions.dtype}")
    if tuple(actions.shape) != shape:
        if actions.numel() == math.prod(shape):
            actions = actions.reshape(shape)
        else:
            raise ValueError(f"actions must have shape {shape}, got {tuple(actions.shape)}")
    actions = actions.to(device=device, dtype=torch.float32)
    finite = torch.isfinite(actions.reshape(shape[0], -1)).all(-1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"actions of row {row} are not finite ({actions[row].tolist()}); the state was not changed. "
            "A diverged policy proposes NaN: lower the learning rate or check the inputs."
        )
    return actions.clamp(-1.0, 1.0)


def _to_numpy(x):
    """NumPy mode only (Gymnasium's convention at the API boundary); torch mode, which the training
    scripts use, never copies to the host."""
    if isinstance(x, dict):
        return {k: _to_numpy(v) for k, v in x.items()}
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


class BatchedTradingEnv(VectorEnv):
    """What both environments share: spaces, NumPy/torch conversion, SAME_STEP autoreset, episode stats."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(self, torch_mode: bool, check_actions: bool):
        self.torch_mode = torch_mode
        self.check_actions = check_actions
        self.autoreset = True
        """False: a finished row stays at its last bar (its final state can be read; it must not step again)."""

    def _out(self, x):
        return x if self.torch_mode else _to_numpy(x)

    def _finish(self, obs_stepped, reward, truncated, info: dict):
        """SAME_STEP autoreset: finished rows start their next episode; their final obs goes in info.
        `obs_stepped` None (a step that builds no observation): the observation and the final one are None."""
        eng = self.engine
        done = truncated
        # Gymnasium's dict-of-arrays infos: every per-step key is valid for every row.
        every_row = torch.ones_like(done)
        info.update({f"_{key}": every_row for key in list(info)})
        info["episode"] = {"r": eng.episode_return.clone(), "l": eng.steps.clone()}
        info["_episode"] = done
        dense = self.diagnostic or self.dense_restart or eng.device.type != "cpu"  # no host sync (what a GPU wants)
        if self.autoreset:
            starts = eng.random_starts()  # drawn at every step, so the generator's stream is the same on every path
            if dense or bool(done.any()):  # on the CPU a step that ended no row skips the reset (a no-op there)
                eng.reset_rows(done, starts)
                self._reset_extra(done)
        if obs_stepped is None or not self.autoreset:
            obs = obs_stepped
        elif dense:
            obs = self._observe()  # every row again
        else:
            obs = self._restart(obs_stepped, done)
        info["final_obs"] = obs_stepped
        info["_final_obs"] = done
        terminated = torch.zeros_like(done)
        return self._out(obs), self._out(reward), self._out(terminated), self._out(truncated), self._out(info)

    def finish_step(self, obs, reward, truncated, info: dict):
        """The rest of `step` after the environment's `trade` (`step` before its autoreset, pure tensor work, for a
        caller that compiles a whole bar around it): the autoreset, eager because its branches depend on the data.
        `finish_step(*trade(...))` is exactly `step(...)`."""
        return self._finish(obs, reward, truncated, info)

    dense_restart = False
    """Build the next observation of every row after an autoreset (the GPU path; tests compare the two)."""

    def _restart(self, obs_stepped, done: torch.Tensor):
        """The next observation on the CPU: the stepped one, with only the restarted rows rebuilt.

        A row that has just restarted is flat at its start bar, so its observation is the static part of
        the tables at that bar with zero state (each environment's `_fresh_obs(rows)`). Few rows restart
        on a step (one in `episode_length`), so this replaces a second full observation by a gather of
        those rows; finding them is a host sync, free on the CPU and avoided on other devices.
        """
        rows = done.nonzero().squeeze(-1)
        if rows.numel() == 0:
            return obs_stepped
        if isinstance(obs_stepped, dict):
            obs = {key: value.clone() for key, value in obs_stepped.items()}
            for key, value in self._fresh_obs(rows).items():
                obs[key][rows] = value
            return obs
        obs = obs_stepped.clone()
        obs[rows] = self._fresh_obs(rows)
        return obs

    def _reset_extra(self, mask: torch.Tensor) -> None:
        """Reset state a subclass keeps beyond the engine's (nothing by default)."""

    def state_dict(self) -> dict:
        """The environment's full state (for checkpoints that resume exactly)."""
        return {"engine": self.engine.state_dict(), **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state["engine"])
        self._load_extra_state(state)

    def observe(self):
        """The current observation (after `load_state_dict`, say), as `step` would return it."""
        return self._out(self._observe())

    def start_at(self, bars):
        """Start every row's episode, flat, at the given bars ([num_envs] ints); returns the observation.

        Evaluation uses it to lay rows on chosen stretches of the data (a backtest from its first bar)."""
        eng = self.engine
        starts = torch.as_tensor(bars, dtype=torch.long, device=eng.device).expand(self.num_envs)
        eng.reset_rows(torch.ones(self.num_envs, dtype=torch.bool, device=eng.device), starts)
        self._reset_extra(torch.ones(self.num_envs, dtype=torch.bool, device=eng.device))
        return self.observe()

    @property
    def bar(self) -> torch.Tensor:
        """The current bar of each row [num_envs] (the decision bar: prices up to it are known)."""
        return self.engine.t

    MARKET_NOW = ("prices", "returns", "variance", "vol", "drift")

    def now(self, name: str) -> torch.Tensor:
        """The market table `name` at each row's current bar, [num_envs, held instruments]: "prices"
        (closes), "returns" (of the bar just completed), "variance" (per-bar EWMA), "vol" (annualised),
        or "drift" (the synthetic latent drift: evaluation only, the oracle's input)."""
        if name not in self.MARKET_NOW:
            raise ValueError(f"unknown market table {name!r}; accepted: {self.MARKET_NOW}")
        table = getattr(self.engine.tables, name)
        if table is None:
            raise ValueError(f"this market has no {name!r} (only synthetic markets carry the latent drift)")
        return self.engine.gather(table, self.engine.t)

    @property
    def holdings(self) -> torch.Tensor:
        """The executed book each row holds now [num_envs, held instruments], drifted by the last bar."""
        return self.engine.weights

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.engine.seed(seed)
        all_rows = torch.ones(self.num_envs, dtype=torch.bool, device=self.engine.device)
        self.engine.reset_rows(all_rows, self.engine.random_starts())
        self._reset_extra(all_rows)
        return self._out(self._observe()), {}


class SpecialistEnv(BatchedTradingEnv):
    """Batched single-instrument trading: row b trades instrument `row_instrument[b]`.

    Action [B, 1] in [-1, 1] -> position `a * max_position_size`. Observation [B, F_obs]: the
    instrument's features, its one-hot over the market's N instruments, position / max size,
    unrealised PnL of the open trade in stop-loss distances, drawdown / drawdown target, time in trade
    / 100 (and the next return under the diagnostic switch). Reward: the differential Sharpe (and
    downside ratio) of the net return, from `kernels.portfolio_step` with one instrument.
    """

    def __init__(
        self,
        market: MarketData,
        cfg: Config,
        row_instrument: torch.Tensor | np.ndarray | list[int],
        device: str | torch.device = "cpu",
        seed: int = 0,
        torch_mode: bool = False,
        next_return_diagnostic: bool = False,
        check_actions: bool = True,
        tables: MarketTables | None = None,
        compiled: bool = False,
    ):
        super().__init__(torch_mode, check_actions)
        tables = tables or build_tables(market, cfg, device)
        index = torch.as_tensor(np.asarray(row_instrument), dtype=torch.long).reshape(-1, 1)
        n_instruments = tables.prices.shape[1]
        if index.numel() == 0 or index.min() < 0 or index.max() >= n_instruments:
            raise ValueError(f"row_instrument must index the market's {n_instruments} instruments")
        self.engine = TradingEngine(tables, cfg, index, seed, device)
        self.num_envs = index.shape[0]
        self.diagnostic = next_return_diagnostic
        self.obs_size = instrument_obs_size(n_instruments, next_return_diagnostic)
        self.single_observation_space = gym.spaces.Box(-OBS_CLIP, OBS_CLIP, (self.obs_size,), np.float32)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)
        self.cost_rate = cost_rates(market, cfg, self.engine.device)[self.engine.index]  # [B, 1]
        # compiled: the step before the autoreset as one torch.compile'd function, as `PortfolioEnv`'s
        self._step = (
            torch.compile(self._stepped, options=compile_options(self.engine.device)) if compiled else self._stepped
        )

    def _observe(self) -> torch.Tensor:
        return self.engine.instrument_obs(self.diagnostic).squeeze(1)

    def _fresh_obs(self, rows: torch.Tensor) -> torch.Tensor:
        return self.engine.fresh_instrument_obs(rows).squeeze(1)

    def step(self, actions):
        actions = as_actions(actions, (self.num_envs, 1), self.engine.device, self.check_actions)
        return self._finish(*self._step(actions))

    def trade(self, actions: torch.Tensor):
        """`step` before its autoreset (`finish_step(*trade(actions))` is `step(actions)`), for a caller that
        compiles a whole bar around it (Phase 1: the specialists' samples and this step). Tensors only; without
        `check_actions` (the training scripts' fast path) there is no host sync."""
        return self._stepped(as_actions(actions, (self.num_envs, 1), self.engine.device, self.check_actions))

    def _stepped(self, actions: torch.Tensor):
        """`step` before the autoreset: `(observation, reward, truncated, info)` (pure tensor work, compilable)."""
        eng = self.engine
        own = actions.reshape(self.num_envs, 1)
        own = torch.where(eng.stop_lock(own), 0.0, own)
        target = own * eng.max_position
        sigma = self.engine.gather(eng.tables.variance, eng.t).sqrt()
        out, stopped, truncated = eng.advance(target, own, torch.zeros_like(eng.equity), self.cost_rate)
        info = {
            "net_return": out.net_return,
            "cost": out.cost,
            "position": target.squeeze(1),
            "equity": out.equity,
            "drawdown": out.drawdown,
            "stop_loss": stopped.squeeze(1),
            "instrument_vol": sigma.squeeze(1),
        }
        return self._observe(), out.reward, truncated, info


def specialist_rows(market: MarketData, specialists: list[str], rows_per_specialist: int):
    """Row layout for training several specialists in one `SpecialistEnv`.

    Rows are grouped by specialist (`rows_per_specialist` each, in `specialists` order), and within a
    group they cycle over that specialist's instruments. Returns `(row_instrument, row_specialist)`.
    """
    instruments, owners = [], []
    for k, name in enumerate(specialists):
        mine = [i for i, s in enumerate(market.sectors) if s == name]
        if not mine:
            raise ValueError(f"specialist {name!r} has no instrument in {market.symbols}")
        instruments += [mine[j % len(mine)] for j in range(rows_per_specialist)]
        owners += [k] * rows_per_specialist
    return torch.tensor(instruments), torch.tensor(owners)
