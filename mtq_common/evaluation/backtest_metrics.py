"""The metrics of one `Backtest` (`backtest.py`): the report's numbers for a policy, its risk layer, its
regimes, how it used the specialists and, for a meta-controller, its risk timing.

Conventions of the report (all values plain JSON floats, ints and strings):
* returns are the account's (`info["net_return"]`: cash yield + trading - costs); Sharpe and Sortino
  are over the configured risk-free rate, so they measure the trading itself;
* per-instrument pnl `pnl[t, i] = w[t, i] * r[t+1, i] - cost_rate_i * |w[t, i] - h[t, i]|` (executed
  weights, the bar's return, that instrument's own cost on the trade from the holdings `h`, the last
  book drifted by the last bar); `net_return = rf / bars_per_year + sum_i pnl`.
  The win rate pools the trades of every instrument (`metrics.win_rate`); a trade that runs across a
  segment boundary counts as one trade (the stitched series stands for one unbroken run);
* VaR: the environment's VaR is one-day (`z * sqrt(w' Sigma_bar w * bars_per_day)`). Compliance
  compares it with `max_portfolio_var`; the VaR backtest (`var_breach_rate`) compares each bar's
  account loss with the ex-ante VaR scaled to one bar, `VaR / sqrt(bars_per_day)` (the same thing
  on daily bars), so about 1 - var_confidence of the bars should breach it for a well-sized model;
* `sharpe_before_costs` is the Sharpe ratio of `net_return + cost`; `turnover_per_vol` is the mean
  turnover per bar over the annual volatility (what a policy trades per unit of the risk it takes);
* the risk layer (`risk_layer_stats`): the share of bars on which each limit changed the book, the mean
  share of the proposed gross exposure kept, and the share of non-flat proposals executed flat (0 by
  construction, DESIGN section 5);
* per-regime metrics use the bars whose position was chosen in that regime (synthetic) or realised
  volatility tercile (CSV); the drawdown of such a non-contiguous subset is that of its bars
  concatenated in time order, not a drawdown the account actually went through.
"""

from __future__ import annotations

import math

import numpy as np

from kernels import LIMIT_NAMES
from mtq_common.data.market import REGIME_NAMES
from mtq_common.evaluation import metrics
from mtq_common.evaluation.backtest import Backtest

PORTFOLIO_KEYS = (
    "sharpe", "sortino", "calmar", "max_drawdown", "win_rate", "total_return", "annual_return",
    "annual_volatility", "var_compliance", "var_breach_rate", "turnover", "sharpe_before_costs", "turnover_per_vol",
)  # fmt: skip
"""Metrics reported for the system and for every baseline (DESIGN section 9, plus the annual return)."""
REGIME_KEYS = ("sharpe", "max_drawdown", "win_rate", "total_return", "annual_volatility")
VOL_TERCILES = ("low_vol", "mid_vol", "high_vol")


def appetite_stats(bt: Backtest) -> dict[str, float] | None:
    """A meta-controller's risk timing, measured: its appetite's mean, spread and minimum over the backtest and
    its correlation with the log of the market's volatility at the bar (negative: it cuts risk when the market
    is volatile). None for a policy without an appetite."""
    if bt.appetite is None:
        return None
    a, v = bt.appetite, np.log(np.maximum(bt.realised_vol, 1e-12))
    corr = float(np.corrcoef(a, v)[0, 1]) if a.std() > 1e-12 and v.std() > 1e-12 else 0.0
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "vol_correlation": corr}


def backtest_metrics(bt: Backtest, risk_free_rate: float) -> dict[str, float]:
    """`PORTFOLIO_KEYS` of one backtest (`metrics.summarize` with weights, per-instrument pnl and VaR).

    Turnover is what was traded, `sum_i |w_i - h_i|` per bar (from the drifted holdings h), averaged
    over bars. The VaR backtest compares each bar's account loss with the one-day VaR over
    sqrt(bars_per_day), the VaR of one bar; compliance (the same scaling on both sides) is one-day
    VaR <= max_var.
    """
    per_bar = 1.0 / math.sqrt(bt.bars_per_day)
    summary = metrics.summarize(
        bt.net_return,
        bt.bars_per_year,
        risk_free_rate,
        pnl=bt.pnl,
        weights=bt.weights,
        var=bt.var * per_bar,
        var_limit=bt.max_var * per_bar,
    )
    summary["turnover"] = float(bt.traded.mean()) if len(bt.traded) else 0.0
    summary["sharpe_before_costs"] = metrics.sharpe(bt.net_return + bt.cost, bt.bars_per_year, risk_free_rate)
    vol = summary["annual_volatility"]
    summary["turnover_per_vol"] = summary["turnover"] / vol if vol > 0 else 0.0
    return {key: summary[key] for key in PORTFOLIO_KEYS}


def risk_layer_stats(bt: Backtest) -> dict:
    """What the risk manager did to a policy's proposals (DESIGN section 5), over the bars whose
    proposal was not flat: the share of those bars on which each limit changed the book, the mean
    share of the proposed gross exposure kept, and the share executed flat (0 by construction)."""
    active = np.abs(bt.proposed).sum(-1) > 0
    if not active.any():
        return {"binding": dict.fromkeys(LIMIT_NAMES, 0.0), "gross_kept": 1.0, "flat_books": 0.0, "bars": 0}
    flat = (bt.weights[active] == 0).all(-1)
    return {
        "binding": {name: float(bt.binding[active, k].mean()) for k, name in enumerate(LIMIT_NAMES)},
        "gross_kept": float(bt.gross_kept[active].mean()),
        "flat_books": float(flat.mean()),
        "bars": int(active.sum()),
    }


def _subset_metrics(bt: Backtest, mask: np.ndarray, risk_free_rate: float) -> dict:
    """REGIME_KEYS over the bars in `mask`, concatenated in time order, plus the bar count."""
    summary = metrics.summarize(
        bt.net_return[mask], bt.bars_per_year, risk_free_rate, pnl=bt.pnl[mask], weights=bt.weights[mask]
    )
    return {**{key: summary[key] for key in REGIME_KEYS}, "bars": int(mask.sum())}


def per_regime_metrics(bt: Backtest, risk_free_rate: float) -> dict[str, dict]:
    """Metrics by market state: the synthetic regime of the bar the position was chosen at
    (`calm, volatile, crisis`), or without regimes (CSV) terciles of the realised volatility
    (`low_vol, mid_vol, high_vol`: mean over instruments of the causal EWMA volatility at that bar).

    Each subset's drawdown is that of its bars concatenated in time order (see the module docstring).
    """
    if bt.regime is not None:
        return {name: _subset_metrics(bt, bt.regime == k, risk_free_rate) for k, name in enumerate(REGIME_NAMES)}
    vol = bt.realised_vol
    low, high = np.quantile(vol, [1 / 3, 2 / 3]) if len(vol) else (0.0, 0.0)
    masks = (vol <= low, (vol > low) & (vol <= high), vol > high)
    return {name: _subset_metrics(bt, mask, risk_free_rate) for name, mask in zip(VOL_TERCILES, masks, strict=True)}


def specialist_utilization(bt: Backtest, specialists: list[str]) -> dict[str, float]:
    """Each specialist's average share of gross exposure, plus `entropy` (normalised; 1 = even use).

    A bar's share of specialist k is `sum_{i of k} |w_i| / sum_i |w_i|`; the average is over the bars
    with a non-flat book (a flat bar has no shares). The entropy of the average shares is normalised by
    log of the number of specialists that own an instrument (0 with one such specialist or no exposure).
    """
    owner = np.array([specialists.index(s) for s in bt.instrument_sectors])
    onehot = np.eye(len(specialists))[owner]  # [N, K]
    exposure = np.abs(bt.weights) @ onehot  # [T, K]
    gross = exposure.sum(-1)
    held = gross > 0
    shares = (exposure[held] / gross[held, None]).mean(0) if held.any() else np.zeros(len(specialists))
    active = len(set(owner.tolist()))
    positive = shares[shares > 0]
    entropy = float(-(positive * np.log(positive)).sum() / math.log(active)) if active > 1 else 0.0
    out = {name: float(shares[k]) for k, name in enumerate(specialists)}
    out["entropy"] = max(0.0, min(1.0, entropy))  # rounding can leave -0.0 or 1 + eps
    return out


def mean_allocation(bt: Backtest, specialists: list[str]) -> dict[str, float]:
    """The allocation the hierarchy held, averaged over the bars (equal when it has no meta-controller)."""
    if bt.allocation is None or not len(bt.allocation):
        return {name: 1.0 / len(specialists) for name in specialists}
    return {name: float(share) for name, share in zip(specialists, bt.allocation.mean(0), strict=True)}
