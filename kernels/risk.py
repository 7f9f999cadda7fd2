"""Fused risk computation: the risk manager that maps proposed weights to weights within every limit.

This file is the one place the risk formulas live (DESIGN sections 5 and 8). Per row, given the
proposal `p` [N], the per-bar covariance `cov` [N, N] of the row's current bar and the limits:

1. **Position**: `w = clamp(p, -max_position, max_position)`.
2. **Correlation exposure** `c(w) = x^T R x`, `x = w / sum|w|` (0 when flat), R the correlation
   from `cov`. If `c > max_correlation`, blend towards the diversified book with the same signs and
   gross on the same instruments, `d_i = sign(w_i) * sum|w| / n_active`: the blend keeps every sign
   and the gross, so `c` along it is a quadratic in the blend weight and the smallest weight that
   meets the limit has a closed form. (`max_correlation >= 1` disables the limit: one instrument.)
3. **Sector allocation** `s_k = sum_{i in k} |w_i| / sum |w|`: over-weight sectors are scaled down
   to a common cap `c` (water-filling over the sectors sorted by exposure) so that every share is
   at most `max_sector`; capping one sector raises the others' shares, which is how the exposure
   is redistributed without inventing positions.
4. **Fallback**: should steps 2-3 leave a limit violated (a blend can shift sector shares, a cap can
   shift correlation), the row goes flat. Flat satisfies every limit; `intervention` reports it.
5. **VaR** `= var_scale * sqrt(w^T cov w)` with `var_scale = z(confidence) * sqrt(bars_per_day)`
   (one-day parametric VaR of the signed weights). Above `max_var` the book is scaled by
   `max_var / VaR`, which leaves shares and correlation exposure unchanged: VaR compliance is 100%
   by construction.

Outputs are computed on the executed weights. `intervention = sum|w - p| / max(sum|p|, eps)`.
`ewma_covariance` builds the per-bar covariance table the environments gather from: the EWMA of
returns depends only on the market path, not on any row's actions, so it is computed once per
dataset rather than carried as per-row state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

EPS = 1e-12
LIMIT_RTOL = 1e-6
"""Tolerance of the fallback's limit check (float32 rounding)."""


@dataclass(frozen=True)
class RiskLimits:
    """The hard limits, already relaxed to what the universe makes feasible (see `feasible_limits`)."""

    max_position: float = 0.1
    max_var: float = 0.02
    max_correlation: float = 0.7
    max_sector: float = 0.4
    var_scale: float = 1.6448536269514722
    """z(var_confidence) * sqrt(bars_per_day)."""


class RiskOut(NamedTuple):
    weights: torch.Tensor  # [B, N] executed weights
    var: torch.Tensor  # [B] one-day VaR of the executed book
    correlation_exposure: torch.Tensor  # [B]
    sector_allocation: torch.Tensor  # [B, K] share of gross exposure per sector
    intervention: torch.Tensor  # [B] relative L1 distance from the proposal


def correlation_from_covariance(cov: torch.Tensor) -> torch.Tensor:
    """R_ij = cov_ij / (sigma_i sigma_j); zero-variance instruments get R_ii = 1 and no correlation."""
    sigma = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(EPS).sqrt()
    corr = cov / (sigma.unsqueeze(-1) * sigma.unsqueeze(-2))
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return corr * (1 - eye) + eye


def _quad(x: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x^T M y per row."""
    return (x.unsqueeze(-1) * m * y.unsqueeze(-2)).sum((-1, -2))


def correlation_exposure(weights: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
    """c = x^T R x with x = w / sum|w|; 0 for a flat book."""
    gross = weights.abs().sum(-1, keepdim=True)
    x = weights / gross.clamp_min(EPS)
    return _quad(x, corr, x)


def sector_allocation(weights: torch.Tensor, sector_onehot: torch.Tensor) -> torch.Tensor:
    """s_k = sum_{i in k} |w_i| / sum|w| ([B, K]); 0 for a flat book."""
    exposure = weights.abs() @ sector_onehot
    return exposure / exposure.sum(-1, keepdim=True).clamp_min(EPS)


def sector_cap(exposure: torch.Tensor, max_sector: float) -> torch.Tensor:
    """The common cap c that water-fills sector exposures [B, K] so every share is <= max_sector.

    With exposures sorted in descending order e_(0) >= e_(1) >= ..., capping the first m sectors at
    c requires c = L * R_m / (1 - L m), R_m = sum_{j >= m} e_(j); the right m is the first with
    e_(m) <= c_m <= e_(m-1). m = 0 means nothing is capped (c = L * total >= e_(0)).
    """
    k = exposure.shape[-1]
    e, _ = torch.sort(exposure, dim=-1, descending=True)
    tail = torch.flip(torch.cumsum(torch.flip(e, [-1]), -1), [-1])  # R_m
    m = torch.arange(k, dtype=exposure.dtype, device=exposure.device)
    denom = 1.0 - max_sector * m
    cap = max_sector * tail / denom.clamp_min(EPS)
    prev = torch.cat([torch.full_like(e[..., :1], float("inf")), e[..., :-1]], -1)
    valid = (denom > EPS) & (e <= cap * (1 + LIMIT_RTOL)) & (prev >= cap * (1 - LIMIT_RTOL))
    first = torch.argmax(valid.to(torch.int8), dim=-1, keepdim=True)  # first valid m
    chosen = torch.gather(cap, -1, first).squeeze(-1)
    return torch.where(valid.any(-1), chosen, torch.zeros_like(chosen))


def risk_step_reference(
    proposed: torch.Tensor, cov: torch.Tensor, sector_onehot: torch.Tensor, limits: RiskLimits
) -> RiskOut:
    """Pure-torch reference of the risk manager; `proposed` [B, N], `cov` [B, N, N], `sector_onehot` [N, K]."""
    # 1. position cap
    w = proposed.clamp(-limits.max_position, limits.max_position)
    corr = correlation_from_covariance(cov)

    # 2. correlation exposure: closed-form blend towards the same-sign equal-gross book
    gross = w.abs().sum(-1, keepdim=True)
    active = (w != 0).to(w.dtype)
    n_active = active.sum(-1, keepdim=True).clamp_min(1.0)
    x = w / gross.clamp_min(EPS)
    x_d = torch.sign(w) / n_active
    a = _quad(x, corr, x)
    b = _quad(x, corr, x_d)
    e = _quad(x_d, corr, x_d)
    q = (a - 2 * b + e).clamp_min(0.0)  # (x - x_d)^T R (x - x_d) >= 0
    slope = a - b
    excess = a - limits.max_correlation
    root = (slope - (slope * slope - q * excess).clamp_min(0.0).sqrt()) / q.clamp_min(EPS)
    linear = excess / (2 * slope).clamp_min(EPS)
    alpha = torch.where(q > 1e-9, root, linear).clamp(0.0, 1.0)
    alpha = torch.where(excess > 0, alpha, torch.zeros_like(alpha))
    w = w + alpha.unsqueeze(-1) * (x_d - x) * gross

    # 3. sector caps by water-filling
    exposure = w.abs() @ sector_onehot
    cap = sector_cap(exposure, limits.max_sector)
    factor = torch.where(exposure > cap.unsqueeze(-1), cap.unsqueeze(-1) / exposure.clamp_min(EPS), 1.0)
    w = w * (factor @ sector_onehot.T)

    # 4. fallback: flat if a limit is still violated
    shares = sector_allocation(w, sector_onehot)
    ok = (correlation_exposure(w, corr) <= limits.max_correlation * (1 + LIMIT_RTOL)) & (
        shares.amax(-1) <= limits.max_sector * (1 + LIMIT_RTOL)
    )
    w = w * ok.unsqueeze(-1).to(w.dtype)

    # 5. VaR: scale the whole book down to the limit
    var = limits.var_scale * _quad(w, cov, w).clamp_min(0.0).sqrt()
    scale = torch.where(var > limits.max_var, limits.max_var / var.clamp_min(EPS), 1.0)
    w = w * scale.unsqueeze(-1)

    intervention = (w - proposed).abs().sum(-1) / proposed.abs().sum(-1).clamp_min(EPS)
    return RiskOut(
        weights=w,
        var=var * scale,
        correlation_exposure=correlation_exposure(w, corr),
        sector_allocation=sector_allocation(w, sector_onehot),
        intervention=intervention,
    )


def ewma_covariance(returns: torch.Tensor, span: int) -> torch.Tensor:
    """Per-bar EWMA covariance table [T, N, N]: entry t uses returns up to and including bar t only.

    `S_t = lam * S_{t-1} + r_t r_t^T`, `W_t = lam * W_{t-1} + 1`, `cov_t = S_t / W_t` with
    `lam = 1 - 2 / (span + 1)` (zero-mean, as is usual for daily risk models). Dividing by the
    running weight `W_t` (pandas' `adjust=True`) removes the start-up bias without looking ahead.
    """
    t_bars, n = returns.shape
    lam = 1.0 - 2.0 / (span + 1.0)
    out = torch.empty(t_bars, n, n, dtype=returns.dtype, device=returns.device)
    s = torch.zeros(n, n, dtype=returns.dtype, device=returns.device)
    weight = 0.0
    outer = returns.unsqueeze(-1) * returns.unsqueeze(-2)
    for t in range(t_bars):  # a sequential scan over bars, once per dataset (not per step)
        s = lam * s + outer[t]
        weight = lam * weight + 1.0
        out[t] = s / weight
    return out
