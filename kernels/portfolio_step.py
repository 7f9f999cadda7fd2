"""Fused portfolio step: net return, cost, equity, drawdown and the shaped reward of one bar, per row.

This file is the one place the return, cost and reward formulas live (DESIGN sections 4 and 8).
Per row b of a batch, with executed weights `w`, previous weights `w_prev` and bar returns `ret`
(bar t -> t+1):

    gross    = sum_i w_i * ret_i
    cost     = sum_i cost_rate_i * |w_i - w_prev_i|
    net      = gross - cost                                     (what the account earns)
    equity'  = equity * (1 + net);  peak' = max(peak, equity');  drawdown = 1 - equity' / peak'

The reward is computed on the excess return the agent is scored on,
`r = gross - transaction_cost_weight * cost - risk_free_rate / bars_per_year`:

    dsr  = (B * dA - 0.5 * A * dB) / max(B - A^2, eps)^1.5       dA = r - A, dB = r^2 - B
    ddr  = (r - 0.5 A) / DD                              if r > 0 (Moody & Saffell's downside ratio)
         = (DD^2 (r - 0.5 A) - 0.5 A r^2) / DD^3          otherwise,  DD^2 = EMA of min(r, 0)^2
    A', B', DD^2' = exponential moving updates with rate eta
    reward = clip(dsr) + downside_volatility_weight * clip(ddr)
             - risk_penalty_weight * (relu(drawdown - max_drawdown_target) / max_drawdown_target
                                      + RISK_USAGE_SCALE * var_usage^2)
             - SHARPE_TARGET_SCALE * relu(sharpe_target - running_sharpe)
             + diversification_bonus_weight * DIVERSIFICATION_SCALE * diversification

`running_sharpe = A / sqrt(B - A^2) * sqrt(bars_per_year)` (the moving estimate after the update);
`diversification = (1 - sum x_i^2) / (1 - 1/N)` with `x = |w| / sum |w|` (0 when flat or N = 1);
`var_usage` is the executed book's VaR over its limit (0 in the single-instrument environment).
Each differential ratio is clipped to +-RATIO_CLIP: with fat tails a single bar can otherwise
dominate a PPO batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

RATIO_CLIP = 5.0
RISK_USAGE_SCALE = 0.1
SHARPE_TARGET_SCALE = 0.01
DIVERSIFICATION_SCALE = 0.1
EPS = 1e-12


@dataclass(frozen=True)
class RewardParams:
    """Scalars of the reward (from the config's `reward` section and the data's bars per year)."""

    eta: float = 0.01
    """Rate of the moving moments A, B, DD^2 (about a 100-bar memory)."""
    transaction_cost_weight: float = 1.0
    risk_free_per_bar: float = 0.0
    downside_volatility_weight: float = 1.0
    risk_penalty_weight: float = 1.0
    max_drawdown_target: float = 0.15
    sharpe_target: float = 2.0
    sqrt_bars_per_year: float = 252.0**0.5
    diversification_bonus_weight: float = 0.5

    @classmethod
    def from_config(cls, reward_cfg, bars_per_year: float, eta: float = 0.01) -> RewardParams:
        return cls(
            eta=eta,
            transaction_cost_weight=reward_cfg.transaction_cost_weight,
            risk_free_per_bar=reward_cfg.risk_free_rate / bars_per_year,
            downside_volatility_weight=reward_cfg.downside_volatility_weight,
            risk_penalty_weight=reward_cfg.risk_penalty_weight,
            max_drawdown_target=reward_cfg.max_drawdown_target,
            sharpe_target=reward_cfg.sharpe_target,
            sqrt_bars_per_year=bars_per_year**0.5,
            diversification_bonus_weight=reward_cfg.diversification_bonus_weight,
        )


class PortfolioStepOut(NamedTuple):
    net_return: torch.Tensor  # [B] what the account earned this bar
    cost: torch.Tensor  # [B] transaction cost paid
    equity: torch.Tensor  # [B] equity after the bar (relative to the episode's start)
    peak: torch.Tensor  # [B] running equity peak
    drawdown: torch.Tensor  # [B] 1 - equity / peak
    ema_a: torch.Tensor  # [B] moving mean of the scored return
    ema_b: torch.Tensor  # [B] moving second moment
    ema_down: torch.Tensor  # [B] moving downside second moment
    reward: torch.Tensor  # [B]


def portfolio_step_reference(
    weights: torch.Tensor,
    prev_weights: torch.Tensor,
    returns: torch.Tensor,
    cost_rate: torch.Tensor,
    equity: torch.Tensor,
    peak: torch.Tensor,
    ema_a: torch.Tensor,
    ema_b: torch.Tensor,
    ema_down: torch.Tensor,
    var_usage: torch.Tensor,
    params: RewardParams,
) -> PortfolioStepOut:
    """Pure-torch reference of the fused portfolio step; shapes `[B, N]` and `[B]`, `cost_rate` `[N]`."""
    p = params
    gross = (weights * returns).sum(-1)
    cost = (cost_rate * (weights - prev_weights).abs()).sum(-1)
    net = gross - cost
    equity_new = equity * (1.0 + net)
    peak_new = torch.maximum(peak, equity_new)
    drawdown = 1.0 - equity_new / peak_new

    r = gross - p.transaction_cost_weight * cost - p.risk_free_per_bar
    d_a = r - ema_a
    d_b = r * r - ema_b
    variance = (ema_b - ema_a * ema_a).clamp_min(EPS)
    dsr = ((ema_b * d_a - 0.5 * ema_a * d_b) / variance**1.5).clamp(-RATIO_CLIP, RATIO_CLIP)
    dd = ema_down.clamp_min(EPS).sqrt()
    centred = r - 0.5 * ema_a
    ddr = torch.where(r > 0, centred / dd, (ema_down * centred - 0.5 * ema_a * r * r) / dd**3)
    ddr = ddr.clamp(-RATIO_CLIP, RATIO_CLIP)
    a_new = ema_a + p.eta * d_a
    b_new = ema_b + p.eta * d_b
    down_new = ema_down + p.eta * (torch.clamp_max(r, 0.0) ** 2 - ema_down)

    running_sharpe = a_new / (b_new - a_new * a_new).clamp_min(EPS).sqrt() * p.sqrt_bars_per_year
    gross_exposure = weights.abs().sum(-1)
    n = weights.shape[-1]
    if n > 1:
        x = weights.abs() / gross_exposure.clamp_min(EPS).unsqueeze(-1)
        diversification = torch.where(gross_exposure > 0, (1.0 - (x * x).sum(-1)) / (1.0 - 1.0 / n), 0.0)
    else:
        diversification = torch.zeros_like(gross)
    risk = (drawdown - p.max_drawdown_target).clamp_min(0.0) / p.max_drawdown_target
    risk = risk + RISK_USAGE_SCALE * var_usage * var_usage
    reward = (
        dsr
        + p.downside_volatility_weight * ddr
        - p.risk_penalty_weight * risk
        - SHARPE_TARGET_SCALE * (p.sharpe_target - running_sharpe).clamp_min(0.0)
        + p.diversification_bonus_weight * DIVERSIFICATION_SCALE * diversification
    )
    return PortfolioStepOut(net, cost, equity_new, peak_new, drawdown, a_new, b_new, down_new, reward)
