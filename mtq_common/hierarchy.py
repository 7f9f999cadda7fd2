"""Hierarchy composition: meta action + specialists' positions -> proposed instrument weights.

Phase 2, Phase 3 and the evaluation all call `compose_weights`; the risk manager then maps its
proposal to executed weights.

    w_i = clamp(risk_appetite * K * allocation_{k(i)} * position_i * max_position, -max_position, max_position)

`position_i` in [-1, 1] is what specialist k(i) (the owner of instrument i) would trade in its own
environment, `allocation` is a point of the simplex over the K specialists and `risk_appetite` is
in [0, 1]. With an even allocation (1/K each) and full appetite every specialist trades exactly as
it did in Phase 1; the meta-controller scales specialists down (allocation below 1/K) or lets them
use their full position budget (above 1/K, up to the position cap), and the appetite scales the
whole book.
"""

from __future__ import annotations

import torch


def compose_weights(
    allocation: torch.Tensor,
    risk_appetite: torch.Tensor,
    positions: torch.Tensor,
    instrument_specialist: torch.Tensor,
    max_position: float,
) -> torch.Tensor:
    """Proposed weights [B, N] from `allocation` [B, K], `risk_appetite` [B] and `positions` [B, N].

    `instrument_specialist` [N] (long) is the index of each instrument's specialist in `allocation`.
    """
    k = allocation.shape[-1]
    per_instrument = allocation.index_select(-1, instrument_specialist) * k  # [B, N]
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


def meta_observation_size(portfolio_obs_size: int, num_specialists: int) -> int:
    """Length of `meta_observation`'s output."""
    return portfolio_obs_size + 3 * num_specialists


def specialist_signals(positions: torch.Tensor, owner: torch.Tensor, num_specialists: int) -> torch.Tensor:
    """Each specialist's mean signed position and mean |position| over its instruments: [B, 2K]."""
    onehot = torch.nn.functional.one_hot(owner, num_specialists).to(positions.dtype)  # [N, K]
    count = onehot.sum(0).clamp_min(1.0)
    return torch.cat([positions @ onehot / count, positions.abs() @ onehot / count], -1)


def meta_observation(portfolio_obs: torch.Tensor, positions: torch.Tensor, owner: torch.Tensor,
                     performance: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """What the meta-controller sees: the portfolio observation, the specialists' current signals and
    their recent performance (`performance` [B, K], an EMA of each specialist's unit-size sleeve return
    in units of 1e-3 per bar)."""
    signals = specialist_signals(positions, owner, performance.shape[-1])
    return torch.cat([portfolio_obs, signals, performance.clamp(-10.0, 10.0)], -1)


def update_performance(performance: torch.Tensor, positions: torch.Tensor, bar_returns: torch.Tensor,
                       owner: torch.Tensor, done: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """EMA of each specialist's sleeve return `sum_{i in k} position_i * return_i` (unit size, before
    allocation), reset to 0 where an episode ended. Uses the bar just completed: no look-ahead."""
    onehot = torch.nn.functional.one_hot(owner, performance.shape[-1]).to(positions.dtype)
    sleeve = (positions * bar_returns) @ onehot * 1e3
    updated = performance + PERFORMANCE_RATE * (sleeve - performance)
    return torch.where(done.unsqueeze(-1), torch.zeros_like(updated), updated)


class HierarchyPolicy:
    """Frozen specialists + meta-controller as one policy over `PortfolioEnv` (evaluation and Phase 2/3).

    `propose(obs, env)` returns the proposed weights for the env; `observe(info, done)` must follow
    every step to keep the specialists' performance signal current. (Every evaluated policy, the
    rule-based baselines included, has these two methods.) With `meta=None` the allocation is even
    and the appetite full (the "equal allocation" reference of allocation efficiency).
    """

    def __init__(self, specialists, meta, owner: torch.Tensor, max_position: float, num_rows: int, device):
        self.specialists, self.meta = specialists, meta
        self.owner = owner.to(device)
        self.max_position = max_position
        self.k = len(specialists.names)
        self.performance = torch.zeros(num_rows, self.k, device=device)
        self.positions = torch.zeros(num_rows, len(owner), device=device)
        self.last_allocation = torch.full((num_rows, self.k), 1.0 / self.k, device=device)

    @torch.no_grad()
    def propose(self, obs: dict, env=None) -> torch.Tensor:
        self.positions = self.specialists.positions(obs["instruments"], self.owner)
        if self.meta is None:
            allocation = torch.full_like(self.performance, 1.0 / self.k)
            appetite = torch.ones(len(allocation), device=allocation.device)
        else:
            meta_obs = meta_observation(obs["portfolio"], self.positions, self.owner, self.performance)
            allocation, appetite = self.meta.split_action(self.meta.deterministic(meta_obs))
        self.last_allocation = allocation
        return compose_weights(allocation, appetite, self.positions, self.owner, self.max_position)

    def observe(self, info: dict, done: torch.Tensor) -> None:
        self.performance = update_performance(self.performance, self.positions, info["bar_returns"], self.owner,
                                              done)  # fmt: skip


def load_specialists(phase1_dir, market, device) -> tuple:
    """The trained, frozen specialists from `phase1_dir/best.pt`, checked against `market`.

    Returns `(agents, owner)` with `owner [N]` the specialist index of each instrument of `market`.
    Missing, partial or incompatible Phase 1 output (another instrument set, another observation
    layout, a corrupted file) raises `CheckpointError` naming the file and what to run.
    """
    from pathlib import Path

    from mtq_common.checkpoint import CheckpointError, load_checkpoint
    from mtq_common.envs import instrument_obs_size
    from mtq_common.nets import SpecialistAgents

    path = Path(phase1_dir) / "best.pt"
    rerun = f"Run `python phase1_ppo.py --output-dir {phase1_dir}` with this config and these instruments first."
    state = load_checkpoint(path, "phase1", hint=rerun)
    if list(state["symbols"]) != list(market.symbols):
        raise CheckpointError(
            f"{path} was trained on instruments {state['symbols']} but this run trades {market.symbols}. {rerun}"
        )
    expected = instrument_obs_size(market.num_instruments)
    if state["obs_size"] != expected:
        raise CheckpointError(
            f"{path} expects observations of size {state['obs_size']} but this run's layout has {expected} "
            f"(another feature set or a diagnostic run). {rerun}"
        )
    names = list(state["specialists"])
    missing = sorted({s for s in market.sectors if s not in names})
    if missing:
        raise CheckpointError(f"{path} is partial: it has no specialist for {missing} (it holds {names}). {rerun}")
    agents = SpecialistAgents(names, state["obs_size"], state["hidden"])
    try:
        agents.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        msg = f"{path}: the stored weights do not fit the specialists' network ({exc}). {rerun}"
        raise CheckpointError(msg) from None
    agents.to(device).eval()
    for p in agents.parameters():
        p.requires_grad_(False)  # frozen: Phase 2 trains the meta-controller only
    return agents, instrument_specialist_index(market.sectors, names).to(device)


def parameter_fingerprint(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer: equal fingerprints mean bit-identical weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
