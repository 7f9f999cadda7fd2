"""mtq_common.agents.curriculum: the level rule (advance, never skip, step back one), resume, and harder markets."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mtq_common.agents.curriculum import LEVELS, PLAIN_LEVEL, Curriculum, generate_scenario, window_volatility
from mtq_common.data.synthetic import Difficulty
from mtq_common.evaluation.metrics import sharpe
from mtq_common.evaluation.rules import backtest, oracle_positions
from mtq_common.training.config import Config


def feed(curriculum: Curriculum, sharpes: list[float]) -> list[int]:
    return [curriculum.update_curriculum({"val_sharpe": s}) for s in sharpes]


# ----------------------------------------------------------------------------------------------------------
# Levels
# ----------------------------------------------------------------------------------------------------------


def test_levels_get_harder_on_every_knob_and_the_plain_level_is_the_plain_market():
    assert len(LEVELS) >= 4
    assert LEVELS[PLAIN_LEVEL] == Difficulty()
    for easier, harder in zip(LEVELS, LEVELS[1:], strict=False):
        assert harder.vol_multiplier > easier.vol_multiplier
        assert harder.crash_prob >= easier.crash_prob
        assert harder.signal_to_noise < easier.signal_to_noise
        assert harder.cost_multiplier > easier.cost_multiplier
    assert LEVELS[-1].crash_prob > 0


# ----------------------------------------------------------------------------------------------------------
# The level rule
# ----------------------------------------------------------------------------------------------------------


def test_advances_only_at_or_above_the_threshold():
    below = Curriculum(threshold=1.0, window=3, min_evaluations=2)
    assert feed(below, [0.9, 0.99, 0.95, 1.05, 0.5]) == [0] * 5  # rolling means 0.945, 0.947, 0.997, 0.833
    above = Curriculum(threshold=1.0, window=3, min_evaluations=2)
    assert feed(above, [1.0, 1.1]) == [0, 1]
    assert above.get_difficulty_level() == 1 and above.get_difficulty_level(step=12345) == 1


def test_never_skips_a_level_even_with_a_huge_sharpe():
    curriculum = Curriculum(threshold=1.0, window=3, min_evaluations=2)
    levels = feed(curriculum, [1e6] * 10)
    # One level per `min_evaluations` evaluations at a level, then it stays at the last level.
    assert levels == [0, 1, 1, 2, 2, 3, 3, 3, 3, 3]
    assert all(b - a in (0, 1) for a, b in zip([0, *levels], levels, strict=False))


def test_a_level_change_starts_a_fresh_record():
    curriculum = Curriculum(threshold=1.0, window=3, min_evaluations=2)
    feed(curriculum, [5.0, 5.0])
    # At level 1 the old, high Sharpes no longer count: 0.8 and 0.9 alone do not clear the threshold.
    assert feed(curriculum, [0.8, 0.9]) == [1, 1]
    assert feed(curriculum, [2.0]) == [2]  # mean(0.8, 0.9, 2.0) = 1.23


def test_steps_back_at_most_one_level_below_the_highest():
    curriculum = Curriculum(threshold=1.0, window=2, min_evaluations=2, demote_threshold=-0.5)
    feed(curriculum, [2.0, 2.0, 2.0, 2.0])
    assert curriculum.get_difficulty_level() == 2
    assert feed(curriculum, [-0.4]) == [2]  # one evaluation at this level: not yet
    assert feed(curriculum, [-0.7]) == [1]  # mean -0.55 < -0.5: one step back
    assert feed(curriculum, [-5.0] * 8) == [1] * 8  # never below highest - 1
    assert feed(curriculum, [0.0, -0.4, -0.6]) == [1, 1, 1]  # between the thresholds: stays
    assert feed(curriculum, [3.0]) == [2]  # and climbs back: mean(-0.6, 3.0) = 1.2


def test_a_mean_between_the_thresholds_holds_the_level_and_level_zero_never_drops():
    curriculum = Curriculum(threshold=1.0, window=3, min_evaluations=2, demote_threshold=-0.5)
    assert feed(curriculum, [-3.0] * 4) == [0] * 4
    assert feed(curriculum, [0.5] * 6) == [0] * 6


def test_disabled_curriculum_is_the_plain_market():
    curriculum = Curriculum(enabled=False)
    assert curriculum.get_difficulty_level(0) == PLAIN_LEVEL
    assert feed(curriculum, [10.0] * 6 + [-10.0] * 6) == [PLAIN_LEVEL] * 12
    assert LEVELS[curriculum.get_difficulty_level()] == Difficulty()


def test_state_dict_round_trip_restores_level_and_record():
    curriculum = Curriculum(threshold=1.0, window=3, min_evaluations=2)
    feed(curriculum, [2.0, 2.0, 2.0, 2.0, 0.7])
    state = curriculum.state_dict()
    assert state == {"level": 2, "highest": 2, "recent": [0.7], "evaluations": 1}
    assert all(isinstance(v, int | float | list) for v in state.values())
    resumed = Curriculum(threshold=1.0, window=3, min_evaluations=2)
    resumed.load_state_dict(state)
    assert resumed.get_difficulty_level() == 2
    # The same future evaluations give the same levels as the unbroken curriculum.
    future = [1.5, 1.2, -3.0, -3.0, -3.0, 4.0]
    assert feed(resumed, future) == feed(curriculum, future)
    with pytest.raises(ValueError, match="invalid"):
        Curriculum().load_state_dict({"level": 0, "highest": 3, "recent": [], "evaluations": 0})


def test_bad_arguments_and_metrics_are_refused():
    with pytest.raises(ValueError, match="num_levels"):
        Curriculum(num_levels=len(LEVELS) + 1)
    with pytest.raises(ValueError, match="demote_threshold"):
        Curriculum(threshold=0.0, demote_threshold=0.5)
    with pytest.raises(KeyError, match="val_sharpe"):
        Curriculum().update_curriculum({"sharpe": 1.0})
    with pytest.raises(ValueError, match="finite"):
        Curriculum().update_curriculum({"val_sharpe": math.nan})


# ----------------------------------------------------------------------------------------------------------
# Synthetic scenarios
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_cfg() -> Config:
    cfg = Config()
    cfg.data.synthetic.train_bars = 8000  # enough bars that regime luck cannot reorder the levels
    return cfg


@pytest.fixture(scope="module")
def scenarios(synthetic_cfg):
    return [generate_scenario(level, synthetic_cfg) for level in range(len(LEVELS))]


def test_synthetic_scenarios_are_reproducible_and_distinct(synthetic_cfg, scenarios):
    again = generate_scenario(2, synthetic_cfg)
    assert np.array_equal(again.prices, scenarios[2].prices)
    assert not np.allclose(scenarios[1].prices, scenarios[2].prices)
    assert not np.allclose(generate_scenario(2, synthetic_cfg, seed=5).prices, again.prices)
    for level, market in enumerate(scenarios):
        assert market.split == "train" and market.source == "synthetic"
        assert market.num_bars == synthetic_cfg.data.synthetic.train_bars
        assert market.symbols == list(synthetic_cfg.data.instruments)
        assert market.cost_multiplier == LEVELS[level].cost_multiplier
    with pytest.raises(ValueError, match="level"):
        generate_scenario(len(LEVELS), synthetic_cfg)


def test_each_synthetic_level_is_measurably_harder(synthetic_cfg, scenarios):
    sigma = np.array([synthetic_cfg.instruments[s].annual_vol for s in scenarios[0].symbols]) / np.sqrt(252)
    vol, signal, crashes, oracle = [], [], [], []
    for market in scenarios:
        r = market.returns[1:]
        vol.append(float((r.std(0) / sigma).mean()))  # realised vol in units of the configured vol
        signal.append(float((np.abs(market.drift).mean(0) / r.std(0)).mean()))  # |drift| / realised vol
        crashes.append(int((r / sigma < -5.0).sum()))  # bars falling more than 5 daily vols
        net = backtest(oracle_positions(market.drift), market.returns, 0.003 * market.cost_multiplier)
        oracle.append(float(np.mean(sharpe(net, market.bars_per_year))))
    for lower, higher in ((vol, True), (signal, False), (crashes, True), (oracle, False)):
        for a, b in zip(lower, lower[1:], strict=False):
            assert (b > a) if higher else (b < a), lower


# ----------------------------------------------------------------------------------------------------------
# CSV scenarios: the calmer windows of the training split, chain-linked
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def csv_cfg(tmp_path_factory) -> Config:
    """Two instruments whose volatility changes every 150 bars (so windows differ), as CSV files."""
    tmp = tmp_path_factory.mktemp("csv")
    rng = np.random.default_rng(0)
    n = 3000
    block_vol = rng.choice([0.003, 0.01, 0.02, 0.04], size=n // 150 + 1)
    vol = np.repeat(block_vol, 150)[:n]
    days = pd.bdate_range("2005-01-03", periods=n)
    symbols = ["SPX500", "EURUSD"]
    for i, symbol in enumerate(symbols):
        prices = 100.0 * np.exp(np.cumsum(vol * (1.0 + 0.5 * i) * rng.standard_normal(n)))
        pd.DataFrame({"date": days.strftime("%Y-%m-%d"), "close": prices}).to_csv(tmp / f"{symbol}.csv", index=False)
    cfg = Config()
    cfg.data.source, cfg.data.data_dir, cfg.data.instruments = "csv", str(tmp), symbols
    cfg.environment.episode_length = 100
    return cfg


def test_csv_scenarios_keep_the_calmer_windows_chain_linked(csv_cfg):
    from mtq_common.data.splits import load_splits

    train = load_splits(csv_cfg)["train"]
    length = csv_cfg.environment.episode_length
    n_windows = train.num_bars // length
    markets = [generate_scenario(level, csv_cfg) for level in range(len(LEVELS))]

    sizes = [m.num_bars // length for m in markets]
    assert sizes == [math.ceil((level + 1) / len(LEVELS) * n_windows) for level in range(len(LEVELS))]
    assert sizes[-1] == n_windows  # the last level holds every window
    realised = [float(window_volatility(m.prices, length).mean()) for m in markets]
    assert realised[0] < realised[-1]
    assert all(a <= b for a, b in zip(realised, realised[1:], strict=False))
    assert (
        window_volatility(markets[0].prices, length).max()
        <= np.sort(window_volatility(train.prices, length))[sizes[0] - 1]
    )

    for market in markets:
        assert market.split == "train" and market.source == "csv" and market.cost_multiplier == 1.0
        assert np.all(np.diff(market.timestamps) > np.timedelta64(0))  # time order, no repeats
        returns = market.returns
        junctions = np.arange(length, market.num_bars, length)
        assert np.all(returns[junctions] == 0.0)  # each window starts where the previous one ended
        # Inside a window the returns are the real ones.
        starts = np.searchsorted(train.timestamps, market.timestamps[::length])
        for w, start in enumerate(starts):
            inside = returns[w * length + 1 : (w + 1) * length]
            np.testing.assert_allclose(inside, train.returns[start + 1 : start + length], rtol=1e-9, atol=1e-12)
