"""The rule baselines traded through PortfolioEnv (`mtq_common.baselines`): what each proposes, no
look-ahead, several in one env as each alone, and the trend filter fitted on the training split only."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from mtq_common import metrics as metrics_lib
from mtq_common.backtest import backtest_metrics, policy_step, run_backtest, run_backtests
from mtq_common.baselines import (
    MOMENTUM_LOOKBACK,
    TREND_FILTER_GRID,
    BuyAndHoldPolicy,
    RulePolicy,
    TrendFilter,
    backtest,
    baseline_policies,
    fit_trend_for,
    momentum_positions,
    trend_filter_positions,
)
from mtq_common.config import Config
from mtq_common.envs import PortfolioEnv
from mtq_common.market import load_splits
from mtq_common.market_tables import cost_rates
from mtq_common.specialist_eval import segment_starts


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
    policy = BuyAndHoldPolicy(None, 0.1)
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
