"""`PortfolioEnv`: every row holds all N instruments under the risk manager, the environment of Phases 2
and 3 and of every evaluation (the mechanics it shares with `SpecialistEnv` are in `trading_env.py`).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

import kernels
from mtq_common.data.market import MarketData
from mtq_common.data.tables import OBS_CLIP, MarketTables, build_tables, cost_rates, feasible_limits
from mtq_common.envs.engine import TradingEngine
from mtq_common.envs.trading_env import BatchedTradingEnv, as_actions, instrument_obs_size
from mtq_common.training.compiling import compile_options
from mtq_common.training.config import Config


class PortfolioEnv(BatchedTradingEnv):
    """Batched multi-instrument portfolio: every row holds all N instruments under the risk manager.

    `step(proposed_weights [B, N])` (signed fractions of equity, clipped to [-1, 1]): the stop-loss
    lock, then the risk manager (`kernels.risk_step`) maps the proposal to executed weights within
    every limit, then `kernels.portfolio_step` books costs, returns, equity, drawdown and the reward.

    Observation: `{"instruments": [B, N, F_obs]` (the specialists' layout, as in `SpecialistEnv`),
    `"portfolio": [B, P]}` for the meta-controller: each instrument's 1- and 20-bar scaled returns,
    annualised volatilities, the correlation matrix's upper triangle, drawdown / target, current
    weights / max size, and risk usage (VaR, correlation exposure and largest sector share, each over
    its limit). `info` carries the executed weights, VaR, correlation exposure, sector allocation,
    the risk manager's intervention and, on synthetic data, the regime and the latent drift
    (evaluation only: never part of an observation). `score=False` (the backtests, which read the accounts only)
    skips the reward: it is 0 each bar, everything else is as with it.
    """

    def __init__(
        self,
        market: MarketData,
        cfg: Config,
        num_envs: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
        torch_mode: bool = False,
        next_return_diagnostic: bool = False,
        check_actions: bool = True,
        tables: MarketTables | None = None,
        compiled: bool = False,
        score: bool = True,
    ):
        super().__init__(torch_mode, check_actions)
        tables = tables or build_tables(market, cfg, device)
        n = market.num_instruments
        index = torch.arange(n).expand(num_envs, n)
        self.engine = TradingEngine(tables, cfg, index, seed, device)
        self.num_envs, self.n = num_envs, n
        self.diagnostic = next_return_diagnostic
        self.sectors = sorted(set(market.sectors), key=market.sectors.index)
        onehot = torch.zeros(n, len(self.sectors))
        onehot[torch.arange(n), torch.tensor([self.sectors.index(s) for s in market.sectors])] = 1.0
        self.sector_onehot = onehot.to(self.engine.device)
        self.limits, self.limit_notes = feasible_limits(cfg, n, len(self.sectors), tables.bars_per_day)
        self.cost_rate = cost_rates(market, cfg, self.engine.device)  # [N]
        self.risk = {k: torch.zeros(num_envs, device=self.engine.device) for k in ("var", "corr", "sector")}

        f_obs = instrument_obs_size(n, next_return_diagnostic)
        self.portfolio_obs_size = tables.portfolio_static.shape[-1]  # 3N + N(N-1)/2 static, 1 + N + 3 state
        self.single_observation_space = gym.spaces.Dict(
            {
                "instruments": gym.spaces.Box(-OBS_CLIP, OBS_CLIP, (n, f_obs), np.float32),
                "portfolio": gym.spaces.Box(-OBS_CLIP, OBS_CLIP, (self.portfolio_obs_size,), np.float32),
            }
        )
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (n,), np.float32)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.has_truth = tables.regime is not None
        self.score = score  # (class docstring; `TradingEngine.advance`)
        # compiled: the step before the autoreset as one torch.compile'd function (the autoreset's data-dependent
        # branches stay eager); fused code rounds differently from the eager step (see mtq_common.agents.update)
        options = compile_options(self.engine.device, narrow_vectors=True)
        self._step = torch.compile(self._stepped, options=options) if compiled else self._stepped

    def _observe(self) -> dict[str, torch.Tensor]:
        eng, tb = self.engine, self.engine.tables
        lim = self.limits
        dynamic = torch.cat(
            [
                (eng.drawdown / eng.cfg.reward.max_drawdown_target).unsqueeze(-1),
                eng.weights / eng.max_position,
                torch.stack(
                    [
                        self.risk["var"] / lim.max_var,
                        self.risk["corr"] / lim.max_correlation,
                        self.risk["sector"] / lim.max_sector,
                    ],
                    -1,
                ),  # fmt: skip
            ],
            -1,
        ).clamp(-OBS_CLIP, OBS_CLIP)
        # returns, vols, correlations prepared per bar; the state columns written over the gathered zeros
        portfolio = tb.portfolio_static.index_select(0, eng.t)
        portfolio[:, -dynamic.shape[-1] :] = dynamic
        return {"instruments": eng.instrument_obs(self.diagnostic), "portfolio": portfolio}

    def _execute(self, proposed_weights, own_positions, update: bool):
        """The stop-loss lock and the risk manager at the current bar: `(proposal, own, RiskOut)`."""
        eng = self.engine
        shape = (self.num_envs, self.n)
        proposal = as_actions(proposed_weights, shape, eng.device, self.check_actions)
        if own_positions is None:
            own = (proposal / eng.max_position).clamp(-1.0, 1.0)
        else:
            own = as_actions(own_positions, shape, eng.device, self.check_actions)
        held_flat = eng.stop_lock(own, update)
        own = torch.where(held_flat, 0.0, own)
        proposal = torch.where(held_flat, 0.0, proposal)
        cov, corr = eng.tables.cov.index_select(0, eng.t), eng.tables.corr.index_select(0, eng.t)
        risk = kernels.risk_step(proposal, cov, self.sector_onehot, self.limits, check_finite=False, corr=corr)
        return proposal, own, risk

    def preview(self, proposed_weights, own_positions=None):
        """What `step` would execute at the current bar, without changing any state: `(proposal after the
        stop-loss lock, own positions, kernels.RiskOut)`. The target book of a bar whose return is not known
        yet (`mtq_common.evaluation.live_book`)."""
        return self._execute(proposed_weights, own_positions, update=False)

    def _fresh_obs(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        eng = self.engine
        portfolio = eng.tables.portfolio_static.index_select(0, eng.t[rows])  # zero state: flat, no risk in use
        return {"instruments": eng.fresh_instrument_obs(rows), "portfolio": portfolio}

    def _extra_state(self) -> dict:
        return {"risk": {k: v.clone() for k, v in self.risk.items()}}

    def _load_extra_state(self, state: dict) -> None:
        self.risk = {k: v.to(self.engine.device) for k, v in state["risk"].items()}

    def _reset_extra(self, mask: torch.Tensor) -> None:
        # A new episode starts flat: no risk in use.
        self.risk = {k: torch.where(mask, 0.0, v) for k, v in self.risk.items()}

    def step(self, proposed_weights, own_positions=None, observe: bool = True):
        """Trade the proposal for one bar. `own_positions` [B, N] in [-1, 1] (optional) are the positions
        the instruments' own policies asked for, in units of `max_position` (the specialists' signals
        under a meta-controller): the stop-loss and the instruments' observations follow them. Without
        them each instrument's own position is its proposed weight over `max_position`, clipped.

        `observe=False` builds no observation (the returned one and info's ``final_obs`` are None): for a
        twin that only scores the reward (Phases 2 and 3); every state change is the same."""
        obs, reward, truncated, info = self._step(proposed_weights, own_positions, observe)
        return self._finish(obs, reward, truncated, info)

    def trade(self, proposed_weights, own_positions=None, observe: bool = True):
        """`step` before its autoreset: `(observation, reward, truncated, info)`, pure tensor work, for a caller
        that compiles one function around a whole bar (Phases 2 and 3: the decisions, this env and its twin).
        `finish_step(*trade(...))` is exactly `step(...)`."""
        return self._stepped(proposed_weights, own_positions, observe)

    def _stepped(self, proposed_weights, own_positions, observe: bool):
        """`step` before the autoreset: `(observation, reward, truncated, info)` (pure tensor work, compilable)."""
        eng = self.engine
        proposal, own, risk = self._execute(proposed_weights, own_positions, update=True)
        var_usage = risk.var / self.limits.max_var
        t_now = eng.t
        out, stopped, truncated = eng.advance(risk.weights, own, var_usage, self.cost_rate, self.score)
        bar_returns = eng.gather(eng.tables.returns, t_now + 1)  # the bar just completed (known now)
        self.risk = {"var": risk.var, "corr": risk.correlation_exposure, "sector": risk.sector_allocation.amax(-1)}
        info = {
            "net_return": out.net_return,
            "cost": out.cost,
            "equity": out.equity,
            "drawdown": out.drawdown,
            "proposed_weights": proposal,
            "executed_weights": risk.weights,
            "var": risk.var,
            "correlation_exposure": risk.correlation_exposure,
            "sector_allocation": risk.sector_allocation,
            "intervention": risk.intervention,
            "gross_kept": risk.gross_kept,
            "binding": risk.binding,
            "stop_loss": stopped,
            "bar_returns": bar_returns,
            "instrument_vol": eng.tables.variance.index_select(0, t_now).sqrt(),
        }
        if self.has_truth:
            info["regime"] = eng.tables.regime.index_select(0, t_now)
            info["drift"] = eng.tables.drift.index_select(0, t_now)
        return self._observe() if observe else None, out.reward, truncated, info
