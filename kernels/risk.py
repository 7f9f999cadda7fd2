"""Fused risk computation: the risk manager that maps proposed weights to weights within every limit.

This file is the one place the risk formulas live (DESIGN sections 5 and 8). Per row, given the
proposal `p` [N], the per-bar covariance `cov` [N, N] of the row's current bar and the limits:

1. **Position**: `w = clamp(p, -max_position, max_position)`.
2. **Correlation exposure** `c(w) = x^T R x`, `x = w / sum|w|` (0 when flat), R the correlation
   from `cov`. If `c > max_correlation`, blend towards the diversified book with the same signs and
   gross on the same instruments, `d_i = sign(w_i) * sum|w| / n_active`: the blend keeps every sign
   and the gross, so `c` along it is a quadratic in the blend weight and the smallest weight that
   meets the limit has a closed form (written without cancellation). (`max_correlation >= 1`
   disables the limit: one instrument.)
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

Outputs describe the executed weights (VaR scaling leaves shares and correlation exposure
unchanged). `intervention = sum|w - p| / max(sum|p|, eps)`.
`ewma_covariance` builds the per-bar covariance table the environments gather from: the EWMA of
returns depends only on the market path, not on any row's actions, so it is computed once per
dataset rather than carried as per-row state.
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


def _matvec(m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """M y per row: [B, N, N] x [B, N] -> [B, N]."""
    return torch.bmm(m, y.unsqueeze(-1)).squeeze(-1)


def _quad(x: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x^T M y per row."""
    return (x * _matvec(m, y)).sum(-1)


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
    r_x, r_d = _matvec(corr, x), _matvec(corr, x_d)
    a = (x * r_x).sum(-1)
    b = (x * r_d).sum(-1)
    e = (x_d * r_d).sum(-1)
    q = (a - 2 * b + e).clamp_min(0.0)  # (x - x_d)^T R (x - x_d) >= 0
    slope = a - b
    excess = a - limits.max_correlation
    # smallest root of q a^2 - 2 slope a + excess = 0, in the form without cancellation (q -> 0 included)
    alpha = (excess / (slope + (slope * slope - q * excess).clamp_min(0.0).sqrt()).clamp_min(EPS)).clamp(0.0, 1.0)
    alpha = torch.where(excess > 0, alpha, torch.zeros_like(alpha))
    w = w + alpha.unsqueeze(-1) * (x_d - x) * gross

    # 3. sector caps by water-filling
    exposure = w.abs() @ sector_onehot
    cap = sector_cap(exposure, limits.max_sector)
    factor = torch.where(exposure > cap.unsqueeze(-1), cap.unsqueeze(-1) / exposure.clamp_min(EPS), 1.0)
    w = w * (factor @ sector_onehot.T)

    # 4. fallback: flat if a limit is still violated (flat has exposure 0 and no sector shares)
    shares = sector_allocation(w, sector_onehot)
    exposure_c = correlation_exposure(w, corr)
    ok = (exposure_c <= limits.max_correlation * (1 + LIMIT_RTOL)) & (
        shares.amax(-1) <= limits.max_sector * (1 + LIMIT_RTOL)
    )
    keep = ok.to(w.dtype)
    w = w * keep.unsqueeze(-1)

    # 5. VaR: scale the whole book down to the limit (shares and correlation exposure are unchanged)
    var = limits.var_scale * _quad(w, cov, w).clamp_min(0.0).sqrt()
    scale = torch.where(var > limits.max_var, limits.max_var / var.clamp_min(EPS), 1.0)
    w = w * scale.unsqueeze(-1)

    intervention = (w - proposed).abs().sum(-1) / proposed.abs().sum(-1).clamp_min(EPS)
    return RiskOut(
        weights=w,
        var=var * scale,
        correlation_exposure=exposure_c * keep,
        sector_allocation=shares * keep.unsqueeze(-1),
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


# TRITON KERNEL: one program per row (N and K are small). Defined only where triton imports, so that
# importing `risk_step_triton` raises ImportError elsewhere and `kernels` falls back to the reference.
if triton is not None:
    # jit functions may only read constexpr globals; these mirror the reference's constants
    _EPS: tl.constexpr = tl.constexpr(EPS)
    _UPPER: tl.constexpr = tl.constexpr(1 + LIMIT_RTOL)
    _LOWER: tl.constexpr = tl.constexpr(1 - LIMIT_RTOL)

    @triton.jit
    def _quad_tl(x, m, y):
        """x^T (M y) of a [BLOCK_N] vector pair and a [BLOCK_N, BLOCK_N] tile (padded lanes are 0)."""
        return tl.sum(x * tl.sum(m * y[None, :], axis=1), axis=0)

    @triton.jit
    def _correlation_exposure_tl(w, corr):
        """c = x^T R x with x = w / sum|w|; 0 for a flat book."""
        x = w / tl.maximum(tl.sum(tl.abs(w), axis=0), _EPS)
        return _quad_tl(x, corr, x)

    @triton.jit
    def _sector_allocation_tl(w, onehot):
        """Share of the gross exposure per sector [BLOCK_K]; 0 for a flat book."""
        exposure = tl.sum(tl.abs(w)[:, None] * onehot, axis=0)
        return exposure / tl.maximum(tl.sum(exposure, axis=0), _EPS)

    @triton.jit
    def _sector_cap_tl(exposure, mask_k, max_sector, BLOCK_K: tl.constexpr):
        """`sector_cap` of one row without a sort: each sector's descending rank m comes from pairwise
        comparisons (ties broken by index), and sector k is the candidate e_(m) of the sorted formula."""
        ks = tl.arange(0, BLOCK_K)
        e_k = exposure[:, None]  # the candidate sector (rows of the pairwise tile)
        e_j = exposure[None, :]  # every other sector (columns)
        ahead = ((e_j > e_k) | ((e_j == e_k) & (ks[None, :] < ks[:, None]))) & mask_k[None, :]
        # padded lanes get rank BLOCK_K, past every real rank, so they never match below
        rank = tl.where(mask_k, tl.sum(ahead.to(tl.int32), axis=1), BLOCK_K)
        rank_j = rank[None, :]
        tail = tl.sum(tl.where(rank_j >= rank[:, None], e_j, 0.0), axis=1)  # R_m
        prev = tl.sum(tl.where(rank_j == rank[:, None] - 1, e_j, 0.0), axis=1)  # e_(m-1): one term
        prev = tl.where(rank == 0, float("inf"), prev)
        denom = 1.0 - max_sector * rank.to(tl.float32)
        cap = max_sector * tail / tl.maximum(denom, _EPS)
        valid = mask_k & (denom > _EPS) & (exposure <= cap * _UPPER) & (prev >= cap * _LOWER)
        # the first valid m wins; none valid -> cap 0 (as the reference's argmax + any)
        first = tl.min(tl.where(valid, rank, BLOCK_K), axis=0)
        chosen = tl.sum(tl.where(valid & (rank == first), cap, 0.0), axis=0)
        return tl.where(first < BLOCK_K, chosen, 0.0)

    @triton.jit
    def _risk_step_kernel(
        proposed_ptr,  # [B, N] proposed weights
        cov_ptr,  # [B, N, N] per-bar covariance of each row
        onehot_ptr,  # [N, K] sector membership
        weights_out_ptr,  # [B, N] out: executed weights
        var_out_ptr,  # [B] out: one-day VaR of the executed book
        corr_out_ptr,  # [B] out: correlation exposure of the executed book
        sector_out_ptr,  # [B, K] out: sector shares of the executed book
        intervention_out_ptr,  # [B] out: relative L1 distance from the proposal
        N,  # instruments
        K,  # sectors
        max_position,  # |w_i| limit
        max_var,  # VaR limit
        max_correlation,  # correlation exposure limit
        max_sector,  # sector share limit
        var_scale,  # z(confidence) * sqrt(bars_per_day)
        correlation_check,  # max_correlation * (1 + LIMIT_RTOL), rounded like the reference's scalar
        sector_check,  # max_sector * (1 + LIMIT_RTOL)
        BLOCK_N: tl.constexpr,  # next power of two >= N
        BLOCK_K: tl.constexpr,  # next power of two >= K
    ):
        row = tl.program_id(0).to(tl.int64)
        ns = tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        mask_n = ns < N
        mask_k = ks < K
        mask_nn = mask_n[:, None] & mask_n[None, :]

        p = tl.load(proposed_ptr + row * N + ns, mask=mask_n, other=0.0).to(tl.float32)
        cov_row = cov_ptr + row * N * N
        cov = tl.load(cov_row + ns[:, None] * N + ns[None, :], mask=mask_nn, other=0.0).to(tl.float32)
        diag = tl.load(cov_row + ns * (N + 1), mask=mask_n, other=0.0).to(tl.float32)
        onehot_mask = mask_n[:, None] & mask_k[None, :]
        onehot = tl.load(onehot_ptr + ns[:, None] * K + ks[None, :], mask=onehot_mask, other=0.0).to(tl.float32)

        # correlation; zero-variance instruments get R_ii = 1 and no correlation (sigma clamped)
        sigma = tl.sqrt_rn(tl.maximum(diag, _EPS))
        corr = cov / (sigma[:, None] * sigma[None, :])
        corr = tl.where((ns[:, None] == ns[None, :]) & mask_nn, 1.0, corr)

        # 1. position cap
        w = tl.minimum(tl.maximum(p, -max_position), max_position)

        # 2. correlation exposure: closed-form blend towards the same-sign equal-gross book
        gross = tl.sum(tl.abs(w), axis=0)
        n_active = tl.maximum(tl.sum((w != 0).to(tl.float32), axis=0), 1.0)
        x = w / tl.maximum(gross, _EPS)
        x_d = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0)) / n_active
        a = _quad_tl(x, corr, x)
        b = _quad_tl(x, corr, x_d)
        e = _quad_tl(x_d, corr, x_d)
        q = tl.maximum(a - 2 * b + e, 0.0)
        slope = a - b
        excess = a - max_correlation
        # smallest root of q a^2 - 2 slope a + excess = 0, in the form without cancellation (q -> 0 included)
        alpha = excess / tl.maximum(slope + tl.sqrt_rn(tl.maximum(slope * slope - q * excess, 0.0)), _EPS)
        alpha = tl.minimum(tl.maximum(alpha, 0.0), 1.0)
        alpha = tl.where(excess > 0, alpha, 0.0)
        w = w + alpha * (x_d - x) * gross

        # 3. sector caps by water-filling; factor @ onehot^T spreads each sector's factor to its members
        exposure = tl.sum(tl.abs(w)[:, None] * onehot, axis=0)
        cap = _sector_cap_tl(exposure, mask_k, max_sector, BLOCK_K)
        factor = tl.where(exposure > cap, cap / tl.maximum(exposure, _EPS), 1.0)
        w = w * tl.sum(factor[None, :] * onehot, axis=1)

        # 4. fallback: flat if a limit is still violated (multiplied, as the reference, so signs of zero match)
        shares = _sector_allocation_tl(w, onehot)
        exposure_c = _correlation_exposure_tl(w, corr)
        keep = ((exposure_c <= correlation_check) & (tl.max(shares, axis=0) <= sector_check)).to(tl.float32)
        w = w * keep

        # 5. VaR: scale the whole book down to the limit (shares and correlation exposure are unchanged)
        var = var_scale * tl.sqrt_rn(tl.maximum(_quad_tl(w, cov, w), 0.0))
        scale = tl.where(var > max_var, max_var / tl.maximum(var, _EPS), 1.0)
        w = w * scale

        intervention = tl.sum(tl.abs(w - p), axis=0) / tl.maximum(tl.sum(tl.abs(p), axis=0), _EPS)
        tl.store(weights_out_ptr + row * N + ns, w, mask=mask_n)
        tl.store(var_out_ptr + row, var * scale)
        tl.store(corr_out_ptr + row, exposure_c * keep)
        tl.store(sector_out_ptr + row * K + ks, shares * keep, mask=mask_k)
        tl.store(intervention_out_ptr + row, intervention)

    def risk_step_triton(
        proposed: torch.Tensor, cov: torch.Tensor, sector_onehot: torch.Tensor, limits: RiskLimits
    ) -> RiskOut:
        """Triton version of `risk_step_reference` (same signature and outputs), float32.

        One program per row: the row's proposal, covariance tile and the sector one-hot stay in
        registers through the five steps, and every output is written once.
        """
        proposed, cov, sector_onehot = proposed.contiguous(), cov.contiguous(), sector_onehot.contiguous()
        b, n = proposed.shape
        k = sector_onehot.shape[-1]
        out = RiskOut(
            weights=torch.empty_like(proposed),
            var=proposed.new_empty(b),
            correlation_exposure=proposed.new_empty(b),
            sector_allocation=proposed.new_empty(b, k),
            intervention=proposed.new_empty(b),
        )
        if b == 0:  # an empty grid is not a launch
            return out
        _risk_step_kernel[(b,)](
            proposed,
            cov,
            sector_onehot,
            *out,
            n,
            k,
            limits.max_position,
            limits.max_var,
            limits.max_correlation,
            limits.max_sector,
            limits.var_scale,
            # the reference compares float32 tensors with these Python products
            limits.max_correlation * (1 + LIMIT_RTOL),
            limits.max_sector * (1 + LIMIT_RTOL),
            BLOCK_N=triton.next_power_of_2(n),
            BLOCK_K=triton.next_power_of_2(k),
        )
        return out
