"""The rule baselines traded through PortfolioEnv (`mtq_common.evaluation.rules`): what each proposes, no
look-ahead, several in one env as each alone, the trend filter fitted on the training split only, one
execution path for rules and specialists, and the volatility-managed baselines."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from mtq_common.agents.hierarchy import HierarchyPolicy, instrument_specialist_index
from mtq_common.agents.nets import SpecialistAgents
from mtq_common.data.features import trend_zscore
from mtq_common.data.splits import load_splits
from mtq_common.data.tables import cost_rates
from mtq_common.data.volatility import VOL_TIMING_GRID, VolTiming, fit_vol_levels, market_sigma, vol_appetite
from mtq_common.envs.engine import POSITION_RATE, partial_adjustment
from mtq_common.envs.portfolio_env import PortfolioEnv
from mtq_common.envs.trading_env import instrument_obs_size, position_column
from mtq_common.evaluation import metrics as metrics_lib
from mtq_common.evaluation.backtest import policy_step, run_backtest, run_backtests
from mtq_common.evaluation.backtest_metrics import backtest_metrics
from mtq_common.evaluation.rules import (
    MOMENTUM_LOOKBACK,
    SCALED_TREND_GRID,
    TREND_FILTER_GRID,
    BuyAndHoldPolicy,
    RulePolicy,
    ScaledTrend,
    TrendFilter,
    VolManagedPolicy,
    backtest,
    baseline_policies,
    fit_scaled_trend,
    fit_trend_for,
    momentum_positions,
    partially_adjusted,
    pick_vol_timing,
    scaled_trend_positions,
    trend_filter_positions,
)
from mtq_common.evaluation.specialist_eval import segment_starts
from mtq_common.training.config import Config


def test_momentum_is_flat_without_enough_history(market, tables, cfg):
    env = PortfolioEnv(market, cfg, 2, torch_mode=True, tables=tables)
    env.reset(seed=0)
    obs = env.start_at(torch.tensor([MOMENTUM_LOOKBACK - 1, MOMENTUM_LOOKBACK]))
    momentum = RulePolicy(torch.as_tensor(momentum_positions(market.prices), dtype=torch.float32), 0.1)
    proposal = momentum.propose(obs, env)
    assert (proposal[0] == 0).all() and (proposal[1].abs() == 0.1).all()


def test_buy_and_hold_buys_when_flat_then_holds_without_trading(market, tables, cfg):
    """It buys at the position limit, then proposes the drifted holdings: no cost while no limit binds;
    a new episode starts flat, and it buys again."""
    loose = dataclasses.replace(cfg.environment, episode_length=25, max_portfolio_var=1.0,
                                max_correlation_exposure=1.0, max_sector_allocation=1.0)  # fmt: skip
    env = PortfolioEnv(market, dataclasses.replace(cfg, environment=loose), 2, torch_mode=True, tables=tables)
    env.reset(seed=0)
    obs = env.start_at(torch.tensor([200, 300]))
    policy = BuyAndHoldPolicy(0.1)
    first = policy.propose(obs, env)
    torch.testing.assert_close(first, torch.full((2, market.num_instruments), 0.1))
    quiet = 0
    for step in range(25):
        held = env.holdings.clone()
        pause = torch.zeros_like(held, dtype=torch.bool) if policy.stopped is None else policy.stopped
        proposal = policy.propose(obs, env)
        # flat for a bar after a stop; else the holdings, bought anew where flat
        torch.testing.assert_close(proposal, torch.where(pause, 0.0, torch.where(held != 0, held, 0.1)))
        obs, _, _, truncated, info = policy_step(policy, env, obs)
        assert not info["binding"][:, 1:].any()  # loose limits: only the position cap acts
        executed = info["executed_weights"]
        torch.testing.assert_close(executed, proposal.clamp(max=0.1))
        kept = (held > 0) & (held <= 0.1) & ~pause
        assert torch.equal(executed[kept], held[kept]), step  # within the cap: the holding as it is, no trade
        torch.testing.assert_close(info["cost"], (env.cost_rate * (executed - held).abs()).sum(-1))
        quiet += int(kept.sum())
    assert quiet > 25 * 2 * market.num_instruments // 4
    assert truncated.all()  # a new episode: flat, so it buys again
    torch.testing.assert_close(policy.propose(obs, env), torch.full((2, market.num_instruments), 0.1))


@pytest.mark.parametrize("name", ["equal_weight", "buy_and_hold", "risk_parity", "momentum", "trend_filter"])
def test_baselines_do_not_look_ahead(name, market, cfg, tables, trend):
    starts, length = segment_starts(tables, 4)
    cut = starts[1] + length // 2  # the middle of a segment
    rng = np.random.default_rng(1)
    prices = market.prices.copy()
    prices[cut + 1 :] *= np.exp(np.cumsum(rng.normal(0.0, 0.02, prices[cut + 1 :].shape), axis=0))
    changed = dataclasses.replace(market, prices=prices)

    def proposals(mkt):
        bt = run_backtest(mkt, cfg, lambda rows: baseline_policies(mkt, cfg, trend)[name], segments=4)
        return bt.bars, bt.proposed

    bars, before = proposals(market)
    _, after = proposals(changed)
    upto = bars <= cut
    np.testing.assert_array_equal(before[upto], after[upto])
    if name != "equal_weight":
        assert not np.array_equal(before[~upto], after[~upto]), "the perturbation is visible after the cut"


def test_run_backtests_runs_each_policy_as_it_would_run_alone(market, cfg, tables, trend):
    """Several policies in one env (policy-major rows) give each the backtest it gets on its own."""
    makers = {name: (lambda n: lambda rows: baseline_policies(market, cfg, trend)[n])(name)
              for name in ("momentum", "buy_and_hold", "risk_parity")}  # fmt: skip
    together = run_backtests(market, cfg, makers, segments=4, tables=tables)
    for name, make in makers.items():
        alone = run_backtest(market, cfg, make, segments=4, tables=tables)
        np.testing.assert_array_equal(together[name].weights, alone.weights, err_msg=name)
        np.testing.assert_array_equal(together[name].net_return, alone.net_return, err_msg=name)


def test_the_trend_filter_is_fitted_on_the_training_split_only(cfg):
    splits = load_splits(cfg)
    trend = fit_trend_for(splits["train"], cfg)
    assert trend.half_life in TREND_FILTER_GRID["half_life"] and trend.band in TREND_FILTER_GRID["band"]
    assert trend.fitted_on == "train" and math.isfinite(trend.train_sharpe)
    # the pick is the best candidate of the grid on the training split (the first one on a tie)
    train = splits["train"]
    cost = cost_rates(train, cfg, "cpu").double().numpy()
    scores = {
        (h, b): metrics_lib.sharpe(
            backtest(trend_filter_positions(train.prices, TrendFilter(h, b)), train.returns, cost).sum(-1),
            train.bars_per_year,
        )
        for h, b in itertools.product(TREND_FILTER_GRID["half_life"], TREND_FILTER_GRID["band"])
    }
    assert scores[(trend.half_life, trend.band)] == max(scores.values()) == pytest.approx(trend.train_sharpe)
    for split in ("val", "test"):
        with pytest.raises(ValueError, match="train"):
            fit_trend_for(splits[split], cfg)


def test_the_scaled_trend_is_fitted_on_the_training_split_only_traded_alike(cfg):
    splits = load_splits(cfg)
    train = splits["train"]
    cost = cost_rates(train, cfg, "cpu").double().numpy()
    rule = fit_scaled_trend(train, cost, POSITION_RATE)
    assert rule.fitted_on == "train" and math.isfinite(rule.train_sharpe)
    scores = {
        (h, c): metrics_lib.sharpe(
            backtest(partially_adjusted(scaled_trend_positions(train.prices, ScaledTrend(h, c)), POSITION_RATE),
                     train.returns, cost).sum(-1),
            train.bars_per_year,
        )
        for h, c in itertools.product(SCALED_TREND_GRID["half_life"], SCALED_TREND_GRID["scale"])
    }  # fmt: skip
    assert scores[(rule.half_life, rule.scale)] == max(scores.values()) == pytest.approx(rule.train_sharpe)
    for split in ("val", "test"):
        with pytest.raises(ValueError, match="train"):
            fit_scaled_trend(splits[split], cost, POSITION_RATE)


def test_the_scaled_trend_is_the_z_score_in_proportion_clipped_and_held_through_the_partial_adjustment(market):
    z = np.nan_to_num(trend_zscore(market.prices, 20))
    positions = scaled_trend_positions(market.prices, ScaledTrend(20, 0.5))
    assert positions.shape == market.prices.shape and np.abs(positions).max() <= 1.0
    inside = np.abs(z) < 2.0  # where 0.5 z is not clipped
    assert np.allclose(positions[inside], 0.5 * z[inside])
    assert np.all(positions[z > 2.0] == 1.0) and np.all(positions[z < -2.0] == -1.0)
    # held: the execution's partial adjustment from flat, bar by bar
    held, previous = partially_adjusted(positions, 0.3), torch.zeros(positions.shape[1], dtype=torch.float64)
    for t in range(50):
        previous = partial_adjustment(previous, torch.from_numpy(positions[t]), 0.3)
        assert np.allclose(held[t], previous.numpy())
    # several books at once (the fit's candidates), each exactly as alone
    other = scaled_trend_positions(market.prices, ScaledTrend(10, 0.25))
    both = partially_adjusted(np.stack([positions, other]), 0.3)
    assert np.array_equal(both[0], held) and np.array_equal(both[1], partially_adjusted(other, 0.3))


def test_the_trend_filter_trades_less_than_momentum_on_the_default_market():
    """DESIGN section 14: the band cuts the turnover that costs eat (default synthetic market, test split)."""
    cfg = Config()
    splits = load_splits(cfg)
    trend = fit_trend_for(splits["train"], cfg)
    test = splits["test"]
    makers = {name: (lambda n: lambda rows: baseline_policies(test, cfg, trend)[n])(name)
              for name in ("momentum", "trend_filter")}  # fmt: skip
    ran = run_backtests(test, cfg, makers, segments=16)
    rf = cfg.reward.risk_free_rate
    momentum, trend_filter = (backtest_metrics(ran[name], rf) for name in ("momentum", "trend_filter"))
    assert trend_filter["turnover"] < momentum["turnover"], (trend_filter["turnover"], momentum["turnover"])
    assert trend_filter["turnover_per_vol"] < momentum["turnover_per_vol"]


# ---------------------------------------------------------------------------------------------
# Execution alike (DESIGN section 4) and the volatility-managed baselines (DESIGN section 14)
# ---------------------------------------------------------------------------------------------


class TableSpecialists(SpecialistAgents):
    """Specialists whose mean action is a rule's table at the env's bar: the rule through the specialists' path
    (`HierarchyPolicy` with an equal allocation, `to_position`'s partial adjustment, own positions passed)."""

    def __init__(self, table: torch.Tensor, env: PortfolioEnv, names, rate: float):
        n = env.n
        super().__init__(names, instrument_obs_size(n), hidden=4, position_rate=rate, position_index=position_column(n))
        self.table, self.env = table, env

    def mean_per_slot(self, obs, owner):
        return self.table.index_select(0, self.env.bar)


def test_a_rule_trades_the_same_book_through_the_specialists_path_and_the_baseline_path(market, cfg, tables):
    """One execution path for every policy: momentum as the specialists' target and as a `RulePolicy` at the
    same rate gives the same proposals, stops and executed book, lock-outs included."""
    table = torch.as_tensor(momentum_positions(market.prices), dtype=torch.float32)
    size, rows, books = cfg.environment.max_position_size, 4, []
    for path in ("specialists", "baseline"):
        env = PortfolioEnv(market, cfg, rows, torch_mode=True, tables=tables)
        env.reset(seed=0)
        obs = env.start_at(torch.tensor([120, 200, 300, 400]))
        if path == "specialists":
            agents = TableSpecialists(table, env, cfg.specialists, POSITION_RATE)
            owner = instrument_specialist_index(market.sectors, agents.names)
            policy = HierarchyPolicy(agents, None, owner, size, rows, "cpu")
        else:
            policy = RulePolicy(table, size, POSITION_RATE)
        trace = []
        for _ in range(150):
            obs, _, _, _, info = policy_step(policy, env, obs)
            trace.append([info["proposed_weights"], info["executed_weights"], info["stop_loss"].float()])
        books.append([torch.stack(x) for x in zip(*trace, strict=True)])
    (proposed_a, executed_a, stops_a), (proposed_b, executed_b, stops_b) = books
    assert stops_a.sum() > 0, "the test needs stop-losses (and their lock-outs)"
    torch.testing.assert_close(stops_a, stops_b, rtol=0, atol=0)
    # (float32: the two paths round `target * size / size` differently, a few ulps)
    torch.testing.assert_close(proposed_a, proposed_b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(executed_a, executed_b, rtol=1e-5, atol=1e-7)
    # the partial adjustment is visible: positions between the flat book and the target
    assert ((proposed_a.abs() > 0) & (proposed_a.abs() < 0.99 * size)).float().mean() > 0.05


@pytest.fixture(scope="module")
def splits(cfg):
    return load_splits(cfg)


def test_vol_levels_are_fitted_on_train_and_picked_on_validation_only(splits, cfg):
    with pytest.raises(ValueError, match="training split only"):
        fit_vol_levels(splits["val"])
    levels = fit_vol_levels(splits["train"])
    assert levels.half_lives == VOL_TIMING_GRID["half_life"]
    # sigma_star is the training median of sigma_hat: half of the training bars are above it
    for h, star in zip(levels.half_lives, levels.sigma_star, strict=True):
        assert np.mean(market_sigma(splits["train"], levels, h) > star) == pytest.approx(0.5, abs=0.01)
    t = len(splits["test"].returns)
    args = (np.arange(t - 1), np.zeros(t - 1), np.zeros((t - 1, 8)), t, np.zeros(8), 0.0)
    with pytest.raises(ValueError, match="validation split only"):
        pick_vol_timing(splits["test"], levels, *args)


def test_the_vol_appetite_is_causal_at_most_one_and_lower_in_volatile_regimes(splits):
    levels = fit_vol_levels(splits["train"])
    test = splits["test"]
    timing = VolTiming(20, 2, "val", 0.0)
    appetite = vol_appetite(test, levels, timing)
    assert appetite.max() <= 1.0 and appetite.min() > 0.0
    by_regime = [appetite[test.regime == r].mean() for r in np.unique(test.regime)]
    assert by_regime[0] > by_regime[-1], "calm bars get more appetite than crisis bars"
    cut = len(appetite) // 2
    stormy = test.returns.copy()
    stormy[cut + 1 :] *= 5.0  # a storm after the cut changes nothing up to it
    bumped = dataclasses.replace(test, prices=test.prices[0] * np.cumprod(1.0 + stormy, axis=0))
    np.testing.assert_allclose(vol_appetite(bumped, levels, timing)[: cut + 1], appetite[: cut + 1], rtol=1e-12)
    assert vol_appetite(bumped, levels, timing)[cut + 5] < appetite[cut + 5]


def test_a_vol_managed_rule_scales_the_rules_book_and_keeps_its_trades(market, cfg, tables, trend, splits):
    """The scaled book has the inner rule's own positions, hence the same stops; its proposal is the rule's
    times the appetite of the bar."""
    levels = fit_vol_levels(splits["train"])
    appetite = vol_appetite(market, levels, VolTiming(10, 2, "val", 0.0))
    scale = torch.as_tensor(appetite, dtype=torch.float32)
    size = cfg.environment.max_position_size

    def rule(rows):
        return baseline_policies(market, cfg, trend, position_rate=POSITION_RATE)["trend_filter"]

    makers = {"plain": rule, "managed": lambda rows: VolManagedPolicy(rule(rows), scale, size)}
    ran = run_backtests(market, cfg, makers, segments=4, tables=tables)
    plain, managed = ran["plain"], ran["managed"]
    np.testing.assert_array_equal(managed.stop_loss, plain.stop_loss)
    expected = plain.proposed * scale.numpy()[plain.bars, None].astype(np.float64)
    np.testing.assert_allclose(managed.proposed, expected, rtol=1e-6, atol=1e-9)
    assert appetite[plain.bars].min() < 0.9, "the appetite moves on this market"
