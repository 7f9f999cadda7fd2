"""The Sharpe-increment reward of Phase 3 (`agents.sharpe_reward`): the whole split's Sharpe ratio to first order,
flat in the book's size, paying for risk timing."""

import numpy as np
import pytest
import torch

from mtq_common.agents.sharpe_reward import SharpeIncrement

CASH = 0.02 / 252


def sharpe(x: np.ndarray) -> float:
    return float(x.mean() / x.std())


def mean_reward(book: SharpeIncrement, x: np.ndarray) -> float:
    return float(book(torch.as_tensor(x + CASH, dtype=torch.float64)).mean())


def test_its_mean_is_the_first_order_change_of_the_whole_splits_sharpe_ratio():
    x = np.random.default_rng(0).normal(2e-4, 5e-4, 5000)
    book = SharpeIncrement.of(x + CASH, CASH)
    assert (book.mean, book.second) == pytest.approx((x.mean(), (x * x).mean()))
    step = np.random.default_rng(1).normal(0.0, 5e-4, 5000)
    for eps in (1e-3, -1e-3):
        moved = x + eps * step
        gain = sharpe(moved) - sharpe(x)
        assert mean_reward(book, moved) - mean_reward(book, x) == pytest.approx(gain, rel=0.02, abs=1e-7)


def test_a_larger_or_smaller_book_earns_nothing_by_its_size():
    x = np.random.default_rng(2).normal(2e-4, 5e-4, 5000)
    book = SharpeIncrement.of(x + CASH, CASH)
    scores = {k: mean_reward(book, k * x) for k in (0.5, 0.9, 1.0, 1.1, 2.0)}
    assert max(scores, key=scores.get) == 1.0, scores  # the reference's own scale, whatever the Sharpe ratio


def test_scaling_down_in_the_volatile_regime_earns_reward_and_raises_the_sharpe_ratio():
    """The same drift in two regimes, one three times as volatile: a book that holds a third in the volatile one
    has the higher Sharpe ratio over the whole series, and the higher reward."""
    rng = np.random.default_rng(3)
    volatile = np.arange(6000) % 1000 >= 700
    x = 2e-4 + rng.normal(0.0, 1.0, 6000) * np.where(volatile, 1.5e-3, 5e-4)
    timed = x * np.where(volatile, 1 / 3, 1.0)
    book = SharpeIncrement.of(x + CASH, CASH)
    assert sharpe(timed) > sharpe(x) + 0.05
    assert mean_reward(book, timed) > mean_reward(book, x)


def test_a_flat_or_broken_reference_is_refused():
    with pytest.raises(ValueError, match="vary"):
        SharpeIncrement.of(np.full(100, CASH), CASH)
    with pytest.raises(ValueError, match="finite"):
        SharpeIncrement.of(np.array([0.0, np.nan, 1e-3]), CASH)
