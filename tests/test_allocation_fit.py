"""The fitted allocation rule (evaluation/allocation_fit.py) and the meta-controller starting from it: its
evidence is causal, the fit learns a planted rule of where to put the capital, and a zero action trades it."""

from types import SimpleNamespace

import numpy as np
import torch

from mtq_common.agents.hierarchy import SLEEVE_HALF_LIVES, MetaTracker
from mtq_common.agents.nets import MetaController
from mtq_common.evaluation.allocation_fit import (
    allocation_scale,
    causal_ewma,
    fit_linear,
    scaled_sharpe,
    sleeve_features,
    timed_scale,
)


def test_causal_ewma_reads_only_the_values_before_t_and_restarts_each_segment():
    x = np.random.default_rng(0).normal(size=(50, 2))
    changed = x.copy()
    changed[20:] += 100.0
    assert np.array_equal(causal_ewma(x, 5)[:21], causal_ewma(changed, 5)[:21])
    assert (causal_ewma(changed, 5)[21] != causal_ewma(x, 5)[21]).all()
    assert (causal_ewma(changed, 5, segment_length=25)[25] == 0.0).all()  # a new segment starts from nothing


def planted_allocation(bars=6000, seed=0):
    """Two specialists of one instrument each, long at the position limit, whose drifts persist: the one that
    earned lately earns next."""
    rng = np.random.default_rng(seed)
    drift = np.zeros((bars, 2))
    for t in range(1, bars):  # slow AR(1) drifts, independent across the two
        drift[t] = 0.98 * drift[t - 1] + 0.2 * 0.01 * rng.normal(size=2)
    held = np.full((bars, 2), 0.1)
    return SimpleNamespace(weights=held, proposed=held, bar_returns=drift + 0.01 * rng.normal(size=(bars, 2)),
                           segment_length=bars)  # fmt: skip


def test_the_fit_moves_capital_to_the_specialist_whose_sleeve_earned_lately_and_beats_the_equal_allocation():
    owner, cost = np.array([0, 1]), np.array([0.0001, 0.0001])
    bt = planted_allocation()
    to_scale = allocation_scale(np.ones(len(bt.weights)), owner)
    mean, std, w, _ = fit_linear(sleeve_features(bt, owner, 2, 0.1), 2, to_scale, bt, cost, steps=300)
    fast = w[:2]  # the 5-bar sleeve EMAs' rows: each specialist's own recent return weighs for it, not for the other
    assert (np.diag(fast) > np.diag(fast[:, ::-1])).all()
    fresh = planted_allocation(seed=1)  # a fresh path
    z = torch.as_tensor((sleeve_features(fresh, owner, 2, 0.1) - mean) / std @ w)
    equal = scaled_sharpe(torch.ones(len(z), 2, dtype=torch.float64), fresh, cost)
    assert scaled_sharpe(allocation_scale(np.ones(len(z)), owner)(z), fresh, cost) > equal + 0.05


def rule(k=3):
    h = len(SLEEVE_HALF_LIVES) * k
    weights = np.zeros((h, k))
    weights[0, 0] = 1.0  # the first specialist's 5-bar sleeve return raises its own share
    return {"half_lives": list(SLEEVE_HALF_LIVES), "mean": [0.0] * h, "std": [1.0] * h,
            "weights": weights.tolist(), "equal_sharpe": 0.0, "fit_sharpe": 0.0}  # fmt: skip


def test_a_zero_action_trades_the_fitted_rules_allocation_and_the_sleeves_follow_the_books_returns():
    owner = torch.tensor([0, 1, 2, 2])
    tracker = MetaTracker(owner, 3, 2, "cpu", rate=1.0, allocation_rule=rule())
    assert torch.allclose(tracker.start_point()[0], torch.full((2, 3), 1 / 3))  # no evidence yet
    positions, returns = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2), torch.tensor([[0.002, 0.0, 0.0, 0.0]] * 2)
    tracker.after_step(positions, returns, torch.tensor([False, True]))
    alpha = 1 - 0.5 ** (1 / SLEEVE_HALF_LIVES[0])
    assert tracker.sleeves[0, 0].item() == torch.tensor(alpha * 2.0).item()  # 0.002 per bar = 2 per 1e-3
    assert (tracker.sleeves[1] == 0).all()  # the finished row restarts
    allocation, _ = tracker.act(torch.zeros(2, 4))
    expected = torch.softmax(torch.tensor([alpha * 2.0, 0.0, 0.0]), -1)
    assert torch.allclose(allocation[0], expected) and torch.allclose(tracker.start_point()[0][0], expected)
    assert torch.allclose(allocation[1], torch.full((3,), 1 / 3))
    plain = MetaTracker(owner, 3, 2, "cpu", rate=1.0)  # without a rule: 1/K, whatever the sleeves
    plain.after_step(positions, returns, torch.tensor([False, False]))
    assert torch.allclose(plain.act(torch.zeros(2, 4))[0], torch.full((2, 3), 1 / 3))


def test_the_rule_is_stored_with_the_weights_and_old_tracker_state_loads():
    meta = MetaController(10, 3, allocation_rule=rule())
    assert MetaController.from_spec(meta.describe()).allocation_rule == rule()
    assert "allocation_rule" not in MetaController(10, 3).describe()
    sized = MetaController.from_spec(MetaController(10, 3, instrument_scale=[0.5, 1.0, 2.0]).describe())
    assert sized.instrument_scale == [0.5, 1.0, 2.0] and sized.sizing("cpu").tolist() == [0.5, 1.0, 2.0]
    assert "instrument_scale" not in MetaController(10, 3).describe() and MetaController(10, 3).sizing("cpu") is None
    tracker = MetaTracker(torch.tensor([0, 1, 2]), 3, 2, "cpu", allocation_rule=rule())
    old = {name: value for name, value in tracker.state_dict().items() if name != "sleeves"}  # before the sleeves
    tracker.load_state_dict(old)
    assert (tracker.sleeves == 0).all()


def timed_rule(k=3, vol=3):
    """A risk-timing rule: the first specialist's 5-bar sleeve return raises its share and halves the appetite's
    factor per unit; the first volatility ratio lowers it too."""
    h = len(SLEEVE_HALF_LIVES) * k
    weights = np.zeros((h + vol, k + 1))
    weights[0, 0], weights[0, k], weights[h, k] = 1.0, -np.log(2.0), -1.0
    return {"half_lives": list(SLEEVE_HALF_LIVES), "timed": True, "mean": [0.0] * (h + vol), "std": [1.0] * (h + vol),
            "weights": weights.tolist(), "bias": [0.0] * (k + 1), "equal_sharpe": 0.0, "fit_sharpe": 0.0}  # fmt: skip


def test_a_timed_rule_scales_the_volatility_managed_appetite_and_a_zero_action_trades_its_start():
    owner = torch.tensor([0, 1, 2, 2])
    tracker = MetaTracker(owner, 3, 2, "cpu", rate=0.5, allocation_rule=timed_rule())
    tracker.sleeves[0, 0] = 1.0  # row 0: the first specialist earned lately
    risk = torch.tensor([[0.0, 0.2, 0.3, 0.8], [0.5, 0.0, 0.0, 0.6]])  # three volatility ratios, then the base
    allocation, appetite = tracker.start_point(risk)
    assert torch.allclose(allocation[0], torch.softmax(torch.tensor([1.0, 0.0, 0.0]), -1))
    assert torch.allclose(allocation[1], torch.full((3,), 1 / 3))
    assert torch.allclose(appetite, torch.tensor([0.8 / 2, 0.6 * np.exp(-0.5)], dtype=torch.float32))
    traded = tracker.act(torch.zeros(2, 4), risk)  # a zero action: the held factor stays 1, the start is traded
    assert torch.allclose(traded[1], appetite)
    traded = tracker.act(torch.tensor([[0.0, 0.0, 0.0, -1.0]] * 2), risk)  # the learned factor is smoothed (rate)
    assert torch.allclose(traded[1], appetite * float(1 + 0.5 * (np.exp(-1.0) - 1)))


def planted_timing(bars=6000, seed=0):
    """Two specialists of one instrument each, long at the position limit, sharing one slow AR(1) drift: the book
    earns after it earned (its own recent return times risk), whichever specialist holds it."""
    rng = np.random.default_rng(seed)
    drift = np.zeros(bars)
    for t in range(1, bars):
        drift[t] = 0.98 * drift[t - 1] + 0.2 * 0.01 * rng.normal()
    held = np.full((bars, 2), 0.1)
    return SimpleNamespace(weights=held, proposed=held, bar_returns=drift[:, None] + 0.01 * rng.normal(size=(bars, 2)),
                           segment_length=bars)  # fmt: skip


def test_the_timed_fit_holds_more_risk_after_the_book_earned_and_beats_the_untimed_book_on_a_fresh_path():
    owner, cost = np.array([0, 1]), np.array([0.0001, 0.0001])
    bt, base = planted_timing(), np.full(6000, 0.5)  # the volatility rule's appetite: half, whatever happens
    vol = np.zeros((6000, 1))  # (no volatility evidence here)
    features = np.concatenate([sleeve_features(bt, owner, 2, 0.1), vol], -1)
    mean, std, w, b = fit_linear(features, 3, timed_scale(base, owner), bt, cost, bias=0.0, steps=300)
    assert w[:2, 2].sum() > 0  # the factor rises with both specialists' 5-bar sleeve returns
    fresh = planted_timing(seed=1)
    z = torch.as_tensor((np.concatenate([sleeve_features(fresh, owner, 2, 0.1), vol], -1) - mean) / std @ w + b)
    untimed = scaled_sharpe(torch.full((len(z), 2), 0.5, dtype=torch.float64), fresh, cost)
    assert scaled_sharpe(timed_scale(base, owner)(z), fresh, cost) > untimed + 0.05
