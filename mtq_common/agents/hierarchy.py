"""Hierarchy composition: meta action + specialists' positions -> proposed instrument weights.

Phase 2, Phase 3 and the evaluation all call `compose_weights`; the risk manager then maps its
proposal to executed weights.

    w_i = clamp(risk_appetite * K * allocation_{k(i)} * s_i * position_i * max_position, -max_position, max_position)

`position_i` in [-1, 1] is what specialist k(i) (the owner of instrument i) would trade in its own
environment, `allocation` is a point of the simplex over the K specialists and `risk_appetite` is
in [0, 1]. With an even allocation (1/K each) and full appetite every specialist trades exactly as
it did in Phase 1; the meta-controller scales specialists down (allocation below 1/K) or lets them
use their full position budget (above 1/K, up to the position cap), and the appetite scales the
whole book. `s_i` is 1 unless Phase 3 fit a joint sizing (`MetaController.instrument_scale`): a factor per
instrument, the one thing that sizes instruments of different specialists against each other. A risk-timing
meta-controller's appetite is a learned factor over the volatility-managed rule's (`split_action`,
`risk_appetite`), and its observation carries the market's volatility evidence (`risk_features`, causal, from the
training split's levels stored with its weights). With a fitted allocation rule (`rule_logits`, fit on the
training split by `evaluation.allocation_fit`) its allocation starts there instead of at 1/K: the specialists
whose sleeves earned lately get more; a risk-timing rule also scales the volatility-managed rule's appetite by a
fitted factor of the same evidence and the volatility.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mtq_common.agents.nets import SpecialistAgents
from mtq_common.data.market import MarketData
from mtq_common.data.volatility import VOL_TIMING_GRID, VolLevels, VolTiming, market_sigma, vol_appetite


def compose_weights(
    allocation: torch.Tensor,
    risk_appetite: torch.Tensor,
    positions: torch.Tensor,
    instrument_specialist: torch.Tensor,
    max_position: float,
    instrument_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Proposed weights [B, N] from `allocation` [B, K], `risk_appetite` [B] and `positions` [B, N].

    `instrument_specialist` [N] (long) is the index of each instrument's specialist in `allocation`;
    `instrument_scale` [N] (optional) the joint sizing `s`.
    """
    k = allocation.shape[-1]
    per_instrument = allocation.index_select(-1, instrument_specialist) * k  # [B, N]
    if instrument_scale is not None:
        per_instrument = per_instrument * instrument_scale
    w = risk_appetite.unsqueeze(-1) * per_instrument * positions * max_position
    return w.clamp(-max_position, max_position)


def instrument_specialist_index(sectors: list[str], specialists: list[str]) -> torch.Tensor:
    """For each instrument (by its sector), the index of its specialist in `specialists`."""
    missing = sorted({s for s in sectors if s not in specialists})
    if missing:
        raise ValueError(f"no specialist for sector(s) {missing}; specialists: {specialists}")
    return torch.tensor([specialists.index(s) for s in sectors], dtype=torch.long)


PERFORMANCE_RATE = 0.05
"""EMA rate of each specialist's recent performance signal (about a 20-bar memory)."""
SLEEVE_HALF_LIVES = (5, 20, 60)
"""Half-lives (bars) of the specialists' recent sleeve returns an allocation rule reads (`rule_logits`)."""


def sleeve_rates(half_lives, num_specialists: int) -> torch.Tensor:
    """EMA rates [H * K] of `MetaTracker.sleeves`, half-life-major (K specialists per half-life)."""
    return torch.tensor([1.0 - 0.5 ** (1.0 / h) for h in half_lives for _ in range(num_specialists)])


def rule_features(sleeves: torch.Tensor, risk: torch.Tensor | None, timed: bool) -> torch.Tensor:
    """What a fitted allocation rule reads [B, F]: the specialists' recent unit-size sleeve returns `sleeves`
    [B, H * K] (`MetaTracker.sleeves`) and, for a risk-timing rule (`timed`), the volatility ratios of `risk`
    (`risk_features` without its last column, the rule's appetite)."""
    return torch.cat([sleeves, risk[..., :-1]], -1) if timed else sleeves


def rule_logits(rule: dict, features: torch.Tensor) -> torch.Tensor:
    """A fitted allocation rule's output `(features - mean) / std @ weights + bias`: [B, K] allocation logits,
    then for a risk-timing rule the log of its appetite factor ([B, K + 1]); `rule` holds tensors (`rule_tensors`)."""
    return (features - rule["mean"]) / rule["std"] @ rule["weights"] + rule["bias"]


def rule_tensors(rule: dict, device) -> dict:
    """A stored allocation rule's lists as float32 tensors on `device` (a rule stored without a bias has none)."""
    out = {key: torch.tensor(rule[key], dtype=torch.float32, device=device) for key in ("mean", "std", "weights")}
    out["bias"] = torch.tensor(rule.get("bias", 0.0), dtype=torch.float32, device=device)
    return out


def meta_observation_size(portfolio_obs_size: int, num_specialists: int, timed: bool = False) -> int:
    """Length of `MetaTracker.observe`'s output (`timed`: with `risk_features`' columns)."""
    return portfolio_obs_size + 4 * num_specialists + 1 + (len(VOL_TIMING_GRID["half_life"]) + 1 if timed else 0)


def timing_spec(levels: VolLevels, timing: VolTiming) -> dict:
    """What a risk-timing meta-controller stores with its weights (`nets.MetaController(timing=...)`): the
    training split's volatility levels and the volatility-managed rule it starts from (picked on validation)."""
    return {"half_lives": list(levels.half_lives), "level": [list(x) for x in levels.level],
            "sigma_star": list(levels.sigma_star), **dataclasses.asdict(timing)}  # fmt: skip


def start_timing(timing: dict) -> VolTiming:
    """The volatility-managed rule a risk-timing meta-controller starts from: the choice `timing_spec` stored."""
    return VolTiming(timing["half_life"], timing["power"], timing["picked_on"], timing["val_sharpe"])


def start_levels(timing: dict) -> VolLevels:
    """The training split's volatility levels a risk-timing meta-controller stored (`timing_spec`)."""
    return VolLevels(tuple(timing["half_lives"]), tuple(tuple(x) for x in timing["level"]),
                     tuple(timing["sigma_star"]))  # fmt: skip


def risk_features(timing: dict, market: MarketData, device) -> torch.Tensor:
    """The meta-controller's volatility evidence per bar of `market`, `[T, H + 1]` (causal, `baselines`):
    `log(sigma_hat_t / sigma_star)` for each half-life H of the levels, then the volatility-managed rule's
    appetite `a_t` (the base the appetite is a residual over; `split_action`)."""
    levels = start_levels(timing)
    pairs = zip(levels.half_lives, levels.sigma_star, strict=True)
    columns = [np.log(market_sigma(market, levels, h) / star) for h, star in pairs]
    columns.append(vol_appetite(market, levels, start_timing(timing)))
    return torch.as_tensor(np.stack(columns, -1), dtype=torch.float32, device=device)


def owner_onehot(owner: torch.Tensor, num_specialists: int) -> torch.Tensor:
    """`[N, K]` float: 1 where specialist k owns instrument i (a sum over a specialist's instruments is `@` it)."""
    return torch.nn.functional.one_hot(owner, num_specialists).float()


def specialist_signals(positions: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Each specialist's mean signed position and mean |position| over its instruments: [B, 2K] (`onehot`:
    `owner_onehot`)."""
    onehot = onehot.to(positions.dtype)
    count = onehot.sum(0).clamp_min(1.0)
    return torch.cat([positions @ onehot / count, positions.abs() @ onehot / count], -1)


def split_action(u: torch.Tensor, timed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The meta-controller's action u [B, K+1] -> (allocation [B, K] on the simplex, appetite term [B]).

    `allocation = softmax(u[:K])`. The appetite term is the risk appetite `clamp(u[K], 0, 1)`, or for a
    risk-timing meta-controller (`timed`) the factor `exp(u[K])` over the volatility-managed rule's appetite
    (`risk_appetite`). u = (0, ..., 0, 1) is exactly the equal allocation at full appetite, u = 0 (timed)
    exactly the volatility-managed equal allocation: where the meta-controller starts (`nets.MetaController`)."""
    allocation = torch.softmax(u[..., :-1], -1)
    if not timed:
        return allocation, u[..., -1].clamp(0.0, 1.0)
    return allocation, u[..., -1].clamp(-10.0, 2.0).exp()  # a factor up to e^2: enough to lift any rule to 1


def risk_appetite(factor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """A risk-timing meta-controller's appetite, `min(1, base * factor)`: the rule's `base` [B] times the
    learned `factor` [B] (`split_action`)."""
    return (base * factor).clamp(0.0, 1.0)


class MetaTracker:
    """The meta-controller's side of the hierarchy, one place for Phase 2, Phase 3 and the evaluation.

    Per row it keeps each specialist's recent performance (an EMA of its unit-size sleeve return, in
    units of 1e-3 per bar) and the allocation and appetite the hierarchy holds. The meta-controller's
    output is a *target*: the held allocation moves towards it by `rate` each bar (partial adjustment;
    1 = jump to the target), so per-bar jitter of the meta-controller turns into a fraction of the
    trading. What it held is part of its next observation, so the state stays Markov. It also keeps the
    same sleeve returns' EMAs at `SLEEVE_HALF_LIVES` (`sleeves`), from which a fitted `allocation_rule`
    gives the allocation the action moves from (without a rule, 1/K) and, for a risk-timing rule, a factor
    on the volatility-managed rule's appetite (`start_point`: where a zero action trades).

    Per bar: `observe(portfolio_obs, positions)` -> meta observation; `act(u)` -> (allocation, appetite)
    to trade now; after the env step, `after_step(positions, bar_returns, truncated)` updates the
    performance, restarts the finished rows at the equal allocation and returns what the final
    observations need (`assemble`).
    """

    STATE = ("performance", "allocation", "appetite", "sleeves")

    def __init__(self, owner: torch.Tensor, num_specialists: int, num_rows: int, device, rate: float = 1.0,
                 allocation_rule: dict | None = None):  # fmt: skip
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"the allocation's adjustment rate must be in (0, 1], got {rate}")
        self.owner, self.k, self.rate = owner.to(device), num_specialists, rate
        self.onehot = owner_onehot(self.owner, num_specialists)  # (made once: two ops fewer per bar and call)
        self.performance = torch.zeros(num_rows, num_specialists, device=device)
        self.allocation = torch.full((num_rows, num_specialists), 1.0 / num_specialists, device=device)
        self.appetite = torch.ones(num_rows, device=device)
        # the fitted allocation rule's evidence: each specialist's recent sleeve return at several half-lives
        half_lives = SLEEVE_HALF_LIVES if allocation_rule is None else allocation_rule["half_lives"]
        self.rule = None if allocation_rule is None else rule_tensors(allocation_rule, device)
        self.timed_rule = allocation_rule is not None and allocation_rule.get("timed", False)
        self.start = None  # the starting point of the bar `act` last traded (the paired twin's allocation, appetite)
        self.sleeve_rates = sleeve_rates(half_lives, num_specialists).to(device)
        self.sleeves = torch.zeros(num_rows, len(half_lives) * num_specialists, device=device)

    def observe(self, portfolio_obs: torch.Tensor, positions: torch.Tensor, risk: torch.Tensor | None = None):
        """The meta observation [B, D]: the portfolio, the specialists' signals and recent performance,
        the allocation and appetite held now and, for a risk-timing meta-controller, `risk` [B, H + 1]
        (`risk_features` at the rows' bars)."""
        return self.assemble(portfolio_obs, positions, self.held(), risk)

    def held(self) -> torch.Tensor:
        """The tracker's part of the observation [B, 2K + 1]: performance, allocation and appetite held."""
        return torch.cat([self.performance.clamp(-10.0, 10.0), self.allocation, self.appetite.unsqueeze(-1)], -1)

    def assemble(self, portfolio_obs: torch.Tensor, positions: torch.Tensor, held: torch.Tensor,
                 risk: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """A meta observation from its parts (`held()` now, or as `after_step` returned it)."""
        parts = [portfolio_obs, specialist_signals(positions, self.onehot), held]
        return torch.cat(parts if risk is None else [*parts, risk], -1)

    def act(self, u: torch.Tensor, risk: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Move the held allocation and appetite towards the meta-controller's action `u` (`split_action`);
        return the allocation and the appetite to trade. With `risk` [B, H + 1] (a risk-timing meta-controller:
        `risk_features` at the rows' bars) the held "appetite" is the learned factor over the start's appetite
        (`start_point`), smoothed like the allocation; the start's own timing reaches the book unsmoothed.
        Also sets `start`: this bar's starting point (`start_point`'s, without computing the rule twice)."""
        logits, base = self.rule_start(risk)
        self.start = self._start_of(logits, base)
        if logits is not None:  # the action's allocation part moves from the fitted rule's, not from 1/K
            u = torch.cat([u[..., : self.k] + logits, u[..., self.k :]], -1)
        allocation, appetite = split_action(u, timed=base is not None)
        self.allocation = self.allocation + self.rate * (allocation - self.allocation)
        self.appetite = self.appetite + self.rate * (appetite - self.appetite)
        return self.allocation, self.appetite if base is None else risk_appetite(self.appetite, base)

    def rule_start(self, risk: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The fitted rule's allocation logits [B, K] (None without a rule) and the appetite a timed
        meta-controller's factor multiplies [B] (None without `risk`): the volatility-managed rule's `risk[:, -1]`,
        times the fitted rule's factor if it times risk too."""
        base = None if risk is None else risk[..., -1]
        if self.rule is None:
            return None, base
        out = rule_logits(self.rule, rule_features(self.sleeves, risk, self.timed_rule))
        if self.timed_rule:
            return out[..., : self.k], risk_appetite(out[..., self.k].exp(), base)
        return out, base

    def start_point(self, risk: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The allocation [B, K] and appetite [B] the meta-controller starts from (its zero action, unsmoothed):
        the fitted rule's allocation or 1/K; the volatility-managed appetite (`risk`), times the rule's factor,
        or full appetite."""
        return self._start_of(*self.rule_start(risk))

    def _start_of(self, logits: torch.Tensor | None, base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        allocation = torch.full_like(self.allocation, 1.0 / self.k) if logits is None else torch.softmax(logits, -1)
        return allocation, torch.ones_like(self.appetite) if base is None else base

    def after_step(self, positions: torch.Tensor, bar_returns: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
        """Book the bar just completed, restart the rows whose episode ended, and return every row's `held()`
        before that restart: with the final observation's portfolio part and the specialists' positions on
        it, `assemble` rebuilds the final meta observation (the PPO bootstrap), in one batch after a rollout."""
        onehot = self.onehot.to(positions.dtype)
        sleeve = (positions * bar_returns) @ onehot * 1e3  # unit-size, before allocation: no look-ahead
        self.performance = self.performance + PERFORMANCE_RATE * (sleeve - self.performance)
        # the bar's sleeve once per half-life; cat, not repeat: the same copy, 2-4x faster on these small tensors
        per_half_life = torch.cat([sleeve] * (len(self.sleeve_rates) // self.k), -1)
        self.sleeves = self.sleeves + self.sleeve_rates * (per_half_life - self.sleeves)
        final = self.held()
        done = truncated.unsqueeze(-1)
        self.performance = torch.where(done, 0.0, self.performance)
        self.sleeves = torch.where(done, 0.0, self.sleeves)
        self.allocation = torch.where(done, 1.0 / self.k, self.allocation)
        self.appetite = torch.where(truncated, 1.0, self.appetite)
        return final

    def state_dict(self) -> dict:
        return {name: getattr(self, name).clone() for name in self.STATE}

    def load_state_dict(self, state: dict) -> None:
        for name in self.STATE:
            if name in state:  # (a latest.pt from before the sleeves were kept has none: they restart at 0)
                setattr(self, name, state[name].to(getattr(self, name).device))


class SharedPositions:
    """`specialists.positions`, computed once for several hierarchy policies over the same specialists that ask
    about the same observation (in one backtest: the system, the equal allocation, its volatility-managed form).

    Why it holds: a specialist's observation follows its own positions only (`engine.TradingEngine`: the own
    book, its entry, stop-loss and account), never the allocation or the risk manager's scaling, so rows that
    start at the same bar under the same specialists see the same observations bar after bar, and the positions
    are the same. The answer is reused only when the observation (and `owner`) are exactly those of the last
    call (`torch.equal`); otherwise it is computed afresh. Make one per evaluation: the specialists' weights
    must not change while it lives (Phase 3 trains them between validations)."""

    def __init__(self, specialists):
        self.specialists = specialists
        self.obs = self.owner = self.out = None
        self.hits = 0  # how many calls reused the last answer (tests read it)

    def __call__(self, obs: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        if self.obs is not None and self.owner is owner and self.obs.shape == obs.shape and torch.equal(self.obs, obs):
            self.hits += 1
            return self.out
        # a copy: the caller's tensor may be a view of the env's observation, which must not change the key
        self.obs, self.owner, self.out = obs.clone(), owner, self.specialists.positions(obs, owner)
        return self.out


class HierarchyPolicy:
    """Frozen specialists + meta-controller as one policy over `PortfolioEnv` (evaluation and Phase 2/3).

    `propose(obs, env)` returns the proposed weights and sets `own_positions` (the specialists' positions,
    which the env's stop-loss and the specialists' observations follow); `observe(info, done)` must follow
    every step (`backtest.policy_step` does all three). Every evaluated policy, the rule-based
    baselines included, has `propose` and `observe`. With `meta=None` the allocation is even and the
    appetite full (the "equal allocation" reference of allocation efficiency). `positions` (default
    `specialists.positions`) computes the specialists' positions: a `SharedPositions` shared by several
    hierarchies over the same specialists computes them once a bar.
    """

    def __init__(self, specialists, meta, owner: torch.Tensor, max_position: float, num_rows: int, device,
                 market: MarketData | None = None, positions=None):  # fmt: skip
        self.specialists, self.meta = specialists, meta
        self.positions = positions or specialists.positions
        # a risk-timing meta-controller reads the volatility evidence of the market it trades (`risk_features`)
        self.risk = None
        if meta is not None and meta.timing is not None:
            if market is None:
                raise ValueError("this meta-controller times risk: HierarchyPolicy needs the market it trades")
            self.risk = risk_features(meta.timing, market, device)
        self.owner = owner.to(device)
        self.max_position = max_position
        self.k = len(specialists.names)
        rate = 1.0 if meta is None else meta.allocation_rate
        self.tracker = MetaTracker(self.owner, self.k, num_rows, device, rate, getattr(meta, "allocation_rule", None))
        self.own_positions = torch.zeros(num_rows, len(owner), device=device)
        self.scale = None if meta is None else meta.sizing(device)  # Phase 3's joint sizing, if it fit one
        self.last_allocation = self.tracker.allocation
        self.last_appetite = None if meta is None else self.tracker.appetite

    @torch.no_grad()
    def propose(self, obs: dict, env=None) -> torch.Tensor:
        self.own_positions = self.positions(obs["instruments"], self.owner)
        if self.meta is None:
            allocation, appetite = self.tracker.allocation, self.tracker.appetite
        else:
            risk = None if self.risk is None else self.risk.index_select(0, env.bar)
            meta_obs = self.tracker.observe(obs["portfolio"], self.own_positions, risk)
            allocation, appetite = self.tracker.act(self.meta.deterministic(meta_obs), risk)
        self.last_allocation, self.last_appetite = allocation, None if self.meta is None else appetite
        return compose_weights(allocation, appetite, self.own_positions, self.owner, self.max_position, self.scale)

    def observe(self, info: dict, done: torch.Tensor) -> None:
        if self.meta is None:  # the equal allocation reads nothing the tracker books: its allocation stays 1/K
            return
        self.tracker.after_step(self.own_positions, info["bar_returns"], done)


def load_specialists(phase1_dir, market, device) -> tuple:
    """The frozen Phase 1 specialists (`SpecialistAgents.from_checkpoint`) and `owner [N]`, the specialist
    index of each instrument of `market`."""
    agents = SpecialistAgents.from_checkpoint(phase1_dir, market, device)
    return agents, instrument_specialist_index(market.sectors, agents.names).to(device)
