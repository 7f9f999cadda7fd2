"""Triton kernels against their torch references (on the GPU when there is one, else on the CPU through
TRITON_INTERPRET=1), and the dispatcher.

Inputs are seeded and at realistic scales (positions of at most 0.1, bar returns of about 1%, reward
moments as the environment initialises them): the comparisons are in float32 with rtol 1e-5, and a
few outputs are ill-conditioned far outside those scales (e.g. the downside ratio divides by
sqrt(EPS) when its moment is 0), where a different summation order alone exceeds that tolerance.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels.portfolio_step import PortfolioStepOut, RewardParams, portfolio_step_reference
from kernels.risk import (
    LIMIT_NAMES,
    NOT_APPLIED,
    RiskLimits,
    RiskOut,
    correlation_exposure,
    correlation_from_covariance,
    risk_step_reference,
    sector_allocation,
)

try:
    from kernels.portfolio_step import portfolio_step_triton
    from kernels.risk import risk_step_triton
except ImportError:  # no triton here: only the dispatcher's fallback is tested
    portfolio_step_triton = risk_step_triton = None

needs_triton = pytest.mark.skipif(portfolio_step_triton is None, reason="triton is not installed")

# Where the Triton kernels run: natively on the GPU when there is one (conftest then leaves TRITON_INTERPRET
# unset), else on the CPU under the interpreter. References run on the CPU; outputs come back to compare.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_kernel_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Copies on the kernels' device (strides kept: `.to` preserves a dense non-contiguous layout)."""
    return [t.to(KERNEL_DEVICE) for t in tensors]


def run_triton(kernel, *args):
    """`kernel` on the kernels' device (tensor arguments moved there), its output tuple back on the CPU."""
    out = kernel(*[a.to(KERNEL_DEVICE) if isinstance(a, torch.Tensor) else a for a in args])
    return type(out)(*[x.cpu() for x in out])


BATCHES = (1, 7, 13, 64)  # 1, primes (partial blocks) and a power of two
INSTRUMENTS = (1, 3, 8)
REPO = Path(__file__).resolve().parents[1]


def assert_outputs_match(actual, expected, rtol=1e-5, atol=1e-6):
    """Compare every field of two output tuples; a failure names the field, how many elements differ and where."""
    assert type(actual) is type(expected)
    for name, a, e in zip(expected._fields, actual, expected, strict=True):
        if e.dtype == torch.bool:  # which limits bound: exactly the same
            assert a.dtype == torch.bool and torch.equal(a, e), f"{name}: {a} != {e}"
            continue
        assert a.dtype == e.dtype == torch.float32, name
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


# -- PORTFOLIO STEP ----------------------------------------------------------------------------


def portfolio_inputs(b, n, case, seed=0):
    """Seeded inputs of `portfolio_step` at the environment's scales; `case` picks the book and the bar."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(b, n, generator=g) * 0.2 - 0.1
    prev_weights = torch.rand(b, n, generator=g) * 0.2 - 0.1
    returns = torch.randn(b, n, generator=g) * 0.01
    cost_rate = torch.rand(n, generator=g) * 1e-3
    equity = 0.5 + torch.rand(b, generator=g)
    # half the rows at their peak (a gain sets a new one), the others up to 30% below it
    below = torch.rand(b, generator=g) < 0.5
    peak = torch.where(below, equity * (1 + 0.3 * torch.rand(b, generator=g)), equity)
    ema_a = torch.randn(b, generator=g) * 1e-4
    ema_b = ema_a**2 + (0.5 + torch.rand(b, generator=g)) * 1e-6
    ema_down = ema_b * (0.2 + 0.6 * torch.rand(b, generator=g))
    var_usage = torch.rand(b, generator=g) * 1.5
    if case == "flat":
        weights = torch.zeros(b, n)
    elif case == "unchanged":
        prev_weights = weights.clone()
    elif case == "losses":
        returns, weights = -returns.abs(), weights.abs()
    elif case == "gains":
        returns, weights = returns.abs(), weights.abs()
    elif case == "episode_start":  # the moments as `reset_rows` sets them
        ema_a = torch.zeros(b)
        ema_b = torch.full((b,), 0.01 * 1e-4)
        ema_down = 0.5 * ema_b
        equity, peak, prev_weights = torch.ones(b), torch.ones(b), torch.zeros(b, n)
    else:
        assert case == "random"
    return weights, prev_weights, returns, cost_rate, equity, peak, ema_a, ema_b, ema_down, var_usage


PORTFOLIO_CASES = ("random", "flat", "unchanged", "losses", "gains", "episode_start")
PARAMS = RewardParams(risk_free_per_bar=0.04 / 252)


@needs_triton
@pytest.mark.parametrize("case", PORTFOLIO_CASES)
@pytest.mark.parametrize("n", INSTRUMENTS)
@pytest.mark.parametrize("b", BATCHES)
def test_portfolio_step_triton_matches_reference(b, n, case):
    inputs = portfolio_inputs(b, n, case, seed=1000 * b + n)
    expected = portfolio_step_reference(*inputs, PARAMS)
    actual = run_triton(portfolio_step_triton, *[x.clone() for x in inputs], PARAMS)
    assert_outputs_match(actual, expected)
    if case == "unchanged":
        assert (actual.cost == 0).all()
    if case == "flat":  # no trading gain: net return + cost is the same for every row
        no_gain = actual.net_return + actual.cost
        torch.testing.assert_close(no_gain, no_gain[:1].expand(b))


@needs_triton
def test_portfolio_step_triton_other_params_and_strided_inputs():
    """Non-default reward weights, a drawdown target that binds, and non-contiguous inputs."""
    params = RewardParams(
        eta=0.05,
        transaction_cost_weight=2.0,
        risk_free_per_bar=0.0,
        downside_volatility_weight=0.5,
        risk_penalty_weight=2.0,
        max_drawdown_target=0.05,
        sharpe_target=1.0,
        sqrt_bars_per_year=(252.0 * 6.5) ** 0.5,
        diversification_bonus_weight=1.0,
    )
    inputs = portfolio_inputs(13, 8, "random", seed=7)
    expected = portfolio_step_reference(*inputs, params)
    strided = [x.t().contiguous().t() if x.dim() == 2 else x for x in inputs]
    assert not strided[0].is_contiguous()
    actual = run_triton(portfolio_step_triton, *strided, params)
    assert_outputs_match(actual, expected)
    assert (expected.drawdown > params.max_drawdown_target).any()


# -- RISK STEP ---------------------------------------------------------------------------------


def covariance(b, n, g, correlated=False, scale=1.0):
    """Per-row covariances [b, n, n] of daily-like returns: a random `A A^T / n * 1e-4` plus a diagonal.

    `correlated` adds a block of correlation 0.85-0.95 on the first three ("equity-like") instruments.
    """
    a = torch.randn(b, n, n, generator=g)
    cov = a @ a.transpose(-1, -2) / n * 1e-4 + torch.diag_embed(torch.rand(b, n, generator=g) * 1e-4)
    if correlated:
        m = min(3, n)
        vol = 0.01 + 0.01 * torch.rand(b, m, generator=g)
        rho = 0.85 + 0.1 * torch.rand(b, 1, 1, generator=g)
        block = rho * vol[:, :, None] * vol[:, None, :] + torch.diag_embed((1 - rho[:, :, 0]) * vol**2)
        cov = cov * 0.1
        cov[:, :m, :m] += block
    return cov * scale


def sector_onehot(n, k):
    """Contiguous sectors: with n = 8, k = 3 the first three instruments (the equity-like block) are sector 0."""
    return torch.nn.functional.one_hot(torch.arange(n) * k // n, k).float()


def feasible(n, k, **overrides):
    """The limits `feasible_limits` would build for n instruments in k sectors (defaults otherwise)."""
    limits = {
        "max_sector": NOT_APPLIED if k == 1 else 0.4,
        "max_correlation": NOT_APPLIED if n == 1 else 0.7,
    } | overrides
    return RiskLimits(**limits)


def check_risk(proposed, cov, onehot, limits):
    """Run both implementations on the same inputs, compare, and return the reference's output."""
    expected = risk_step_reference(proposed, cov, onehot, limits)
    actual = run_triton(risk_step_triton, proposed.clone(), cov.clone(), onehot.clone(), limits)
    assert_outputs_match(actual, expected)
    return expected


def capped_stats(proposed, cov, onehot, limits):
    """Correlation exposure and largest sector share of the position-capped proposal (which limits bind)."""
    w = proposed.clamp(-limits.max_position, limits.max_position)
    b_max = proposed.shape[-1] * limits.max_position
    exposure = correlation_exposure(w, correlation_from_covariance(cov), b_max)
    return exposure, sector_allocation(w, onehot, b_max).amax(-1)


def is_flat(out: RiskOut) -> torch.Tensor:
    return (out.weights == 0).all(-1)


def assert_never_flattened(proposed, out: RiskOut):
    """Scaling keeps every sign and never turns a non-flat proposal into a flat book."""
    assert not (is_flat(out) & (proposed != 0).any(-1)).any()
    assert (torch.sign(out.weights) == torch.sign(proposed)).all()


@needs_triton
@pytest.mark.parametrize("n", INSTRUMENTS)
@pytest.mark.parametrize("b", BATCHES)
def test_risk_step_triton_matches_reference(b, n):
    g = torch.Generator().manual_seed(100 * b + n)
    k = min(n, 3)
    proposed = torch.randn(b, n, generator=g) * 0.1  # about a third above max_position
    out = check_risk(proposed, covariance(b, n, g), sector_onehot(n, k), feasible(n, k))
    assert (out.weights.abs() <= 0.1 + 1e-7).all()
    assert_never_flattened(proposed, out)


@needs_triton
@pytest.mark.parametrize(("n", "k"), [(2, 1), (2, 2), (3, 1), (3, 2), (3, 3), (8, 1), (8, 2), (8, 3)])
def test_risk_step_triton_sector_counts(n, k):
    g = torch.Generator().manual_seed(10 * n + k)
    proposed = torch.randn(13, n, generator=g) * 0.1
    out = check_risk(proposed, covariance(13, n, g), sector_onehot(n, k), feasible(n, k))
    assert_never_flattened(proposed, out)


@needs_triton
def test_risk_step_triton_flat_book():
    g = torch.Generator().manual_seed(1)
    out = check_risk(torch.zeros(7, 8), covariance(7, 8, g), sector_onehot(8, 3), feasible(8, 3))
    assert is_flat(out).all() and (out.intervention == 0).all() and (out.sector_allocation == 0).all()
    assert (out.gross_kept == 1).all() and not out.binding.any()


@needs_triton
def test_risk_step_triton_positions_above_max():
    g = torch.Generator().manual_seed(2)
    proposed = torch.randn(13, 8, generator=g) * 0.5
    out = check_risk(proposed, covariance(13, 8, g), sector_onehot(8, 3), feasible(8, 3))
    assert (proposed.abs() > 0.1).float().mean() > 0.5
    assert (out.weights.abs() <= 0.1 + 1e-7).all() and (out.intervention > 0).all()
    assert out.binding[:, LIMIT_NAMES.index("position")].all()


@needs_triton
@pytest.mark.parametrize("k", [2, 3])
def test_risk_step_triton_concentrated_sector(k):
    """One sector holds most of the largest book: it is scaled to exactly max_sector, the rest untouched."""
    g = torch.Generator().manual_seed(3 + k)
    n = 8
    onehot = sector_onehot(n, k)
    in_sector = onehot[:, 0].bool()
    proposed = torch.randn(13, n, generator=g) * 0.005
    proposed[:, in_sector] = 0.1 * torch.sign(torch.randn(13, int(in_sector.sum()), generator=g))
    cov = covariance(13, n, g)
    limits = feasible(n, k, max_sector=0.2, max_correlation=NOT_APPLIED, max_var=1.0)
    out = check_risk(proposed, cov, onehot, limits)
    _, share = capped_stats(proposed, cov, onehot, limits)
    assert (share > limits.max_sector).all()
    assert_never_flattened(proposed, out)
    torch.testing.assert_close(out.sector_allocation[:, 0], torch.full((13,), limits.max_sector), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.weights[:, ~in_sector], proposed[:, ~in_sector])
    assert out.binding[:, LIMIT_NAMES.index("sector")].all()


@needs_triton
def test_risk_step_triton_one_tiny_sector_does_not_shrink_the_book():
    """Forex and equity at the cap, commodities almost flat: no sector limit binds (each share is of the
    largest book, not of the proposal), so the book is kept whole."""
    g = torch.Generator().manual_seed(11)
    onehot = sector_onehot(8, 3)  # sectors of 3, 2 and 3 instruments
    proposed = torch.full((7, 8), 0.1)
    proposed[:, 3:5] = 0.001
    out = check_risk(proposed, covariance(7, 8, g), onehot, feasible(8, 3, max_var=1.0))
    torch.testing.assert_close(out.weights, proposed)
    assert not out.binding.any() and (out.gross_kept == 1).all()


@needs_triton
@pytest.mark.parametrize("n", [3, 8])
def test_risk_step_triton_correlated_long_book(n):
    """Long at the cap on three instruments correlated 0.85-0.95: the whole book is scaled to exactly
    the correlation limit (with nowhere to diversify, n = 3, it is not flattened either)."""
    g = torch.Generator().manual_seed(4 + n)
    proposed = torch.zeros(13, n)
    proposed[:, :3] = 0.1
    cov = covariance(13, n, g, correlated=True)
    onehot = sector_onehot(n, 1)
    limits = feasible(n, 1, max_correlation=0.25 if n == 8 else 0.7, max_var=1.0)
    out = check_risk(proposed, cov, onehot, limits)
    exposure, _ = capped_stats(proposed, cov, onehot, limits)
    assert (exposure > limits.max_correlation).all()
    assert_never_flattened(proposed, out)
    torch.testing.assert_close(out.correlation_exposure, torch.full((13,), limits.max_correlation), rtol=1e-5, atol=0)
    kept = limits.max_correlation / exposure  # one factor on the whole book
    torch.testing.assert_close(out.gross_kept, kept, rtol=1e-5, atol=0)
    assert out.binding[:, LIMIT_NAMES.index("correlation")].all()


@needs_triton
def test_risk_step_triton_var_too_high():
    """A volatile universe: the book is scaled to exactly max_var."""
    g = torch.Generator().manual_seed(6)
    proposed = torch.randn(13, 8, generator=g) * 0.1
    limits = feasible(8, 3)
    out = check_risk(proposed, covariance(13, 8, g, scale=100.0), sector_onehot(8, 3), limits)
    assert (out.var <= limits.max_var * (1 + 1e-6)).all()
    assert torch.isclose(out.var, torch.tensor(limits.max_var), rtol=1e-6, atol=0).sum() >= 10
    assert_never_flattened(proposed, out)


@needs_triton
def test_risk_step_triton_zero_variance_instrument():
    """A zero-variance (cash-like) instrument exercises the sigma clamp of the correlation."""
    g = torch.Generator().manual_seed(7)
    proposed = torch.randn(7, 8, generator=g) * 0.05
    cov = covariance(7, 8, g)
    cov[:, -1, :] = 0.0
    cov[:, :, -1] = 0.0
    check_risk(proposed, cov, sector_onehot(8, 2), feasible(8, 2))
    check_risk(proposed, cov, sector_onehot(8, 3), feasible(8, 3))


def test_correlation_from_the_tables_or_derived_per_row_give_the_same_book():
    """The environments pass R per bar (`corr`, from the market tables); without it the reference derives R from
    each row's covariance: the same outputs, also with a zero-variance instrument (R_ii = 1, no correlation),
    and a flat book has exposure 0. The exposure is w^T R w / (sum|w| B_max) (float64)."""
    g = torch.Generator().manual_seed(3)
    proposed = torch.randn(9, 8, generator=g, dtype=torch.float64) * 0.05
    proposed[0] = 0.0
    cov = covariance(9, 8, g).double()
    cov[:5, -1, :] = 0.0
    cov[:5, :, -1] = 0.0
    corr = correlation_from_covariance(cov)
    onehot, limits = sector_onehot(8, 3), feasible(8, 3, max_correlation=0.03)
    derived = risk_step_reference(proposed.float(), cov.float(), onehot, limits)
    assert_outputs_match(derived, risk_step_reference(proposed.float(), cov.float(), onehot, limits, corr.float()))
    assert derived.binding[:, LIMIT_NAMES.index("correlation")].any()
    w = proposed
    expected = torch.einsum("bi,bij,bj->b", w, corr, w) / (w.abs().sum(-1) * 0.8).clamp_min(1e-12)
    torch.testing.assert_close(correlation_exposure(w, corr, 0.8), expected, rtol=1e-12, atol=1e-15)
    assert correlation_exposure(w, corr, 0.8)[0] == 0.0


@needs_triton
def test_risk_step_triton_disabled_limits_and_strided_inputs():
    """Limits that are not applied (only the position cap acts) and non-contiguous inputs."""
    g = torch.Generator().manual_seed(8)
    proposed = torch.randn(7, 3, generator=g) * 0.1
    cov = covariance(7, 3, g)
    limits = RiskLimits(max_var=10.0, max_correlation=NOT_APPLIED, max_sector=NOT_APPLIED)
    onehot = sector_onehot(3, 2)
    expected = risk_step_reference(proposed, cov, onehot, limits)
    actual = run_triton(risk_step_triton, proposed.t().contiguous().t(), cov.transpose(-1, -2), onehot, limits)
    assert_outputs_match(actual, expected)
    torch.testing.assert_close(actual.weights, proposed.clamp(-0.1, 0.1))


# -- DISPATCHER --------------------------------------------------------------------------------


@pytest.fixture
def spies(monkeypatch):
    """Replace the four implementations in the `kernels` namespace by spies that record their name."""
    calls = []

    def spy(name):
        def fn(*args):
            calls.append(name)
            return name

        return fn

    for name in ("portfolio_step_reference", "portfolio_step_triton", "risk_step_reference", "risk_step_triton"):
        monkeypatch.setattr(kernels, name, spy(name), raising=False)
    return calls


def call_both_dispatchers():
    portfolio = kernels.portfolio_step(*portfolio_inputs(3, 2, "random"), PARAMS)
    risk = kernels.risk_step(torch.zeros(3, 2), torch.zeros(3, 2, 2), sector_onehot(2, 1), RiskLimits())
    return portfolio, risk


@pytest.mark.parametrize("mode", [None, "auto", "torch"])
def test_dispatcher_uses_reference_on_cpu(monkeypatch, spies, mode):
    if mode is None:
        monkeypatch.delenv("MTQ_KERNELS", raising=False)
    else:
        monkeypatch.setenv("MTQ_KERNELS", mode)
    assert call_both_dispatchers() == ("portfolio_step_reference", "risk_step_reference")
    assert spies == ["portfolio_step_reference", "risk_step_reference"]


@needs_triton
def test_dispatcher_uses_triton_when_forced(monkeypatch, spies):
    monkeypatch.setenv("MTQ_KERNELS", "triton")
    assert kernels.HAS_TRITON
    assert call_both_dispatchers() == ("portfolio_step_triton", "risk_step_triton")


@needs_triton
def test_dispatcher_forced_triton_end_to_end(monkeypatch):
    monkeypatch.setenv("MTQ_KERNELS", "triton")
    inputs = portfolio_inputs(3, 3, "random")
    out = run_triton(kernels.portfolio_step, *inputs, PARAMS)
    assert isinstance(out, PortfolioStepOut)
    assert_outputs_match(out, portfolio_step_reference(*inputs, PARAMS))
    g = torch.Generator().manual_seed(9)
    proposed, cov, onehot = torch.randn(3, 3, generator=g) * 0.1, covariance(3, 3, g), sector_onehot(3, 2)
    out = run_triton(kernels.risk_step, proposed, cov, onehot, feasible(3, 2))
    assert isinstance(out, RiskOut)
    assert_outputs_match(out, risk_step_reference(proposed, cov, onehot, feasible(3, 2)))


def test_kernels_import_without_triton():
    """Where triton is missing the Triton names raise ImportError and every mode runs the reference."""
    script = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
import kernels
assert not kernels.HAS_TRITON
for statement in ("from kernels.portfolio_step import portfolio_step_triton",
                  "from kernels.risk import risk_step_triton"):
    try:
        exec(statement)
    except ImportError:
        continue
    raise AssertionError(statement + ": worked without triton")
out = kernels.risk_step(torch.zeros(2, 3), torch.zeros(2, 3, 3), torch.eye(3), kernels.RiskLimits())
assert (out.weights == 0).all()
"""
    env = {**os.environ, "MTQ_KERNELS": "triton", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@needs_triton
def test_triton_empty_batch():
    """A batch of zero rows launches nothing and returns empty outputs of the reference's shapes."""
    inputs = portfolio_inputs(0, 3, "random")
    assert_outputs_match(run_triton(portfolio_step_triton, *inputs, PARAMS), portfolio_step_reference(*inputs, PARAMS))
    args = torch.zeros(0, 3), torch.zeros(0, 3, 3), sector_onehot(3, 2), RiskLimits()
    assert_outputs_match(run_triton(risk_step_triton, *args), risk_step_reference(*args))


def test_per_row_cost_rate_in_both_paths():
    """Each row of the specialist environment trades its own instrument at its own cost (found by review:
    the Triton path once charged every row row 0's rate)."""
    from kernels.portfolio_step import RewardParams, portfolio_step_reference, portfolio_step_triton

    b = 5
    w = torch.full((b, 1), 0.1)
    zeros = torch.zeros(b, 1)
    rates = torch.tensor([[0.001], [0.002], [0.003], [0.004], [0.005]])
    state = [
        torch.ones(b),
        torch.ones(b),
        torch.zeros(b),
        torch.full((b,), 1e-4),
        torch.full((b,), 5e-5),
        torch.zeros(b),
    ]
    ref = portfolio_step_reference(w, zeros, zeros, rates, *state, RewardParams())
    tri = run_triton(portfolio_step_triton, w, zeros, zeros, rates, *state, RewardParams())
    torch.testing.assert_close(ref.cost, rates[:, 0] * 0.1)
    torch.testing.assert_close(tri.cost, ref.cost)
    # one rate for every row, [1, N] or [N]: the kernel reads it at row stride 0 (no [B, N] copy)
    for shared in (rates[2:3], rates[2]):
        tri = run_triton(portfolio_step_triton, w, zeros, zeros, shared, *state, RewardParams())
        torch.testing.assert_close(tri.cost, torch.full((b,), 0.003 * 0.1))


def test_ewma_covariance_is_the_causal_weighted_mean_of_outer_products_bit_for_bit():
    """The per-bar covariance table (a NumPy scan): the recursion of its docstring, bar by bar in torch, bit
    for bit (so the table, and every model trained on it, is the one the torch loop it replaced gave); the
    explicit weighted mean of the outer products; causal; dtype kept."""
    g = torch.Generator().manual_seed(0)
    returns = torch.randn(300, 4, dtype=torch.float64, generator=g) * 0.01
    cov = kernels.ewma_covariance(returns, span=20)
    assert cov.shape == (300, 4, 4) and cov.dtype == torch.float64
    lam = 1.0 - 2.0 / 21.0
    s, weight = torch.zeros(4, 4, dtype=torch.float64), 0.0
    for t in range(300):
        s = lam * s + returns[t].unsqueeze(-1) * returns[t].unsqueeze(-2)
        weight = lam * weight + 1.0
        assert torch.equal(cov[t], s / weight)
    t = 40
    weights = lam ** torch.arange(t, -1, -1, dtype=torch.float64)
    outer = returns[: t + 1].unsqueeze(-1) * returns[: t + 1].unsqueeze(-2)
    expected = (weights[:, None, None] * outer).sum(0) / weights.sum()
    assert torch.allclose(cov[t], expected, rtol=1e-12, atol=0.0)
    later = returns.clone()
    later[150:] *= 3.0
    assert torch.equal(kernels.ewma_covariance(later, 20)[:150], cov[:150])  # the future moves no earlier bar
    assert not torch.equal(kernels.ewma_covariance(later, 20)[150:], cov[150:])
    assert kernels.ewma_covariance(returns.float(), 20).dtype == torch.float32
