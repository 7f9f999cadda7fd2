"""Tests for mtq_common.evaluation.metrics: hand-computed values on tiny series, edge cases, batching, JSON safety."""

import json
import math

import numpy as np
import pytest

from mtq_common.evaluation import metrics as m

# The reference series of the docs: equity 1.1, 0.88, 0.924.
R3 = [0.1, -0.2, 0.05]


# --- return-series metrics: hand-computed values ---------------------------------------------------------


def test_equity_curve_and_total_return():
    np.testing.assert_allclose(m.equity_curve(R3), [1.1, 0.88, 0.924])
    assert m.total_return(R3) == pytest.approx(-0.076)


def test_max_drawdown_from_running_peak():
    # Peak 1.1 after bar 0, trough 0.88 after bar 1: (1.1 - 0.88) / 1.1 = 0.2.
    assert m.max_drawdown(R3) == pytest.approx(0.2)


def test_max_drawdown_counts_starting_capital_as_peak():
    # Equity 0.9 then 0.945: the fall from the starting 1.0 is 10%.
    assert m.max_drawdown([-0.1, 0.05]) == pytest.approx(0.1)


def test_max_drawdown_zero_when_equity_never_falls():
    assert m.max_drawdown([0.01, 0.0, 0.02]) == 0.0


def test_sharpe_by_hand():
    # mean 0.02, std(ddof=1) = sqrt(0.01**2 + 0.01**2) = 0.01 * sqrt(2) -> sqrt(2) per bar.
    assert m.sharpe([0.01, 0.03], bars_per_year=1) == pytest.approx(math.sqrt(2))
    assert m.sharpe([0.01, 0.03], bars_per_year=252) == pytest.approx(math.sqrt(2) * math.sqrt(252))


def test_sharpe_by_hand_reference_series():
    mean = -0.05 / 3
    var = (0.1**2 + 0.2**2 + 0.05**2 - 3 * mean**2) / 2
    assert m.sharpe(R3, bars_per_year=252) == pytest.approx(mean / math.sqrt(var) * math.sqrt(252))


def test_sharpe_subtracts_per_bar_risk_free_rate():
    # Per-bar risk-free 2.52 / 252 = 0.01: excess [0, 0.02], mean 0.01, std 0.01 * sqrt(2).
    value = m.sharpe([0.01, 0.03], bars_per_year=252, risk_free_rate=2.52)
    assert value == pytest.approx(math.sqrt(0.5) * math.sqrt(252))


def test_sortino_by_hand():
    # mean 0.005; downside sqrt((0.01**2 + 0.02**2) / 4) = 0.005 * sqrt(5) -> 1 / sqrt(5) per bar.
    returns = [0.02, -0.01, 0.03, -0.02]
    assert m.sortino(returns, bars_per_year=1) == pytest.approx(1 / math.sqrt(5))
    assert m.sortino(returns, bars_per_year=252) == pytest.approx(math.sqrt(252 / 5))


def test_sortino_zero_without_downside():
    assert m.sortino([0.01, 0.02, 0.0], bars_per_year=252) == 0.0


def test_annual_return_geometric():
    # 1.21 ** (1 / 2) - 1 = 0.1.
    assert m.annual_return([0.1, 0.1], bars_per_year=1) == pytest.approx(0.1)
    # T == bars_per_year: the annual return is the total return.
    assert m.annual_return(R3, bars_per_year=3) == pytest.approx(-0.076)
    assert m.annual_return(R3, bars_per_year=6) == pytest.approx(0.924**2 - 1)


def test_annual_return_wiped_out_is_minus_one():
    assert m.annual_return([-0.5, -1.0], bars_per_year=252) == -1.0
    assert m.annual_return([-1.5], bars_per_year=252) == -1.0


def test_annual_return_overflow_is_capped_finite():
    value = m.annual_return([100.0], bars_per_year=252)
    assert math.isfinite(value) and value > 1e300


def test_annual_volatility_by_hand():
    assert m.annual_volatility([0.01, 0.03], bars_per_year=4) == pytest.approx(0.01 * math.sqrt(2) * 2)
    assert m.annual_volatility([0.01], bars_per_year=252) == 0.0


def test_calmar_by_hand():
    # annual return -0.076 (T == bars_per_year) over max drawdown 0.2.
    assert m.calmar(R3, bars_per_year=3) == pytest.approx(-0.38)
    assert m.calmar([0.01, 0.02], bars_per_year=252) == 0.0  # no drawdown: undefined, reported as 0


# --- edge cases -------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("error")  # a flat series must not even warn (no 0 / 0 anywhere)
def test_flat_series_is_zero_everywhere():
    flat = np.zeros(5)
    for fn in (m.sharpe, m.sortino, m.annual_return, m.annual_volatility, m.calmar):
        assert fn(flat, 252) == 0.0
    for fn in (m.max_drawdown, m.total_return):
        assert fn(flat) == 0.0
    summary = m.summarize(flat, 252, weights=np.zeros(5), var=np.zeros(5), var_limit=0.0)
    assert all(value == 0.0 for key, value in summary.items() if key != "var_compliance")
    assert summary["var_compliance"] == 1.0
    assert not any(math.isnan(value) for value in summary.values())


@pytest.mark.filterwarnings("error")
def test_empty_and_single_bar_series():
    for returns in ([], [0.01]):
        assert m.sharpe(returns, 252) == 0.0
        assert m.annual_volatility(returns, 252) == 0.0
    assert m.sortino([], 252) == 0.0
    assert m.max_drawdown([]) == 0.0
    assert m.total_return([]) == 0.0
    assert m.annual_return([], 252) == 0.0
    assert m.turnover([]) == 0.0
    assert m.var_breach_rate([], []) == 0.0
    assert m.var_compliance([], 0.01) == 0.0
    assert m.win_rate([], []) == 0.0


def test_constant_nonzero_series_has_zero_sharpe():
    # The std of identical values is rounding noise at most: treated as 0, not a huge Sharpe.
    assert m.sharpe([0.01] * 7, 252) == 0.0


def test_all_losses():
    returns = [-0.1, -0.1]
    np.testing.assert_allclose(m.equity_curve(returns), [0.9, 0.81])
    assert m.total_return(returns) == pytest.approx(-0.19)
    assert m.max_drawdown(returns) == pytest.approx(0.19)
    assert m.sharpe(returns, 252) == 0.0  # constant: std 0
    assert m.sortino(returns, 4) == pytest.approx(-1.0 * 2)  # mean -0.1 over downside 0.1, sqrt(4)
    assert m.calmar(returns, 2) == pytest.approx(-0.19 / 0.19)
    assert m.win_rate([1, 1], returns) == 0.0


def test_never_nan_or_inf_from_scalar_metrics():
    rng = np.random.default_rng(0)
    for returns in (rng.normal(0, 0.02, 30), np.zeros(3), np.array([-1.0, 0.5]), np.array([50.0, 50.0])):
        for fn in (m.sharpe, m.sortino, m.annual_return, m.annual_volatility, m.calmar):
            assert math.isfinite(fn(returns, 252))
        for fn in (m.max_drawdown, m.total_return):
            assert math.isfinite(fn(returns))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns on inf - inf; the result is what counts
def test_non_finite_returns_give_nan_never_a_plausible_number():
    """A diverged policy's NaN returns must not report a Sharpe of 0.0 (which reads as a flat, harmless
    run); a flat finite series still has the documented 0.0."""
    returns = np.array([0.01, -0.02, np.nan, 0.005, 0.01])
    for fn in (m.sharpe, m.sortino, m.calmar, m.annual_return, m.annual_volatility):
        assert math.isnan(fn(returns, 252)), fn.__name__
    for fn in (m.max_drawdown, m.total_return):
        assert math.isnan(fn(returns)), fn.__name__
    assert all(math.isnan(m.summarize(returns, 252)[key]) for key in ("sharpe", "sortino", "calmar"))
    # an infinite return has no standard deviation: the Sharpe ratio is NaN too
    for bad in (np.inf, -np.inf):
        assert math.isnan(m.sharpe(np.array([0.01, -0.02, bad, 0.005]), 252))
    assert math.isnan(m.sharpe(np.full(5, np.nan), 252))
    # per column: only the poisoned column is NaN
    batch = np.stack([returns, np.linspace(-0.01, 0.02, 5)], axis=1)
    out = m.sharpe(batch, 252)
    assert math.isnan(out[0]) and math.isfinite(out[1]) and out[1] != 0.0
    assert m.sharpe(np.zeros(5), 252) == 0.0 and m.sharpe([0.01] * 5, 252) == 0.0


# --- trades and win rate ----------------------------------------------------------------------------------


def test_trade_pnls_runs_flips_flats_and_open_trade():
    positions = [0, 1, 1, -1, -1, 0, 0, 1]
    pnl = [5, 1, 2, 3, -4, -0.5, 7, -2]
    # Long bars 1-2 (1 + 2), short bars 3-4 (3 - 4, a direct flip starts a new trade) and the flat bar 5 that
    # closes it (its cost, -0.5), an open long at bar 7. The flat bars 0 and 6 belong to no trade.
    np.testing.assert_allclose(m.trade_pnls(positions, pnl), [3.0, -1.5, -2.0])
    assert m.win_rate(positions, pnl) == pytest.approx(1 / 3)


def test_a_win_pays_its_closing_cost():
    # Held two bars (+7e-4, -5e-4), closed at bar 2 for 3e-4 of costs: a net loss of 1e-4, not a win.
    positions, pnl = [0.1, 0.1, 0.0, 0.0], [7e-4, -5e-4, -3e-4, 0.0]
    np.testing.assert_allclose(m.trade_pnls(positions, pnl), [-1e-4])
    assert m.win_rate(positions, pnl) == 0.0
    # the same trade closed for less than its gain is a win
    assert m.win_rate(positions, [7e-4, -5e-4, -1e-4, 0.0]) == 1.0


def test_single_trade():
    np.testing.assert_allclose(m.trade_pnls([1, 1, 1], [1.0, -2.0, 0.5]), [-0.5])
    assert m.win_rate([1, 1, 1], [1.0, -2.0, 0.5]) == 0.0


def test_direct_flip_long_to_short_is_two_trades():
    np.testing.assert_allclose(m.trade_pnls([1, -1], [0.5, 0.25]), [0.5, 0.25])
    assert m.win_rate([1, -1], [0.5, -0.25]) == 0.5


def test_size_change_on_same_side_is_one_trade():
    np.testing.assert_allclose(m.trade_pnls([0.5, 1.0, 0.25], [1.0, 2.0, 3.0]), [6.0])


def test_open_trade_at_end_counts():
    np.testing.assert_allclose(m.trade_pnls([0, 0, -1, -1], [9.0, 9.0, 1.0, 1.0]), [2.0])
    assert m.win_rate([0, 0, -1, -1], [9.0, 9.0, 1.0, 1.0]) == 1.0


def test_no_trades():
    assert m.trade_pnls([0, 0, 0], [1.0, -1.0, 2.0]).shape == (0,)
    assert m.win_rate([0, 0, 0], [1.0, -1.0, 2.0]) == 0.0


def test_trade_pnls_rejects_2d():
    with pytest.raises(ValueError):
        m.trade_pnls(np.ones((3, 2)), np.ones((3, 2)))


def test_win_rate_pools_trades_over_instruments():
    # Column 0: trades [+2, -1]; column 1: one trade [+6]. Pooled: 2 wins of 3 trades
    # (averaging the per-column rates 0.5 and 1.0 would give 0.75 instead).
    positions = np.array([[1, 0], [1, -1], [0, -1], [-1, -1]])
    pnl = np.array([[1.0, 0.0], [1.0, 2.0], [0.0, 1.0], [-1.0, 3.0]])
    assert m.win_rate(positions, pnl) == pytest.approx(2 / 3)


# --- turnover and VaR -------------------------------------------------------------------------------------


def test_turnover_from_flat():
    # Bar 0 builds the book from flat (0.5 + 0.5), bar 1 closes the short (0.5), bar 2 closes the long (0.5).
    weights = [[0.5, -0.5], [0.5, 0.0], [0.0, 0.0]]
    assert m.turnover(weights) == pytest.approx(2 / 3)
    # 1-D: 1 (open), 0 (hold), 2 (flip long to short).
    assert m.turnover([1.0, 1.0, -1.0]) == pytest.approx(1.0)
    assert isinstance(m.turnover([1.0]), float)


def test_var_breach_rate():
    returns = [-0.03, 0.01, -0.01, -0.05]
    var = [0.02, 0.02, 0.02, 0.04]
    # Losses 0.03 > 0.02 and 0.05 > 0.04 breach; a gain or a smaller loss does not.
    assert m.var_breach_rate(returns, var) == 0.5
    # A loss exactly at the VaR is not a breach.
    assert m.var_breach_rate([-0.02], [0.02]) == 0.0


def test_var_compliance():
    # 0.02 at the limit and 0.0200000001 within rtol comply; 0.03 does not.
    assert m.var_compliance([0.02, 0.0200000001, 0.03], 0.02) == pytest.approx(2 / 3)
    assert m.var_compliance([0.0201], 0.02, rtol=0.01) == 1.0


# --- batching ---------------------------------------------------------------------------------------------


def test_batched_equals_per_column():
    rng = np.random.default_rng(42)
    returns = rng.normal(0.0005, 0.02, size=(60, 3))
    returns[:, 2] = 0.0  # one flat episode in the batch
    for fn in (m.sharpe, m.sortino, m.annual_return, m.annual_volatility, m.calmar):
        batched = fn(returns, 252)
        assert isinstance(batched, np.ndarray) and batched.shape == (3,)
        np.testing.assert_allclose(batched, [fn(returns[:, b], 252) for b in range(3)])
    for fn in (m.max_drawdown, m.total_return):
        np.testing.assert_allclose(fn(returns), [fn(returns[:, b]) for b in range(3)])
    np.testing.assert_allclose(m.equity_curve(returns)[:, 1], m.equity_curve(returns[:, 1]))


def test_batched_extra_axes_and_empty_batch_shape():
    rng = np.random.default_rng(7)
    returns = rng.normal(0.0, 0.01, size=(20, 2, 2))
    assert m.sharpe(returns, 252).shape == (2, 2)
    np.testing.assert_allclose(m.max_drawdown(returns)[1, 0], m.max_drawdown(returns[:, 1, 0]))
    # Undefined batched results are zero arrays of the batch shape, not a scalar.
    np.testing.assert_array_equal(m.sharpe(np.zeros((1, 3)), 252), np.zeros(3))


def test_scalar_results_are_python_floats():
    assert type(m.sharpe(R3, 252)) is float
    assert type(m.max_drawdown(R3)) is float
    assert type(m.var_breach_rate([-0.03], [0.02])) is float


# --- summarize --------------------------------------------------------------------------------------------

BASE_KEYS = {
    "sharpe",
    "sortino",
    "calmar",
    "max_drawdown",
    "win_rate",
    "total_return",
    "annual_return",
    "annual_volatility",
    "turnover",
}


def test_summarize_keys_types_and_json():
    returns = np.array([0.01, -0.02, 0.03, 0.0, -0.01])
    weights = np.array([1.0, 1.0, -1.0, 0.0, 0.5])
    var = np.array([0.015, 0.015, 0.02, 0.01, 0.005])
    summary = m.summarize(returns, 252, weights=weights, var=var, var_limit=0.015)
    assert set(summary) == BASE_KEYS | {"var_compliance", "var_breach_rate"}
    assert all(type(value) is float for value in summary.values())
    json.dumps(summary, allow_nan=False)
    assert summary["sharpe"] == pytest.approx(m.sharpe(returns, 252))
    assert summary["max_drawdown"] == pytest.approx(m.max_drawdown(returns))
    assert summary["turnover"] == pytest.approx(m.turnover(weights))
    # Trades of sign(weights) against the returns: long [0.01, -0.02], short [0.03], long [-0.01].
    assert summary["win_rate"] == pytest.approx(1 / 3)
    # Breaches: 0.02 > 0.015 and 0.01 > 0.005. Compliance: all but 0.02 are within 0.015.
    assert summary["var_breach_rate"] == pytest.approx(2 / 5)
    assert summary["var_compliance"] == pytest.approx(4 / 5)


def test_summarize_minimal_keys_and_fallback_win_rate():
    # No positions, pnl or weights: the share of positive bars among non-zero bars, 2 of 3.
    summary = m.summarize([0.1, 0.0, -0.1, 0.2], 252)
    assert set(summary) == BASE_KEYS
    assert summary["win_rate"] == pytest.approx(2 / 3)
    assert summary["turnover"] == 0.0


def test_summarize_var_without_limit_reports_breaches_only():
    summary = m.summarize([-0.03, 0.01], 252, var=[0.02, 0.02])
    assert set(summary) == BASE_KEYS | {"var_breach_rate"}
    assert summary["var_breach_rate"] == 0.5


def test_summarize_portfolio_win_rate():
    positions = np.array([[1, 0], [1, -1], [0, -1], [-1, -1]])
    pnl = np.array([[1.0, 0.0], [1.0, 2.0], [0.0, 1.0], [-1.0, 3.0]])
    returns = pnl.sum(axis=1) / 100
    # Explicit positions and pnl.
    assert m.summarize(returns, 252, positions=positions, pnl=pnl)["win_rate"] == pytest.approx(2 / 3)
    # Weights stand in for positions when only pnl is given.
    summary = m.summarize(returns, 252, pnl=pnl, weights=positions * 0.5)
    assert summary["win_rate"] == pytest.approx(2 / 3)
    assert summary["turnover"] == pytest.approx(m.turnover(positions * 0.5))


def test_summarize_rejects_ambiguous_input():
    with pytest.raises(ValueError):
        m.summarize(np.zeros((3, 2)), 252)  # batched returns
    with pytest.raises(ValueError):
        m.summarize(np.zeros(3), 252, weights=np.zeros((3, 2)))  # portfolio without per-instrument pnl
    with pytest.raises(ValueError):
        m.summarize(np.zeros(3), 252, pnl=np.zeros(3))  # pnl without positions to delimit trades


def test_summarize_extreme_series_stays_json_valid():
    summary = m.summarize([100.0, -1.0, 5.0], 252, weights=[1.0, 1.0, 1.0])
    json.dumps(summary, allow_nan=False)
    assert all(math.isfinite(value) for value in summary.values())
