"""What a portfolio rollout did, for TensorBoard: episodes, the risk layer and the allocation (Phases 2 and 3).

`PortfolioRolloutStats.add(info, allocation, twin_reward)` after every `PortfolioEnv.step` accumulates on the
device (no host sync in the rollout); `scalars()` reads everything once per iteration as CleanRL-style tags:
`charts/episodic_return`, `charts/twin_reward`, `risk/*` (VaR, VaR compliance, correlation exposure, largest
sector share, intervention, gross kept, `binding_<limit>`) and `allocation/<specialist>`. Phase 2 and Phase 3
log the same tags, so their runs compare tag for tag; `log_validation` writes a validation report's.
"""

from __future__ import annotations

import torch

from kernels import LIMIT_NAMES

_MEANS = ("var", "var_compliance", "correlation_exposure", "sector_max", "intervention", "gross_kept", "twin_reward")


class PortfolioRolloutStats:
    """Per-iteration sums of a portfolio rollout (module docstring)."""

    def __init__(self, specialists: list[str], max_var: float, device):
        self.specialists, self.max_var, self.device = list(specialists), max_var, device
        self.reset()

    def reset(self) -> None:
        """Start a new iteration."""
        zero = torch.zeros((), device=self.device)
        self.sums = {key: zero.clone() for key in (*_MEANS, "episode_return", "episodes")}
        self.binding = torch.zeros(len(LIMIT_NAMES), device=self.device)
        self.allocation = torch.zeros(len(self.specialists), device=self.device)
        self.steps = 0

    def add(self, info: dict, allocation: torch.Tensor, twin_reward: torch.Tensor | None = None) -> None:
        """One step's `info` of `PortfolioEnv`, the allocation traded [B, K] and the twin's reward [B]."""
        s = self.sums
        s["episode_return"] += (info["episode"]["r"] * info["_episode"]).sum()
        s["episodes"] += info["_episode"].sum()
        s["var"] += info["var"].mean()
        s["var_compliance"] += (info["var"] <= self.max_var * (1 + 1e-6)).float().mean()
        s["correlation_exposure"] += info["correlation_exposure"].mean()
        s["sector_max"] += info["sector_allocation"].amax(-1).mean()
        s["intervention"] += info["intervention"].mean()
        s["gross_kept"] += info["gross_kept"].mean()
        if twin_reward is not None:
            s["twin_reward"] += twin_reward.mean()
        self.binding += info["binding"].float().mean(0)
        self.allocation += allocation.mean(0)
        self.steps += 1

    def scalars(self) -> dict[str, float]:
        """The iteration's tags (one host sync)."""
        n = max(self.steps, 1)
        out = {f"risk/{key}": (self.sums[key] / n).item() for key in _MEANS if key != "twin_reward"}
        out["charts/twin_reward"] = (self.sums["twin_reward"] / n).item()
        out.update(
            {f"risk/binding_{name}": v for name, v in zip(LIMIT_NAMES, (self.binding / n).tolist(), strict=True)}
        )
        out.update(
            {f"allocation/{name}": v for name, v in zip(self.specialists, (self.allocation / n).tolist(), strict=True)}
        )
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
