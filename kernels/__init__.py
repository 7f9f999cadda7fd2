"""Batched portfolio kernels: each op has a Triton kernel and a pure-torch reference of the same signature.

The dispatchers below are what the environments call. They run the Triton kernel on CUDA tensors
when Triton is importable, and the torch reference otherwise (every CPU tensor, or everywhere when
the environment variable `MTQ_KERNELS=torch`). `MTQ_KERNELS=triton` forces the Triton kernel, which
runs on CPU tensors only under `TRITON_INTERPRET=1` (the tests do this).
"""

from __future__ import annotations

import os

import torch

from kernels.portfolio_step import PortfolioStepOut, RewardParams, portfolio_accounts, portfolio_step_reference
from kernels.risk import LIMIT_NAMES, NOT_APPLIED, RiskLimits, RiskOut, ewma_covariance, risk_step_reference

try:
    from kernels.portfolio_step import portfolio_step_triton
    from kernels.risk import risk_step_triton

    HAS_TRITON = True
except ImportError:  # no triton on this platform (macOS, Windows): the references serve everywhere
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "LIMIT_NAMES",
    "NOT_APPLIED",
    "PortfolioStepOut",
    "RewardParams",
    "RiskLimits",
    "RiskOut",
    "ewma_covariance",
    "portfolio_accounts",
    "portfolio_step",
    "risk_step",
    "use_triton",
]


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the dispatchers take the Triton path for `tensor` (see the module docstring)."""
    mode = os.environ.get("MTQ_KERNELS", "auto")
    if mode == "torch" or not HAS_TRITON:
        return False
    if mode == "triton":
        return True
    return tensor.is_cuda


def portfolio_step(weights, prev_weights, returns, cost_rate, equity, peak, ema_a, ema_b, ema_down, var_usage, params):
    """Fused portfolio step (see `kernels.portfolio_step`); Triton on CUDA, the reference elsewhere."""
    fn = portfolio_step_triton if use_triton(weights) else portfolio_step_reference
    return fn(weights, prev_weights, returns, cost_rate, equity, peak, ema_a, ema_b, ema_down, var_usage, params)


def risk_step(proposed, cov, sector_onehot, limits, check_finite: bool = True, corr=None):
    """Fused risk manager (see `kernels.risk`); Triton on CUDA, the reference elsewhere.

    A non-finite proposal is refused with a `ValueError` naming the row (one host sync; the
    environments pass `check_finite=False` when they have checked or guard the proposals themselves).
    `corr`: the correlation of `cov` when the caller has it (the environments gather it from the market
    tables); derived from `cov` otherwise.
    """
    if check_finite:
        finite = torch.isfinite(proposed).all(-1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0, 0])
            raise ValueError(f"risk_step: the proposal of row {row} is not finite: {proposed[row].tolist()}")
    fn = risk_step_triton if use_triton(proposed) else risk_step_reference
    return fn(proposed, cov, sector_onehot, limits, corr)
