"""What a portfolio rollout did, for TensorBoard: episodes, the risk layer and the allocation (Phases 2 and 3).

`PortfolioRolloutStats.add(info, reward, allocation, ...)` after every `PortfolioEnv.step` accumulates on
the device (no host sync in the rollout); `scalars()` reads everything once per iteration as CleanRL-style
tags: `charts/episodic_return` (the episodes' sums of the `reward` the script trains on, its `meta_reward`),
`charts/twin_reward`, `risk/*` (VaR, VaR
compliance, correlation exposure, largest sector share, intervention, gross kept, `binding_<limit>`),
`allocation/<specialist>` and, given the appetite, `meta/appetite_mean`, `meta/appetite_std` and
`meta/appetite_vol_corr` (its correlation with the market's log volatility: a meta-controller that times
risk has a clearly negative one). Phase 2 and Phase 3 log the same tags, so their runs compare tag for tag;
`log_validation` writes a validation report's.
"""

from __future__ import annotations

import torch

from kernels import LIMIT_NAMES

_MEANS = ("var", "var_compliance", "correlation_exposure", "sector_max", "intervention", "gross_kept", "twin_reward")
_MOMENTS = ("a", "aa", "v", "vv", "av", "n")  # sums of the appetite a, the log volatility v, their products
# (each group is summed as one stacked tensor per step: a dozen small ops where there were three dozen)


class PortfolioRolloutStats:
    """Per-iteration sums of a portfolio rollout (module docstring)."""

    def __init__(self, specialists: list[str], max_var: float, device, num_rows: int):
        self.specialists, self.max_var, self.device = list(specialists), max_var, device
        self.running = torch.zeros(num_rows, device=device)  # each row's reward so far in its episode
        self.reset()

    def reset(self) -> None:
        """Start a new iteration."""
        zero = torch.zeros((), device=self.device)
        self.sums = {key: zero.clone() for key in ("episode_return", "episodes")}
        self.means = torch.zeros(len(_MEANS), device=self.device)  # the step means of `_MEANS`, summed
        self.moments = torch.zeros(len(_MOMENTS), device=self.device)
        self.binding = torch.zeros(len(LIMIT_NAMES), device=self.device)
        self.allocation = torch.zeros(len(self.specialists), device=self.device)
        self.steps = 0

    def add(self, info: dict, reward: torch.Tensor, allocation: torch.Tensor, twin_reward: torch.Tensor | None = None,
            appetite: torch.Tensor | None = None, log_vol: torch.Tensor | None = None) -> None:  # fmt: skip
        """One step's `info` of `PortfolioEnv`, the reward the script trains on [B] (before the twin's is
        subtracted), the allocation traded [B, K], the twin's reward [B], and the appetite traded [B] with the
        market's log volatility at the rows' bars [B]."""
        s = self.sums
        self.running = self.running + reward  # each episode's sum of what the policy is trained on
        ended = info["_episode"]
        s["episode_return"] += (self.running * ended).sum()
        self.running = torch.where(ended, 0.0, self.running)
        if appetite is not None and log_vol is not None:
            moments = (appetite, appetite * appetite, log_vol, log_vol * log_vol, appetite * log_vol)
            self.moments += torch.stack([*moments, torch.ones_like(appetite)]).sum(1)
        s["episodes"] += info["_episode"].sum()
        var = info["var"]
        twin = torch.zeros_like(var) if twin_reward is None else twin_reward
        # in `_MEANS` order
        columns = (var, (var <= self.max_var * (1 + 1e-6)).float(), info["correlation_exposure"],
                   info["sector_allocation"].amax(-1), info["intervention"], info["gross_kept"], twin)  # fmt: skip
        self.means += torch.stack(columns).mean(1)
        self.binding += info["binding"].float().mean(0)
        self.allocation += allocation.mean(0)
        self.steps += 1

    def restart_episodes(self) -> None:
        """Every row starts a new episode (Phase 3's curriculum moved to another market)."""
        self.running = torch.zeros_like(self.running)

    def state_dict(self) -> dict:
        return {"running": self.running.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.running = state["running"].to(self.device)

    def scalars(self) -> dict[str, float]:
        """The iteration's tags (one host sync)."""
        n = max(self.steps, 1)
        means = dict(zip(_MEANS, (self.means / n).tolist(), strict=True))
        out = {f"risk/{key}": value for key, value in means.items() if key != "twin_reward"}
        out["charts/twin_reward"] = means["twin_reward"]
        out.update(
            {f"risk/binding_{name}": v for name, v in zip(LIMIT_NAMES, (self.binding / n).tolist(), strict=True)}
        )
        out.update(
            {f"allocation/{name}": v for name, v in zip(self.specialists, (self.allocation / n).tolist(), strict=True)}
        )
        *sums, n_a = self.moments.tolist()
        if n_a > 1:
            a, aa, v, vv, av = (x / n_a for x in sums)
            var_a, var_v = max(aa - a * a, 0.0), max(vv - v * v, 0.0)
            out["meta/appetite_mean"], out["meta/appetite_std"] = a, var_a**0.5
            out["meta/appetite_vol_corr"] = (av - a * v) / (var_a * var_v) ** 0.5 if var_a * var_v > 1e-18 else 0.0
        if self.sums["episodes"].item() > 0:
            out["charts/episodic_return"] = (self.sums["episode_return"] / self.sums["episodes"]).item()
        return out


def log_validation(writer, report: dict, global_step: int) -> None:
    """A validation report's tags: `trading/*`, allocation efficiency, VaR compliance and breach rate on the
    validation split, and `utilization/<specialist>` (Phases 2 and 3 alike)."""
    for key in ("sharpe", "sortino", "max_drawdown", "win_rate", "total_return", "turnover"):
        writer.add_scalar(f"trading/{key}", report["portfolio"][key], global_step)
    writer.add_scalar("trading/allocation_efficiency", report["allocation_efficiency"], global_step)
    writer.add_scalar("risk/val_var_compliance", report["portfolio"]["var_compliance"], global_step)
    writer.add_scalar("risk/val_var_breach_rate", report["portfolio"]["var_breach_rate"], global_step)
    for name, share in report["specialist_utilization"].items():
        writer.add_scalar(f"utilization/{name}", share, global_step)
