"""benchmarks.meta_headroom: its features are causal, and its learned maps learn planted rules of when to hold
risk and where to put the capital."""

from types import SimpleNamespace

import numpy as np
import torch

from benchmarks.meta_headroom import (
    allocation_features,
    allocation_scale,
    causal_ewma,
    fit_linear,
    scaled_sharpe,
    timing_scale,
)


def test_causal_ewma_at_t_reads_only_the_values_before_t():
    x = np.random.default_rng(0).normal(size=50)
    changed = x.copy()
    changed[20:] += 100.0
    assert np.array_equal(causal_ewma(x, 5)[:21], causal_ewma(changed, 5)[:21])
    assert causal_ewma(x, 5)[0] == 0.0 and causal_ewma(changed, 5)[21] != causal_ewma(x, 5)[21]


def book(returns: np.ndarray) -> SimpleNamespace:
    """An unscaled backtest holding 0.1 of every instrument, one segment."""
    return SimpleNamespace(weights=np.full_like(returns, 0.1), bar_returns=returns, segment_length=len(returns))


def planted_timing(bars=4000, seed=0):
    """One instrument whose bars earn when the feature is low and lose when it is high."""
    rng = np.random.default_rng(seed)
    feature = rng.normal(size=bars)
    returns = np.where(feature < 0, 0.02, -0.01) + 0.1 * rng.normal(size=bars)
    return feature[:, None], book(returns[:, None])


def test_learned_timing_holds_risk_where_the_planted_book_earns_and_beats_full_appetite():
    features, bt = planted_timing()
    cost = np.array([0.0003])
    mean, std, w, b = fit_linear(features, 1, timing_scale, bt, cost, bias=2.0, steps=300)
    assert w[0, 0] < 0  # less appetite as the feature rises
    test_features, test_bt = planted_timing(seed=1)  # a fresh path
    appetite = timing_scale(torch.as_tensor((test_features - mean) / std @ w + b))
    full = scaled_sharpe(torch.ones(len(appetite), 1, dtype=torch.float64), test_bt, cost)
    assert scaled_sharpe(appetite, test_bt, cost) > full + 0.03  # per bar (0.04 -> 0.12 here)


def planted_allocation(bars=6000, seed=0):
    """Two specialists of one instrument each, whose trends persist: the one that earned lately earns next."""
    rng = np.random.default_rng(seed)
    drift = np.zeros((bars, 2))
    for t in range(1, bars):  # slow AR(1) drifts, independent across the two
        drift[t] = 0.98 * drift[t - 1] + 0.2 * 0.01 * rng.normal(size=2)
    return book(drift + 0.01 * rng.normal(size=(bars, 2)))


def test_learned_allocation_moves_capital_to_the_specialist_whose_sleeve_earned_lately():
    onehot, owner, cost = np.eye(2), np.array([0, 1]), np.array([0.0001, 0.0001])
    bt = planted_allocation()
    to_scale = allocation_scale(np.ones(len(bt.weights)), owner)
    mean, std, w, _ = fit_linear(allocation_features(bt, onehot), 2, to_scale, bt, cost, steps=300)
    # each specialist's weight on its own recent sleeve return exceeds its weight on the other's
    own, other = np.diag(w[:2]), np.diag(w[:2, ::-1])
    assert (own > other).all()
    fresh = planted_allocation(seed=1)
    fresh_scale = allocation_scale(np.ones(len(fresh.weights)), owner)
    z = torch.as_tensor((allocation_features(fresh, onehot) - mean) / std @ w)
    equal = scaled_sharpe(torch.ones(len(z), 2, dtype=torch.float64), fresh, cost)
    assert scaled_sharpe(fresh_scale(z), fresh, cost) > equal + 0.01
