"""Trading performance metrics (numpy, float64).

Conventions
-----------
* Time is axis 0 everywhere. A function given ``returns`` of shape ``[T]`` returns a Python float; given
  ``[T, B...]`` (a batch of evaluation episodes) it reduces over axis 0 and returns a float64 ndarray of
  shape ``[B...]``.
* ``returns[t]`` is the simple return of bar ``t`` (0.01 = +1%). Starting capital is 1.
* Annualisation uses ``bars_per_year`` (252 for daily bars). The risk-free rate is annual and converted to
  a per-bar rate as ``risk_free_rate / bars_per_year``.
* Undefined cases of finite input (a flat series has no Sharpe ratio) are reported as 0.0 (documented per
  function) and an overflow is capped at the largest finite float, so no function returns inf. Non-finite
  input (a diverged policy's NaN returns) gives NaN, never a number that looks like a result: the report
  writers print it as `nan` and JSON stores it as `null`.

Definitions
-----------
* excess return: ``excess = returns - risk_free_rate / bars_per_year``.
* Sharpe ratio: ``mean(excess) / std(excess, ddof=1) * sqrt(bars_per_year)``.
* Sortino ratio: ``mean(excess) / downside_deviation * sqrt(bars_per_year)`` with
  ``downside_deviation = sqrt(mean(minimum(excess, 0) ** 2))`` (mean over all bars, target 0).
* equity curve: ``cumprod(1 + returns)``, the equity after each bar.
* maximum drawdown: the largest fall from a running equity peak, as a positive fraction of that peak;
  the starting capital 1.0 is the first peak.
* total return: ``prod(1 + returns) - 1``.
* annual return (geometric): ``(1 + total_return) ** (bars_per_year / T) - 1``.
* annual volatility: ``std(returns, ddof=1) * sqrt(bars_per_year)``.
* Calmar ratio: ``annual_return / max_drawdown``.
* trade: a maximal run of consecutive bars whose position has the same non-zero sign; its PnL is the sum
  of the per-bar PnL over the run. A trade still open at the last bar counts as closed there.
* win rate: the share of trades with PnL > 0.
* turnover: mean over bars of ``sum_i |w[t, i] - w[t - 1, i]|``, starting from flat (``w[-1] = 0``).
* VaR breach rate: the share of bars whose loss ``-returns[t]`` exceeds that bar's ex-ante VaR ``var[t]``
  (a positive loss fraction).
* VaR compliance: the share of bars whose VaR is within the limit, ``var[t] <= limit * (1 + rtol)``.
"""

from __future__ import annotations

import numpy as np

_TOL = 1e-15
"""A denominator (std, downside deviation, drawdown) at or below this is treated as zero."""

_FLOAT_MAX = float(np.finfo(np.float64).max)


def _as_returns(returns) -> np.ndarray:
    """Return ``returns`` as a float64 array with a time axis."""
    r = np.asarray(returns, dtype=np.float64)
    if r.ndim == 0:
        raise ValueError("returns must have a time axis (axis 0), got a scalar")
    return r


def _finite(x):
    """Return a 0-d result as a Python float, anything else as a float64 array, never inf.

    An overflow is capped at the largest finite float. NaN, only reachable from non-finite input, stays
    NaN: a diverged run must not report a plausible 0.0.
    """
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=np.nan, posinf=_FLOAT_MAX, neginf=-_FLOAT_MAX)
    return float(x) if x.ndim == 0 else x


def _zeros_like_batch(r: np.ndarray):
    """The result for an undefined metric: 0.0 for ``[T]`` input, zeros of shape ``[B...]`` for ``[T, B...]``."""
    return _finite(np.zeros(r.shape[1:]))


def _safe_ratio(numerator, denominator):
    """``numerator / denominator`` where ``|denominator| > _TOL``, else 0.0 (the undefined case); NaN stays NaN."""
    defined = np.abs(denominator) > _TOL
    # Divide by 1.0 where undefined so numpy never evaluates x / 0 (no warning, no inf).
    ratio = np.where(defined, numerator / np.where(defined, denominator, 1.0), 0.0)
    return np.where(np.isnan(numerator) | np.isnan(denominator), np.nan, ratio)


def sharpe(returns, bars_per_year, risk_free_rate=0.0):
    """Annualised Sharpe ratio of per-bar ``returns`` over axis 0.

    ``mean(excess) / std(excess, ddof=1) * sqrt(bars_per_year)``. Undefined, and reported as 0.0, when
    ``T < 2`` (no sample std) or when the std is 0 within 1e-15 (a constant series: the tolerance absorbs
    the rounding noise of ``std`` on identical values).
    """
    r = _as_returns(returns)
    if r.shape[0] < 2:
        return _zeros_like_batch(r)
    excess = r - risk_free_rate / bars_per_year
    ratio = _safe_ratio(excess.mean(axis=0), excess.std(axis=0, ddof=1))
    return _finite(ratio * np.sqrt(bars_per_year))


def sortino(returns, bars_per_year, risk_free_rate=0.0):
    """Annualised Sortino ratio of per-bar ``returns`` over axis 0.

    ``mean(excess) / downside_deviation * sqrt(bars_per_year)`` with
    ``downside_deviation = sqrt(mean(minimum(excess, 0) ** 2))``. Unlike Sharpe it only penalises losses.
    Undefined, and reported as 0.0, when the downside deviation is 0 (no bar below the risk-free rate,
    within 1e-15) or ``T == 0``.
    """
    r = _as_returns(returns)
    if r.shape[0] == 0:
        return _zeros_like_batch(r)
    excess = r - risk_free_rate / bars_per_year
    downside_deviation = np.sqrt(np.mean(np.minimum(excess, 0.0) ** 2, axis=0))
    ratio = _safe_ratio(excess.mean(axis=0), downside_deviation)
    return _finite(ratio * np.sqrt(bars_per_year))


def equity_curve(returns):
    """Equity after each bar, ``cumprod(1 + returns)`` over axis 0, from starting capital 1.

    Same shape as ``returns`` (always an ndarray, also for ``[T]`` input).
    """
    r = _as_returns(returns)
    return _finite(np.cumprod(1.0 + r, axis=0))


def max_drawdown(returns):
    """Largest fall from a running equity peak, as a positive fraction of that peak.

    The starting capital 1.0 counts as the first peak, so a 10% loss on the first bar is a 0.10 drawdown.
    0.0 for a series whose equity never falls (and for ``T == 0``).
    """
    r = _as_returns(returns)
    if r.shape[0] == 0:
        return _zeros_like_batch(r)
    equity = equity_curve(r)
    # The peak is never below the starting capital, which also keeps the division below safe.
    peak = np.maximum(np.maximum.accumulate(equity, axis=0), 1.0)
    drawdown = (peak - equity) / peak
    return _finite(drawdown.max(axis=0))


def total_return(returns):
    """Compounded return over the whole series, ``prod(1 + returns) - 1`` (0.0 for ``T == 0``)."""
    r = _as_returns(returns)
    return _finite(np.prod(1.0 + r, axis=0) - 1.0)


def annual_return(returns, bars_per_year):
    """Geometric annualised return, ``(1 + total_return) ** (bars_per_year / T) - 1``.

    Returns -1.0 when ``1 + total_return <= 0`` (the capital was wiped out: no real root exists) and 0.0
    for ``T == 0``. Extrapolating a large gain over a short window can overflow; it is capped at the
    largest finite float.
    """
    r = _as_returns(returns)
    n_bars = r.shape[0]
    if n_bars == 0:
        return _zeros_like_batch(r)
    growth = np.prod(1.0 + r, axis=0)
    alive = growth > 0.0
    # Raise 1.0 where wiped out so the power never sees a non-positive base; those entries become -1.0.
    with np.errstate(over="ignore"):  # the overflow is capped by _finite
        annual = np.power(np.where(alive, growth, 1.0), bars_per_year / n_bars) - 1.0
    return _finite(np.where(np.isnan(growth), np.nan, np.where(alive, annual, -1.0)))


def annual_volatility(returns, bars_per_year):
    """Annualised volatility, ``std(returns, ddof=1) * sqrt(bars_per_year)``; 0.0 when ``T < 2``."""
    r = _as_returns(returns)
    if r.shape[0] < 2:
        return _zeros_like_batch(r)
    return _finite(r.std(axis=0, ddof=1) * np.sqrt(bars_per_year))


def calmar(returns, bars_per_year):
    """Calmar ratio, ``annual_return / max_drawdown``.

    Undefined, and reported as 0.0, when the maximum drawdown is 0 (within 1e-15): a series that never
    falls has no risk in this measure.
    """
    r = _as_returns(returns)
    return _finite(_safe_ratio(annual_return(r, bars_per_year), max_drawdown(r)))


def trade_pnls(positions, pnl) -> np.ndarray:
    """PnL of each trade in one instrument's position series, in order, as a 1-D float64 array.

    ``positions[t]`` is the position held over bar ``t`` and ``pnl[t]`` the PnL it earned there, net of the
    cost of trading into it (the caller aligns them). A trade is a maximal run of consecutive bars whose
    position has the same non-zero sign: a size change on the same side stays in the trade, a flip from long to
    short starts a new one, and a flat bar (0) ends it. A trade's PnL is the sum of ``pnl`` over its bars and
    over the flat bar that ends it: a flat position earns nothing, so that bar's PnL is what closing the trade
    cost, and a win must pay it. On a direct flip the one bar's cost closes the old trade and opens the new
    one; ``pnl`` alone cannot split it, so it counts in the new trade. A trade still open at the end counts as
    closed at the last bar. Empty when the position is always flat.
    """
    positions = np.asarray(positions, dtype=np.float64)
    pnl = np.asarray(pnl, dtype=np.float64)
    if positions.ndim != 1 or positions.shape != pnl.shape:
        raise ValueError(f"positions and pnl must both be [T], got {positions.shape} and {pnl.shape}")
    side = np.sign(positions)
    in_trade = side != 0.0
    # A trade starts on a non-flat bar whose side differs from the previous bar's (flat before bar 0), and a
    # flat bar whose side differs from the previous bar's closes one.
    changed = np.diff(side, prepend=0.0) != 0.0
    starts = np.flatnonzero(in_trade & changed)
    if starts.size == 0:
        return np.empty(0, dtype=np.float64)
    # reduceat sums from each start up to the next one, which includes the flat bars after a trade: keep the
    # closing one (its cost) and zero the rest, which belong to no trade.
    return np.add.reduceat(np.where(in_trade | changed, pnl, 0.0), starts)


def win_rate(positions, pnl) -> float:
    """Share of trades with PnL > 0 (see ``trade_pnls`` for what a trade is); 0.0 when there are no trades.

    ``positions`` and ``pnl`` are ``[T]`` or ``[T, N]``. With ``[T, N]`` the trades of all N instruments
    are pooled into one rate (the portfolio's win rate over all its trades), rather than averaging
    per-instrument rates, so an instrument with many trades weighs more than one with few.
    """
    positions = np.asarray(positions, dtype=np.float64)
    pnl = np.asarray(pnl, dtype=np.float64)
    if positions.shape != pnl.shape or positions.ndim not in (1, 2):
        raise ValueError(f"positions and pnl must both be [T] or [T, N], got {positions.shape} and {pnl.shape}")
    if positions.ndim == 1:
        positions, pnl = positions[:, None], pnl[:, None]
    per_instrument = [trade_pnls(positions[:, i], pnl[:, i]) for i in range(positions.shape[1])]
    trades = np.concatenate([np.empty(0), *per_instrument])
    if trades.size == 0:
        return 0.0
    return float(np.mean(trades > 0.0))


def turnover(weights) -> float:
    """Mean traded weight per bar: mean over bars of ``sum_i |w[t, i] - w[t - 1, i]|``.

    ``weights`` is ``[T]`` or ``[T, N]``. The book starts flat (``w[-1] = 0``), so building the first
    position counts as trading. 0.0 for ``T == 0``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 1:
        w = w[:, None]
    if w.ndim != 2:
        raise ValueError(f"weights must be [T] or [T, N], got {w.shape}")
    if w.shape[0] == 0:
        return 0.0
    traded = np.abs(np.diff(w, axis=0, prepend=0.0))  # the prepended row of zeros is the flat start
    return float(_finite(traded.sum(axis=1).mean()))


def var_breach_rate(returns, var):
    """Share of bars whose loss exceeds the ex-ante VaR: ``mean(-returns > var)`` over axis 0.

    ``var[t]`` is the VaR forecast for bar ``t`` as a positive loss fraction; a loss exactly equal to it is
    not a breach. For a well-calibrated 99% VaR the rate should be near 0.01. 0.0 for ``T == 0``.
    """
    r = _as_returns(returns)
    v = np.asarray(var, dtype=np.float64)
    if r.shape[0] == 0:
        return _zeros_like_batch(r)
    return _finite(np.mean(-r > v, axis=0))


def var_compliance(var, limit, rtol=1e-6):
    """Share of bars whose VaR is within the risk limit: ``mean(var <= limit * (1 + rtol))`` over axis 0.

    ``rtol`` forgives rounding in a VaR that was scaled to sit exactly at the limit. 0.0 for ``T == 0``
    (no bars, so no evidence of compliance). A NaN VaR counts as not compliant.
    """
    v = _as_returns(var)
    if v.shape[0] == 0:
        return _zeros_like_batch(v)
    return _finite(np.mean(v <= np.asarray(limit, dtype=np.float64) * (1.0 + rtol), axis=0))


def summarize(
    returns,
    bars_per_year,
    risk_free_rate=0.0,
    positions=None,
    pnl=None,
    weights=None,
    var=None,
    var_limit=None,
) -> dict[str, float]:
    """All metrics of one 1-D per-bar return series as a dict of plain Python floats (JSON-ready).

    Keys always present: ``sharpe, sortino, calmar, max_drawdown, win_rate, total_return, annual_return,
    annual_volatility, turnover``. ``var_breach_rate`` is added when ``var`` is given, and
    ``var_compliance`` when ``var`` and ``var_limit`` are both given.

    ``win_rate`` is computed from, in order of preference:

    1. ``positions`` and ``pnl`` (``[T]`` or ``[T, N]``), when both are given;
    2. ``weights`` as the positions when ``positions`` is not given, with ``pnl`` as the per-bar PnL;
    3. without ``pnl``, a 1-D positions/weights series is traded against ``returns`` itself (the trades of
       ``sign(weights)``); a ``[T, N]`` portfolio needs its per-instrument ``pnl`` (ValueError otherwise);
    4. with no positions, weights or pnl at all, the fallback is the share of bars with a positive
       return among the bars with a non-zero return (0.0 when there are none): a per-bar, not a per-trade,
       win rate.

    ``turnover`` is 0.0 when ``weights`` is None.
    """
    r = _as_returns(returns)
    if r.ndim != 1:
        raise ValueError(f"summarize takes 1-D returns [T], got {r.shape}")

    if positions is None:
        positions = weights
    if positions is None:
        if pnl is not None:
            raise ValueError("pnl needs positions or weights to delimit the trades")
        nonzero = r[r != 0.0]
        wins = float(np.mean(nonzero > 0.0)) if nonzero.size else 0.0
    else:
        if pnl is None:
            if np.ndim(positions) != 1:
                raise ValueError("a [T, N] portfolio needs its per-instrument pnl [T, N] for the win rate")
            pnl = r
        wins = win_rate(positions, pnl)

    result = {
        "sharpe": sharpe(r, bars_per_year, risk_free_rate),
        "sortino": sortino(r, bars_per_year, risk_free_rate),
        "calmar": calmar(r, bars_per_year),
        "max_drawdown": max_drawdown(r),
        "win_rate": wins,
        "total_return": total_return(r),
        "annual_return": annual_return(r, bars_per_year),
        "annual_volatility": annual_volatility(r, bars_per_year),
        "turnover": turnover(weights) if weights is not None else 0.0,
    }
    if var is not None:
        if var_limit is not None:
            result["var_compliance"] = var_compliance(var, var_limit)
        result["var_breach_rate"] = var_breach_rate(r, var)
    return {key: float(value) for key, value in result.items()}
