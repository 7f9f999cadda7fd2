"""Fused portfolio step: net return, cost, equity, drawdown and the shaped reward of one bar, per row.

This file is the one place the return, cost and reward formulas live (DESIGN sections 4 and 8).
Per row b of a batch, with executed weights `w`, previous weights `w_prev` and bar returns `ret`
(bar t -> t+1):

    gross    = sum_i w_i * ret_i
    cost     = sum_i cost_rate_i * |w_i - w_prev_i|
    net      = risk_free_rate / bars_per_year + gross - cost    (what the account earns)

Positions are self-financing (futures/CFD style: instrument returns are excess returns), so the
account's equity earns the risk-free rate and its excess return is `gross - cost`: the Sharpe ratio
of the account over the risk-free rate is the Sharpe ratio of the trading itself.
    equity'  = equity * (1 + net);  peak' = max(peak, equity');  drawdown = 1 - equity' / peak'

The reward is computed on the return the agent is scored on, the trading return with weighted costs
less a hurdle of the risk-free rate on its risk capital,
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

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton on this platform: only the reference is defined
    triton = None

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
    net_return: torch.Tensor  # [B] what the account earned this bar (cash yield + trading - cost)
    cost: torch.Tensor  # [B] transaction cost paid
    equity: torch.Tensor  # [B] equity after the bar (relative to the episode's start)
    peak: torch.Tensor  # [B] running equity peak
    drawdown: torch.Tensor  # [B] 1 - equity / peak
    ema_a: torch.Tensor  # [B] moving mean of the scored return
    ema_b: torch.Tensor  # [B] moving second moment
    ema_down: torch.Tensor  # [B] moving downside second moment
    reward: torch.Tensor  # [B]


def portfolio_accounts(weights, prev_weights, returns, cost_rate, equity, peak, risk_free_per_bar: float):
    """The step's accounting alone (the module docstring's first formulas): `(gross, cost, net, equity', peak',
    drawdown)`, each [B]. `portfolio_step_reference` starts with it; an environment that scores no reward (the
    backtests, `PortfolioEnv(score=False)`) calls it alone, at a seventh of the reference's time on a few rows."""
    gross = (weights * returns).sum(-1)
    cost = (cost_rate * (weights - prev_weights).abs()).sum(-1)
    net = risk_free_per_bar + gross - cost
    equity_new = equity * (1.0 + net)
    peak_new = torch.maximum(peak, equity_new)
    drawdown = 1.0 - equity_new / peak_new
    return gross, cost, net, equity_new, peak_new, drawdown


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
    """Pure-torch reference of the fused portfolio step; shapes `[B, N]` and `[B]`.

    `cost_rate` is per row and instrument, `[B, N]` (an `[N]` tensor broadcasts): in the specialist
    environment every row trades a different instrument with its own cost.
    """
    p = params
    gross, cost, net, equity_new, peak_new, drawdown = portfolio_accounts(
        weights, prev_weights, returns, cost_rate, equity, peak, p.risk_free_per_bar
    )

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


# TRITON KERNEL: one program per BLOCK_B rows. Defined only where triton imports, so that importing
# `portfolio_step_triton` raises ImportError elsewhere and `kernels` falls back to the reference.
if triton is not None:
    # jit functions may only read constexpr globals; these mirror the reference's constants
    _EPS: tl.constexpr = tl.constexpr(EPS)
    _RATIO_CLIP: tl.constexpr = tl.constexpr(RATIO_CLIP)
    _RISK_USAGE_SCALE: tl.constexpr = tl.constexpr(RISK_USAGE_SCALE)
    _SHARPE_TARGET_SCALE: tl.constexpr = tl.constexpr(SHARPE_TARGET_SCALE)

    @triton.jit
    def _portfolio_step_kernel(
        weights_ptr,  # [B, N] executed weights
        prev_weights_ptr,  # [B, N] weights held before the bar
        returns_ptr,  # [B, N] bar returns
        cost_rate_ptr,  # [B, N] or [N] proportional cost per unit of turnover, per row and instrument
        equity_ptr,  # [B] equity before the bar
        peak_ptr,  # [B] running peak before the bar
        ema_a_ptr,  # [B] moving mean A
        ema_b_ptr,  # [B] moving second moment B
        ema_down_ptr,  # [B] moving downside second moment DD^2
        var_usage_ptr,  # [B] executed VaR over its limit
        net_out_ptr,  # [B] out: net return
        cost_out_ptr,  # [B] out: transaction cost
        equity_out_ptr,  # [B] out: equity after the bar
        peak_out_ptr,  # [B] out: running peak
        drawdown_out_ptr,  # [B] out: 1 - equity / peak
        ema_a_out_ptr,  # [B] out: updated A
        ema_b_out_ptr,  # [B] out: updated B
        ema_down_out_ptr,  # [B] out: updated DD^2
        reward_out_ptr,  # [B] out: shaped reward
        B,  # rows
        N,  # instruments
        cost_row_stride,  # N for [B, N] rates, 0 for [N] (every row reads the same N rates)
        eta,  # rate of the moving moments
        transaction_cost_weight,  # weight of the cost in the scored return
        risk_free_per_bar,  # the cash yield of the account; the hurdle of the scored return
        downside_volatility_weight,  # weight of the downside ratio
        risk_penalty_weight,  # weight of the drawdown and VaR penalty
        max_drawdown_target,  # drawdown above which the penalty starts
        sharpe_target,  # running Sharpe below which the shortfall is penalised
        sqrt_bars_per_year,  # annualises the running Sharpe
        diversification_weight,  # diversification_bonus_weight * DIVERSIFICATION_SCALE
        diversification_norm,  # 1 - 1 / N, the diversification of the equal-weight book
        HAS_DIVERSIFICATION: tl.constexpr,  # N > 1 (a single instrument has no diversification)
        BLOCK_B: tl.constexpr,  # rows per program
        BLOCK_N: tl.constexpr,  # next power of two >= N
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        row_mask = rows < B
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = rows[:, None] * N + cols[None, :]

        w = tl.load(weights_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        w_prev = tl.load(prev_weights_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        ret = tl.load(returns_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        cost_offsets = rows[:, None] * cost_row_stride + cols[None, :]
        cost_rate = tl.load(cost_rate_ptr + cost_offsets, mask=mask, other=0.0).to(tl.float32)
        equity = tl.load(equity_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        # padded rows get peak 1 so that the drawdown division stays finite (they are never stored)
        peak = tl.load(peak_ptr + rows, mask=row_mask, other=1.0).to(tl.float32)
        ema_a = tl.load(ema_a_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        ema_b = tl.load(ema_b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        ema_down = tl.load(ema_down_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        var_usage = tl.load(var_usage_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)

        # account: what the book earned and paid this bar
        gross = tl.sum(w * ret, axis=1)
        cost = tl.sum(cost_rate * tl.abs(w - w_prev), axis=1)
        net = risk_free_per_bar + gross - cost
        equity_new = equity * (1.0 + net)
        peak_new = tl.maximum(peak, equity_new)
        drawdown = 1.0 - equity_new / peak_new

        # differential Sharpe and downside ratios of the scored return (before the moment update)
        r = gross - transaction_cost_weight * cost - risk_free_per_bar
        d_a = r - ema_a
        d_b = r * r - ema_b
        variance = tl.maximum(ema_b - ema_a * ema_a, _EPS)
        dsr = (ema_b * d_a - 0.5 * ema_a * d_b) / (variance * tl.sqrt_rn(variance))  # variance ** 1.5
        dsr = tl.minimum(tl.maximum(dsr, -_RATIO_CLIP), _RATIO_CLIP)
        dd = tl.sqrt_rn(tl.maximum(ema_down, _EPS))
        centred = r - 0.5 * ema_a
        ddr = tl.where(r > 0, centred / dd, (ema_down * centred - 0.5 * ema_a * r * r) / (dd * dd * dd))
        ddr = tl.minimum(tl.maximum(ddr, -_RATIO_CLIP), _RATIO_CLIP)
        a_new = ema_a + eta * d_a
        b_new = ema_b + eta * d_b
        r_down = tl.minimum(r, 0.0)
        down_new = ema_down + eta * (r_down * r_down - ema_down)

        running_sharpe = a_new / tl.sqrt_rn(tl.maximum(b_new - a_new * a_new, _EPS)) * sqrt_bars_per_year
        if HAS_DIVERSIFICATION:
            gross_exposure = tl.sum(tl.abs(w), axis=1)
            x = tl.abs(w) / tl.maximum(gross_exposure, _EPS)[:, None]
            diversification = tl.where(gross_exposure > 0, (1.0 - tl.sum(x * x, axis=1)) / diversification_norm, 0.0)
        else:
            diversification = tl.zeros_like(gross)
        risk = tl.maximum(drawdown - max_drawdown_target, 0.0) / max_drawdown_target
        risk = risk + _RISK_USAGE_SCALE * var_usage * var_usage
        reward = (
            dsr
            + downside_volatility_weight * ddr
            - risk_penalty_weight * risk
            - _SHARPE_TARGET_SCALE * tl.maximum(sharpe_target - running_sharpe, 0.0)
            + diversification_weight * diversification
        )

        tl.store(net_out_ptr + rows, net, mask=row_mask)
        tl.store(cost_out_ptr + rows, cost, mask=row_mask)
        tl.store(equity_out_ptr + rows, equity_new, mask=row_mask)
        tl.store(peak_out_ptr + rows, peak_new, mask=row_mask)
        tl.store(drawdown_out_ptr + rows, drawdown, mask=row_mask)
        tl.store(ema_a_out_ptr + rows, a_new, mask=row_mask)
        tl.store(ema_b_out_ptr + rows, b_new, mask=row_mask)
        tl.store(ema_down_out_ptr + rows, down_new, mask=row_mask)
        tl.store(reward_out_ptr + rows, reward, mask=row_mask)

    def portfolio_step_triton(
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
        """Triton version of `portfolio_step_reference` (same signature and outputs), float32.

        One program handles a block of rows: the [BLOCK_B, N] tiles of weights and returns are reduced
        along the instruments and every per-row output is written once.
        """
        p = params
        weights, prev_weights, returns = weights.contiguous(), prev_weights.contiguous(), returns.contiguous()
        b, n = weights.shape
        # [N] (or [1, N]): one rate per instrument that every row reads (row stride 0), not a [B, N] copy
        shared = cost_rate.dim() == 1 or cost_rate.shape[0] == 1
        cost_rate = cost_rate.reshape(n).contiguous() if shared else cost_rate.expand(b, n).contiguous()
        equity, peak = equity.contiguous(), peak.contiguous()
        ema_a, ema_b, ema_down = ema_a.contiguous(), ema_b.contiguous(), ema_down.contiguous()
        var_usage = var_usage.contiguous()
        outs = [torch.empty(b, dtype=weights.dtype, device=weights.device) for _ in PortfolioStepOut._fields]
        block_n = triton.next_power_of_2(n)
        block_b = max(1, min(64, 4096 // block_n))  # up to 64 rows, tiles of at most 4k elements
        if b == 0:  # an empty grid is not a launch
            return PortfolioStepOut(*outs)
        grid = (triton.cdiv(b, block_b),)
        _portfolio_step_kernel[grid](
            weights,
            prev_weights,
            returns,
            cost_rate,
            equity,
            peak,
            ema_a,
            ema_b,
            ema_down,
            var_usage,
            *outs,
            b,
            n,
            0 if shared else n,
            p.eta,
            p.transaction_cost_weight,
            p.risk_free_per_bar,
            p.downside_volatility_weight,
            p.risk_penalty_weight,
            p.max_drawdown_target,
            p.sharpe_target,
            p.sqrt_bars_per_year,
            # the reference multiplies the two Python floats first, then the tensor
            p.diversification_bonus_weight * DIVERSIFICATION_SCALE,
            1.0 - 1.0 / n,
            HAS_DIVERSIFICATION=n > 1,
            BLOCK_B=block_b,
            BLOCK_N=block_n,
        )
        return PortfolioStepOut(*outs)
