"""Tests for evaluation/selection.py: the rules by which an iterate replaces a phase's start in best.pt."""

from types import SimpleNamespace

import numpy as np
import pytest

from mtq_common.evaluation import bootstrap, metrics, selection
from mtq_common.training.config import ConfigError

BARS = 252


def test_gain_over_start_replaces_the_start_only_with_confidence_unless_switched_off():
    """Phases 2 and 3's selection rule: with `replace_confidence` 0.9 an iterate replaces its start only where the
    paired interval's low end is above 0; with 0 always (the interval is still computed, at 0.9); bad values are
    refused."""
    rng = np.random.default_rng(0)
    start = rng.normal(0.0, 0.01, 2000)
    clearly_better = start + 0.002  # the same noise, a steady edge: the paired interval excludes 0
    noise = start + rng.normal(0.0, 0.01, 2000)  # no edge: the interval straddles 0
    better = selection.gain_over_start(clearly_better, start, 252, 0.0, 0.9)
    assert better["low"] > 0 and better["replaces"] and better["confidence"] == 0.9
    unsure = selection.gain_over_start(noise, start, 252, 0.0, 0.9)
    assert unsure["low"] < 0 < unsure["high"] and not unsure["replaces"]
    off = selection.gain_over_start(noise, start, 252, 0.0, 0.0)
    assert off["replaces"] and off["confidence"] == 0.9 and off["low"] == unsure["low"]
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="--replace-confidence"):
            selection.check_replace_confidence(bad)


def test_turnover_against_momentum_is_within_only_with_confidence_unless_switched_off():
    """DESIGN 14's T for Phases 2 and 3: the system's turnover per unit of volatility over momentum's on the same
    bars (`backtest_metrics`' turnover_per_vol, whose annualisation cancels), with a paired bootstrap interval;
    within only where its high end is at most 1 (the ratio itself with confidence 0) or the ratio is at most the
    start's; the interval narrows with the bars; a flat reference is an infinite ratio; bad input a ValueError."""
    rng = np.random.default_rng(0)
    bars = 3000
    momentum_returns, momentum_traded = rng.normal(0.0, 0.01, bars), rng.uniform(0.0, 0.2, bars)
    own_returns, own_traded = rng.normal(0.0, 0.005, bars), rng.uniform(0.0, 0.1, bars)

    def per_vol(traded, returns):
        return np.mean(traded) / np.std(returns, ddof=1)

    def ran(ratio: float, n: int = bars) -> dict:  # the system at `ratio` x momentum's over the first n bars
        scale = ratio * per_vol(momentum_traded[:n], momentum_returns[:n]) / per_vol(own_traded[:n], own_returns[:n])
        system = SimpleNamespace(traded=own_traded[:n] * scale, net_return=own_returns[:n])
        return {
            "system": system,
            "momentum": SimpleNamespace(traded=momentum_traded[:n], net_return=momentum_returns[:n]),
        }

    close = selection.turnover_against_momentum(ran(0.98), 0.9)
    assert close["ratio"] == pytest.approx(0.98) and close["low"] < 0.98 < close["high"]
    assert not close["within"]  # (its high end is above 1: not confidently within)
    assert selection.turnover_against_momentum(ran(0.98), 0.9, start_ratio=0.99)["within"]  # (no more than its start)
    assert not selection.turnover_against_momentum(ran(0.98), 0.9, start_ratio=0.97)["within"]
    assert selection.turnover_against_momentum(ran(0.98), 0.0)["within"]  # (the ratio alone)
    assert selection.turnover_against_momentum(ran(0.8), 0.9)["within"]
    short = selection.turnover_against_momentum(ran(0.98, 300), 0.9)
    assert short["high"] - short["low"] > close["high"] - close["low"]
    flat = bootstrap.turnover_ratio(np.ones(10), rng.normal(size=10), np.zeros(10), rng.normal(size=10))
    assert flat["ratio"] == float("inf")
    with pytest.raises(ValueError, match="same bars"):
        bootstrap.turnover_ratio(np.ones(10), np.ones(10), np.ones(9), np.ones(9))


def test_holds_on_train_needs_no_more_turnover_than_momentum_or_the_start_and_no_lower_sharpe():
    """Phase 3's check on the training split: an iterate holds where its turnover per unit of volatility over
    momentum's is at most the larger of 1 and the start's, and its Sharpe ratio is at least the start's; the
    figures are the exact point estimates (`metrics.sharpe`, `backtest_metrics`' turnover per unit of volatility)."""
    rng = np.random.default_rng(1)
    bars = 2000
    momentum = SimpleNamespace(traded=rng.uniform(0.0, 0.2, bars), net_return=rng.normal(0.0, 0.01, bars))
    returns = rng.normal(0.001, 0.005, bars)
    unit = np.mean(momentum.traded) / np.std(momentum.net_return, ddof=1) * np.std(returns, ddof=1)

    def books(ratio: float, edge: float = 0.0) -> dict:  # a system at `ratio` x momentum's, `edge` more per bar
        return {"system": SimpleNamespace(traded=np.full(bars, ratio * unit), net_return=returns + edge),
                "momentum": momentum}  # fmt: skip

    start = books(0.9)
    better = selection.holds_on_train(books(0.95, 1e-4), start, BARS, 0.02)
    assert better["holds"] and better["ratio"] == pytest.approx(0.95) and better["start_ratio"] == pytest.approx(0.9)
    assert better["sharpe"] == pytest.approx(metrics.sharpe(returns + 1e-4, BARS, 0.02))
    assert better["start_sharpe"] == pytest.approx(metrics.sharpe(returns, BARS, 0.02))
    assert not selection.holds_on_train(books(1.02, 1e-4), start, BARS, 0.02)["holds"]  # (above momentum's)
    assert not selection.holds_on_train(books(0.95, -1e-4), start, BARS, 0.02)["holds"]  # (a lower Sharpe ratio)
    above = books(1.1)  # a start above momentum's: an iterate may trade as much as it, no more
    assert selection.holds_on_train(books(1.09, 1e-4), above, BARS, 0.02)["holds"]
    assert not selection.holds_on_train(books(1.15, 1e-4), above, BARS, 0.02)["holds"]
