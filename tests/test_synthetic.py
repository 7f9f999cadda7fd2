"""Synthetic market: reproducible, realistic vols and correlations, fresh splits, learnable signal."""

import time

import numpy as np
import pytest

from benchmarks.market_calibration import fit_oracle_scale, sized_oracle_positions
from mtq_common.data.splits import load_splits
from mtq_common.data.synthetic import Difficulty, correlation_matrix, generate_market
from mtq_common.evaluation.metrics import sharpe
from mtq_common.evaluation.rules import backtest, buy_and_hold_positions, momentum_positions, oracle_positions
from mtq_common.training.config import Config

CFG = Config()
SYMBOLS = CFG.data.instruments
SECTORS = [CFG.sector_of(s) for s in SYMBOLS]
VOLS = [CFG.instruments[s].annual_vol for s in SYMBOLS]


@pytest.fixture(scope="module")
def long_market():
    return generate_market(SYMBOLS, SECTORS, VOLS, 60_000, seed=11)


def test_same_seed_same_data_different_seed_different_data():
    a = generate_market(SYMBOLS, SECTORS, VOLS, 2000, seed=3)
    b = generate_market(SYMBOLS, SECTORS, VOLS, 2000, seed=3)
    c = generate_market(SYMBOLS, SECTORS, VOLS, 2000, seed=4)
    assert np.array_equal(a.prices, b.prices) and np.array_equal(a.drift, b.drift)
    assert not np.allclose(a.prices, c.prices)


def test_splits_are_fresh_paths_in_time_order():
    splits = load_splits(CFG)
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert (train.num_bars, val.num_bars, test.num_bars) == (20_000, 5_000, 5_000)
    assert train.timestamps[-1] < val.timestamps[0] and val.timestamps[-1] < test.timestamps[0]
    n = 5000
    for x, y in [(train, val), (val, test), (train, test)]:
        corr = np.corrcoef(x.returns[1:n, 5], y.returns[1:n, 5])[0, 1]
        assert abs(corr) < 0.05


def test_annual_vols_near_targets(long_market):
    realised = long_market.returns[1:].std(axis=0) * np.sqrt(252)
    np.testing.assert_allclose(realised, VOLS, rtol=0.1)


def test_correlations_follow_the_blocks(long_market):
    corr = np.corrcoef(long_market.returns[1:].T)
    i = {s: k for k, s in enumerate(SYMBOLS)}
    assert corr[i["EURUSD"], i["GBPUSD"]] > 0.5
    assert corr[i["EURUSD"], i["USDJPY"]] < -0.1
    for a, b in [("SPX500", "NAS100"), ("SPX500", "US30"), ("NAS100", "US30")]:
        assert 0.75 < corr[i[a], i[b]] < 0.97
    assert 0.05 < corr[i["XAUUSD"], i["WTIUSD"]] < 0.4
    off_diagonal = corr[~np.eye(len(SYMBOLS), dtype=bool)]
    assert off_diagonal.max() < 0.99  # no two instruments are the same


def test_fat_tails_and_regimes(long_market):
    r = long_market.returns[1:, 5]
    z = (r - r.mean()) / r.std()
    assert (z**4).mean() > 4.0  # excess kurtosis: Student-t noise and volatility regimes
    counts = np.bincount(long_market.regime, minlength=3) / long_market.num_bars
    assert counts[0] > 0.5 and counts[1] > 0.1 and counts[2] > 0.02
    crisis_vol = long_market.returns[1:][long_market.regime[1:] == 2].std()
    calm_vol = long_market.returns[1:][long_market.regime[1:] == 0].std()
    assert crisis_vol > 2 * calm_vol


def test_oracle_beats_momentum_beats_zero_beats_buy_and_hold(long_market):
    m = long_market
    sharpes = {}
    for name, pos in {
        "oracle": oracle_positions(m.drift),
        "momentum": momentum_positions(m.prices),
        "buy_and_hold": buy_and_hold_positions(m.prices),
    }.items():
        sharpes[name] = np.asarray(sharpe(backtest(pos, m.returns, 0.003), 252))
    assert np.all(sharpes["oracle"] > sharpes["momentum"] + 0.3)
    assert np.all(sharpes["momentum"] > 0.5)
    assert np.all(np.abs(sharpes["buy_and_hold"]) < sharpes["momentum"])


def test_the_oracle_sized_by_the_drift_beats_its_sign_on_a_fresh_path(long_market):
    """benchmarks.market_calibration's ceiling of direction and size: the scale picked on one path, then a
    fresh path traded with it beats the sign oracle on every instrument and the portfolio."""
    cost = np.full(len(SYMBOLS), 0.003)
    scale = fit_oracle_scale(generate_market(SYMBOLS, SECTORS, VOLS, 20_000, seed=12), cost)
    m = long_market
    sized = backtest(sized_oracle_positions(m, scale), m.returns, cost)
    sign = backtest(oracle_positions(m.drift), m.returns, cost)
    assert np.all(sharpe(sized, 252) > sharpe(sign, 252))
    assert sharpe(sized.mean(axis=1), 252) > sharpe(sign.mean(axis=1), 252) + 0.5


def test_drift_is_persistent_with_the_configured_half_life(long_market):
    d = long_market.drift[:, 0]
    lag = 60
    autocorr = np.corrcoef(d[:-lag], d[lag:])[0, 1]
    assert 0.4 < autocorr < 0.6  # half-life 60 bars


def test_difficulty_knobs_make_the_market_harder():
    base = generate_market(SYMBOLS, SECTORS, VOLS, 20_000, seed=5)
    vol = generate_market(SYMBOLS, SECTORS, VOLS, 20_000, seed=5, difficulty=Difficulty(vol_multiplier=2.0))
    crash = generate_market(SYMBOLS, SECTORS, VOLS, 20_000, seed=5, difficulty=Difficulty(crash_prob=0.01))
    weak = generate_market(SYMBOLS, SECTORS, VOLS, 20_000, seed=5, difficulty=Difficulty(signal_to_noise=0.5))
    cost = generate_market(SYMBOLS, SECTORS, VOLS, 20_000, seed=5, difficulty=Difficulty(cost_multiplier=2.0))
    assert vol.returns.std() > 1.8 * base.returns.std()
    daily_sigma = VOLS[5] / np.sqrt(252)
    assert (crash.returns[:, 5] < -5 * daily_sigma).sum() > 2 * (base.returns[:, 5] < -5 * daily_sigma).sum()
    assert np.abs(weak.drift).mean() < 0.6 * np.abs(base.drift).mean()
    assert cost.cost_multiplier == 2.0


def test_a_common_driver_makes_instruments_of_two_sectors_one_bet_and_leaves_the_rest_as_they_were():
    """`driver` loadings: two instruments of different sectors at 0.95 share about 0.9 of their noise and drift,
    their volatility stays as configured, an unloaded one is untouched (its own draws come first), and zero
    loadings give the built-in market bit for bit."""
    base = generate_market(SYMBOLS, SECTORS, VOLS, 20_000, seed=5)
    assert np.array_equal(base.prices, generate_market(SYMBOLS, SECTORS, VOLS, 20_000, seed=5, driver=[0.0] * 8).prices)
    loads = [0.95, 0, 0, 0, 0, 0.95, 0, 0]  # EURUSD (forex) and SPX500 (equity)
    tied = generate_market(SYMBOLS, SECTORS, VOLS, 20_000, seed=5, driver=loads)
    noise = np.diff(np.log(tied.prices), axis=0) - tied.drift[:-1]  # a bar's log return: the drift of the bar before
    assert 0.85 < np.corrcoef(noise[:, 0], noise[:, 5])[0, 1] < 0.95  # the table's 0.05 before
    assert 0.85 < np.corrcoef(tied.drift[:, 0], tied.drift[:, 5])[0, 1] < 0.95
    assert np.allclose(tied.returns.std(axis=0), base.returns.std(axis=0), rtol=0.05)
    assert np.array_equal(tied.prices[:, 1], base.prices[:, 1])
    with pytest.raises(ValueError, match="driver"):
        generate_market(SYMBOLS, SECTORS, VOLS, 100, seed=5, driver=[1.5] + [0.0] * 7)


def test_correlation_matrix_is_valid_for_user_symbols():
    corr = correlation_matrix(["A", "B", "C", "SPX500"], ["x", "x", "y", "equity"])
    assert np.allclose(np.diag(corr), 1) and np.linalg.eigvalsh(corr).min() > 0


def test_generator_is_fast():
    start = time.perf_counter()
    generate_market(SYMBOLS, SECTORS, VOLS, 100_000, seed=1)
    assert time.perf_counter() - start < 5.0  # generous for a loaded CI machine; measured ~0.25 s
