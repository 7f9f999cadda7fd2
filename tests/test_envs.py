"""Environments, risk manager and reward: hand-checked steps, hard limits, reward weights, bad input."""

import dataclasses

import numpy as np
import pytest
import torch

from kernels import RewardParams
from kernels.portfolio_step import portfolio_step_reference
from mtq_common.agents.hierarchy import compose_weights, instrument_specialist_index
from mtq_common.data.features import FEATURE_WINDOW
from mtq_common.data.market import MarketData
from mtq_common.data.splits import financed
from mtq_common.data.synthetic import generate_market
from mtq_common.envs.portfolio_env import PortfolioEnv
from mtq_common.envs.trading_env import SpecialistEnv, specialist_rows
from mtq_common.training.config import Config
from tests.helpers import SECTORS, VOLS, limits_hold, random_books, restarting_portfolio_pair

START = FEATURE_WINDOW + 5  # a bar every episode may start at


def small_config(**env) -> Config:
    """Default config with `env` overrides and no cash yield, so hand-checked returns stay simple."""
    cfg = Config()
    cfg.reward.risk_free_rate = 0.0
    for key, value in env.items():
        setattr(cfg.environment, key, value)
    return cfg


def hand_market(prices: np.ndarray, sectors=None) -> MarketData:
    """A market with explicit prices; flat history before START so hand-checked numbers stay simple."""
    prices = np.asarray(prices, dtype=np.float64)
    if prices.ndim == 1:
        prices = prices[:, None]
    n = prices.shape[1]
    history = np.ones((START, n)) * prices[:1]
    full = np.concatenate([history, prices], axis=0)
    symbols = ["SPX500", "NAS100", "EURUSD"][:n]
    return MarketData(
        symbols=symbols,
        sectors=sectors or ["equity", "equity", "forex"][:n],
        prices=full,
        timestamps=np.arange(len(full)).astype("datetime64[D]"),
        bars_per_year=252.0,
        bars_per_day=1.0,
        source="synthetic",
        split="train",
    )


def start_at(env, bar: int = START) -> None:
    env.reset(seed=0)
    env.start_at(bar)


# ---------------------------------------------------------------------------------------------
# Hand-checked single steps
# ---------------------------------------------------------------------------------------------


def test_cost_on_turnover_equity_and_drawdown():
    cfg = small_config(max_position_size=0.1, transaction_cost=0.003)
    market = hand_market([100.0, 101.0, 98.98, 98.98, 98.98])
    env = SpecialistEnv(market, cfg, [0], torch_mode=True)
    start_at(env)
    _, _, _, _, info = env.step(torch.tensor([[1.0]]))  # buy 0.1 at 100, price -> 101
    assert info["cost"].item() == pytest.approx(0.003 * 0.1)
    assert info["net_return"].item() == pytest.approx(0.1 * 0.01 - 0.0003, abs=1e-7)
    equity1 = 1 + 0.1 * 0.01 - 0.0003
    assert info["equity"].item() == pytest.approx(equity1, rel=1e-6)
    # the holding drifted to 0.1 * 1.01 / (1 + net): keeping 0.1 costs the trade back to it
    drifted1 = 0.1 * 1.01 / equity1
    _, _, _, _, info = env.step(torch.tensor([[1.0]]))  # keep 0.1, price -2%
    cost2 = 0.003 * (drifted1 - 0.1)
    assert info["cost"].item() == pytest.approx(cost2, rel=1e-3)
    net2 = 0.1 * (98.98 / 101 - 1) - cost2
    equity2 = equity1 * (1 + net2)
    assert info["equity"].item() == pytest.approx(equity2, rel=1e-6)
    assert info["drawdown"].item() == pytest.approx(1 - equity2 / equity1, rel=1e-4)
    drifted2 = 0.1 * (98.98 / 101) / (1 + net2)
    _, _, _, _, info = env.step(torch.tensor([[-0.5]]))  # flip to -0.05: the trade needed is 0.05 + drifted2
    assert info["cost"].item() == pytest.approx(0.003 * (0.05 + drifted2), rel=1e-5)


def test_the_account_earns_the_cash_rate_on_top_of_its_trading():
    cfg = Config()  # risk_free_rate 0.02
    market = hand_market([100.0, 101.0, 101.0])
    env = SpecialistEnv(market, cfg, [0], torch_mode=True)
    start_at(env)
    _, _, _, _, info = env.step(torch.tensor([[0.0]]))  # flat: only the cash yield
    assert info["net_return"].item() == pytest.approx(0.02 / 252, rel=1e-5)


def test_a_long_spot_instrument_gives_up_the_cash_rate_it_spends_and_a_future_does_not():
    futures = Config()  # risk_free_rate 0.02
    spot = Config()
    spot.instruments["SPX500"] = dataclasses.replace(spot.instruments["SPX500"], spot=True)
    nets = {}
    for name, cfg in (("futures", futures), ("spot", spot)):
        market = financed(hand_market([100.0, 100.0, 100.0, 100.0]), cfg)  # a flat price: only the cash counts
        env = SpecialistEnv(market, cfg, [0], torch_mode=True)
        start_at(env)
        nets[name] = [env.step(torch.tensor([[1.0]]))[4]["net_return"].item() for _ in range(3)]
    held = futures.environment.max_position_size  # the long book held over the last two bars
    for f, s in zip(nets["futures"][1:], nets["spot"][1:], strict=True):
        assert f == pytest.approx(0.02 / 252, abs=1e-7)  # a future ties up no cash: the account keeps the rate
        assert f - s == pytest.approx(held * 0.02 / 252, rel=0.02)  # the cash in the stock no longer earns it


def test_stop_loss_closes_the_trade_and_holds_flat_until_a_new_trade():
    cfg = small_config(stop_loss_pct=0.02)
    market = hand_market([100.0, 99.0, 97.5, 97.0, 96.0, 95.0, 96.0])
    env = SpecialistEnv(market, cfg, [0], torch_mode=True)
    start_at(env)
    _, _, _, _, info = env.step(torch.tensor([[1.0]]))  # long at 100 -> 99: -1%, no stop
    assert not info["stop_loss"].item()
    _, _, _, _, info = env.step(torch.tensor([[1.0]]))  # 97.5: -2.5% against entry: stopped
    assert info["stop_loss"].item()
    _, _, _, _, info = env.step(torch.tensor([[1.0]]))  # same sign asked: held flat, closing cost paid
    assert info["position"].item() == 0.0
    assert info["cost"].item() == pytest.approx(0.003 * 0.1 * 0.975 / 0.99, rel=2e-3)  # the drifted holding
    _, _, _, _, info = env.step(torch.tensor([[0.7]]))  # still the stopped sign: flat
    assert info["position"].item() == 0.0
    _, _, _, _, info = env.step(torch.tensor([[-1.0]]))  # a new (short) trade opens
    assert info["position"].item() == pytest.approx(-0.1)


def test_reward_sign_follows_the_return():
    market = hand_market([100.0, 102.0, 104.0, 102.0])
    env = SpecialistEnv(market, small_config(), [0], torch_mode=True)
    start_at(env)
    _, reward, _, _, _ = env.step(torch.tensor([[1.0]]))
    assert reward.item() > 0  # long into a rise
    start_at(env)
    _, reward, _, _, _ = env.step(torch.tensor([[-1.0]]))
    assert reward.item() < 0  # short into a rise


def test_truncation_at_the_data_end_is_not_termination():
    market = hand_market([100.0, 101.0, 102.0, 103.0])
    env = SpecialistEnv(market, small_config(episode_length=1000), [0], torch_mode=True)
    start_at(env, market.num_bars - 3)
    truncs = []
    for _ in range(2):
        _, _, term, trunc, info = env.step(torch.tensor([[0.5]]))
        truncs.append(bool(trunc.item()))
        assert not term.item()
    assert truncs == [False, True]
    assert info["_final_obs"].item() and info["_episode"].item()
    assert info["episode"]["l"].item() == 2
    assert env.engine.steps.item() == 0  # autoreset (SAME_STEP): a new episode has begun


def test_episode_length_truncates():
    market = generate_market(["SPX500"], ["equity"], [0.17], 600, seed=1)
    env = SpecialistEnv(market, small_config(episode_length=7), [0, 0, 0], torch_mode=True)
    env.reset(seed=3)
    for i in range(7):
        _, _, _, trunc, _ = env.step(torch.zeros(3, 1))
        assert bool(trunc.all()) == (i == 6)


# ---------------------------------------------------------------------------------------------
# Reward weights: each one moves the reward the right way
# ---------------------------------------------------------------------------------------------


def _reward(params: RewardParams, weights=(0.05, 0.05), prev=(0.0, 0.0), ret=(0.01, -0.004), drawdown_state=0.0):
    w = torch.tensor([weights])
    peak = torch.tensor([1.0])
    equity = torch.tensor([1.0 - drawdown_state])
    out = portfolio_step_reference(
        w,
        torch.tensor([prev]),
        torch.tensor([ret]),
        torch.tensor([0.003, 0.003]),
        equity,
        peak,
        torch.tensor([0.0002]),
        torch.tensor([2e-5]),
        torch.tensor([1e-5]),
        torch.tensor([0.5]),
        params,
    )
    return out.reward.item()


@pytest.mark.parametrize(
    "key, low, high, kwargs, direction",
    [
        ("risk_penalty_weight", 0.0, 2.0, dict(drawdown_state=0.3), -1),
        ("transaction_cost_weight", 0.0, 5.0, dict(prev=(-0.05, 0.0)), -1),
        ("diversification_bonus_weight", 0.0, 2.0, {}, +1),
        ("sharpe_target", 0.0, 5.0, {}, -1),
        ("max_drawdown_target", 0.05, 0.3, dict(drawdown_state=0.2), +1),
        ("risk_free_per_bar", 0.0, 0.02 / 252 * 50, {}, -1),
        ("downside_volatility_weight", 0.0, 2.0, dict(ret=(-0.02, -0.01)), -1),
        ("downside_volatility_weight", 0.0, 2.0, dict(ret=(0.02, 0.01)), +1),
    ],
)
def test_each_reward_weight_moves_the_reward(key, low, high, kwargs, direction):
    lo = _reward(dataclasses.replace(RewardParams(), **{key: low}), **kwargs)
    hi = _reward(dataclasses.replace(RewardParams(), **{key: high}), **kwargs)
    assert (hi - lo) * direction > 1e-6, (key, lo, hi)


@pytest.mark.parametrize(
    "key, value", [("risk_penalty_weight", 3.0), ("transaction_cost_weight", 3.0), ("risk_free_rate", 0.2)]
)
def test_config_reward_keys_reach_the_environment(key, value):
    market = generate_market(["SPX500", "EURUSD"], ["equity", "forex"], [0.17, 0.07], 400, seed=2)
    actions = torch.tensor([[0.08, -0.06], [-0.07, 0.09]] * 10)

    def total(cfg):
        env = PortfolioEnv(market, cfg, 1, torch_mode=True)
        start_at(env)
        return sum(env.step(a[None])[1].item() for a in actions)

    changed = Config()
    setattr(changed.reward, key, value)
    assert total(changed) < total(Config())


# ---------------------------------------------------------------------------------------------
# The risk manager inside the portfolio env (the manager alone: tests/test_risk_limits.py)
# ---------------------------------------------------------------------------------------------


def test_every_executed_book_in_the_portfolio_env_satisfies_every_limit():
    cfg = Config()
    market = generate_market(cfg.data.instruments, SECTORS, VOLS, 800, 5)
    env = PortfolioEnv(market, cfg, 64, torch_mode=True, seed=1)
    env.reset(seed=1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        cov = env.engine.tables.cov.index_select(0, env.bar)
        _, _, _, _, info = env.step(torch.randn(64, 8, generator=gen) * 0.2)
        limits_hold(info["executed_weights"], cov, env.limits)


# ---------------------------------------------------------------------------------------------
# Observations, determinism, bad input
# ---------------------------------------------------------------------------------------------


def test_observations_do_not_look_ahead():
    cfg = Config()
    market = generate_market(cfg.data.instruments, SECTORS, [0.1] * 8, 400, 6)
    changed = dataclasses.replace(market, prices=market.prices.copy())
    changed.prices[START + 1 :] *= np.linspace(0.5, 2.0, 400 - START - 1)[:, None]
    obs = []
    for m in (market, changed):
        env = PortfolioEnv(m, cfg, 1, torch_mode=True)
        start_at(env)
        obs.append(env._observe())
    for key in ("instruments", "portfolio"):
        torch.testing.assert_close(obs[0][key], obs[1][key], rtol=0, atol=0)


def test_diagnostic_observation_carries_the_next_return():
    market = hand_market([100.0, 103.0, 103.0])
    env = SpecialistEnv(market, small_config(), [0], torch_mode=True, next_return_diagnostic=True)
    start_at(env)
    obs = env._observe()
    assert obs.shape[-1] == env.obs_size and obs[0, -1].item() > 0


def test_same_seed_same_trajectory():
    cfg = Config()
    market = generate_market(cfg.data.instruments, SECTORS, [0.1] * 8, 800, 7)
    runs = []
    for _ in range(2):
        env = PortfolioEnv(market, cfg, 16, seed=5)
        obs, _ = env.reset(seed=5)
        rng = np.random.default_rng(0)
        rewards = [env.step(rng.normal(0, 0.1, (16, 8)).astype(np.float32))[1] for _ in range(20)]
        runs.append((obs["portfolio"], np.stack(rewards)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.full((2, 1), np.nan, np.float32), "not finite"),
        (np.full((2, 1), np.inf, np.float32), "not finite"),
        (np.zeros((3, 1), np.float32), "shape"),
        (np.zeros((2, 1), np.int64), "floating point"),
        ([[0.0], [0.0]], "numpy array or a torch tensor"),
    ],
)
def test_bad_actions_are_clear_errors_and_leave_the_state_alone(bad, match):
    market = generate_market(["SPX500"], ["equity"], [0.17], 400, seed=8)
    env = SpecialistEnv(market, Config(), [0, 0])
    env.reset(seed=0)
    before = env.engine.t.clone()
    with pytest.raises(ValueError, match=match):
        env.step(bad)
    assert torch.equal(env.engine.t, before)


def test_out_of_range_actions_are_clipped():
    market = generate_market(["SPX500"], ["equity"], [0.17], 400, seed=8)
    env = SpecialistEnv(market, Config(), [0], torch_mode=True)
    start_at(env)
    _, _, _, _, info = env.step(torch.tensor([[7.0]]))
    assert info["position"].item() == pytest.approx(0.1)


def test_phase1_trades_the_clipped_position_without_checks():
    """The training fast path (check_actions=False) clips too: an action of 3.0 trades, costs and earns
    exactly what 1.0 does (DESIGN section 4), step after step."""
    market = generate_market(["SPX500"], ["equity"], [0.17], 400, seed=8)
    env = SpecialistEnv(market, Config(), [0, 0], torch_mode=True, check_actions=False)
    start_at(env)
    for raw in (3.0, 3.0, -7.5, 0.4, 1e6):
        clipped = max(-1.0, min(1.0, raw))
        obs, reward, _, _, info = env.step(torch.tensor([[raw], [clipped]]))
        assert info["position"].tolist() == pytest.approx([0.1 * clipped] * 2)
        assert info["cost"][0] == info["cost"][1] and info["net_return"][0] == info["net_return"][1]
        assert reward[0] == reward[1]
        torch.testing.assert_close(obs[0], obs[1], rtol=0, atol=0)


def test_a_specialists_observation_is_the_same_standalone_and_under_a_meta_controller():
    """DESIGN section 4: the specialist observes its own position (after the stop-loss), never the book that
    the meta-controller and the risk manager scaled. The same own positions in slot i of a PortfolioEnv,
    traded at an appetite of 0.5 (and cut further by the risk manager), give slot i exactly the observation
    of a SpecialistEnv on instrument i, stop-losses included."""
    cfg = Config()
    cfg.environment.stop_loss_pct = 0.005  # tight: several stops in the stretch
    market = generate_market(cfg.data.instruments, SECTORS, VOLS, 400, 9)
    size = cfg.environment.max_position_size
    i = 5  # SPX500
    alone = SpecialistEnv(market, cfg, [i], torch_mode=True)
    book = PortfolioEnv(market, cfg, 1, torch_mode=True)
    obs_alone, obs_book = alone.start_at(START), book.start_at(START)
    rng = np.random.default_rng(3)
    own = np.zeros((1, 8), np.float32)
    stops = scaled = 0
    for step in range(120):
        torch.testing.assert_close(obs_book["instruments"][0, i], obs_alone[0], rtol=0, atol=1e-6, msg=f"step {step}")
        if step % 8 == 0:  # trades of a few bars, sizes and signs changing
            own = rng.uniform(-1.0, 1.0, (1, 8)).astype(np.float32)
        positions = torch.from_numpy(own)
        obs_alone, _, _, _, info_alone = alone.step(positions[:, i : i + 1])
        obs_book, _, _, _, info_book = book.step(0.5 * positions * size, own_positions=positions)
        assert bool(info_book["stop_loss"][0, i]) == bool(info_alone["stop_loss"][0])
        stops += int(info_alone["stop_loss"][0])
        executed, asked = abs(info_book["executed_weights"][0, i].item()), abs(info_alone["position"][0].item())
        assert executed <= 0.5 * asked + 1e-7
        scaled += executed < asked
    torch.testing.assert_close(obs_book["instruments"][0, i], obs_alone[0], rtol=0, atol=1e-6)
    assert stops >= 2 and scaled > 40  # the slot held a (scaled) position on many bars


# ---------------------------------------------------------------------------------------------
# Hierarchy composition and row layout
# ---------------------------------------------------------------------------------------------


def test_compose_weights():
    owner = instrument_specialist_index(SECTORS, ["forex", "commodities", "equity"])
    positions = torch.tensor([[1.0, -0.5, 0.2, 1.0, -1.0, 0.5, 0.5, -1.0]])
    even = torch.full((1, 3), 1 / 3)
    w = compose_weights(even, torch.ones(1), positions, owner, 0.1)
    torch.testing.assert_close(w, positions * 0.1)  # even allocation = the specialists as trained
    only_equity = torch.tensor([[0.0, 0.0, 1.0]])
    w = compose_weights(only_equity, torch.full((1,), 0.5), positions, owner, 0.1)
    assert torch.all(w[0, :5] == 0) and torch.all(w.abs() <= 0.1)
    torch.testing.assert_close(w[0, 5:], torch.tensor([0.075, 0.075, -0.1]))  # 0.5 * 3 * 1.0 * 0.1, capped
    scale = torch.tensor([0.5, 1.0, 1.0, 1.0, 1.0, 2.0, 0.5, 1.0])  # Phase 3's joint sizing, one factor an instrument
    w = compose_weights(even, torch.ones(1), positions, owner, 0.1, scale)
    torch.testing.assert_close(w, (positions * 0.1 * scale).clamp(-0.1, 0.1))  # the cap holds after the sizing


def test_specialist_rows_group_by_specialist():
    cfg = Config()
    market = generate_market(cfg.data.instruments, SECTORS, [0.1] * 8, 300, 1)
    inst, owner = specialist_rows(market, ["forex", "commodities", "equity"], 4)
    assert owner.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert inst.tolist() == [0, 1, 2, 0, 3, 4, 3, 4, 5, 6, 7, 5]


@pytest.mark.parametrize("kind", ["specialist", "portfolio"])
def test_the_cpu_restart_path_gives_the_same_observations_as_rebuilding_every_row(kind):
    """After an autoreset the CPU rebuilds only the restarted rows' observations; the result must equal
    rebuilding every row (the dense path other devices take), bit for bit, including the final obs."""
    cfg = Config()
    cfg.environment.episode_length = 7  # many restarts
    market = generate_market(cfg.data.instruments, SECTORS, VOLS, 400, 9)

    def make():
        if kind == "specialist":
            return SpecialistEnv(market, cfg, list(range(8)) * 4, torch_mode=True, seed=3)
        return PortfolioEnv(market, cfg, 16, torch_mode=True, seed=3)

    sparse, dense = make(), make()
    dense.dense_restart = True
    gen = torch.Generator().manual_seed(0)
    for env in (sparse, dense):
        env.reset(seed=3)
    restarts = 0
    for _ in range(40):
        shape = (32, 1) if kind == "specialist" else (16, 8)
        action = torch.rand(shape, generator=gen) * 2 - 1
        a, b = sparse.step(action), dense.step(action)
        restarts += int(a[3].sum())
        for x, y in ((a[0], b[0]), (a[4]["final_obs"], b[4]["final_obs"])):
            if isinstance(x, dict):
                for key in x:
                    assert torch.equal(x[key], y[key]), key
            else:
                assert torch.equal(x, y)
    assert restarts > 20


def test_a_step_without_observations_changes_the_state_as_a_full_step():
    """`observe=False` (the paired baseline's twin, which keeps only the reward) builds no observation
    and otherwise steps exactly as a full step: same rewards, truncations and infos, same state after
    every step (restarts included), so observing afterwards gives the full step's observation."""
    full, blind, gen = restarting_portfolio_pair()
    restarts = 0
    for _ in range(30):
        weights = random_books(gen)
        obs, reward, _, truncated, info = full.step(weights)
        no_obs, blind_reward, _, blind_truncated, blind_info = blind.step(weights, observe=False)
        assert no_obs is None and blind_info["final_obs"] is None
        assert torch.equal(reward, blind_reward) and torch.equal(truncated, blind_truncated)
        for key in ("net_return", "executed_weights", "var", "equity", "stop_loss"):
            assert torch.equal(info[key], blind_info[key]), key
        for key, value in blind.observe().items():
            assert torch.equal(value, obs[key]), key
        restarts += int(truncated.sum())
    assert restarts > 20


def test_an_unscored_step_books_the_same_accounts_and_no_reward():
    """`score=False` (the backtests, which read the accounts only) skips the reward: it is 0 and its moving
    moments stay put, while the accounts, the books, the observations and the restarts are the scored env's,
    bit for bit (so every backtest and report is what it was with the reward computed)."""
    scored, unscored, gen = restarting_portfolio_pair(score=False)
    restarts = 0
    for _ in range(30):
        weights = random_books(gen)
        obs, reward, _, truncated, info = scored.step(weights)
        plain_obs, plain_reward, _, plain_truncated, plain_info = unscored.step(weights)
        assert (plain_reward == 0).all() and (reward != 0).any()
        assert torch.equal(truncated, plain_truncated)
        for key in ("net_return", "cost", "equity", "drawdown", "executed_weights", "var", "stop_loss"):
            assert torch.equal(info[key], plain_info[key]), key
        for key, value in plain_obs.items():
            assert torch.equal(value, obs[key]), key
        restarts += int(truncated.sum())
    assert restarts > 20
    # the reward's moving mean starts at 0 each episode: only the scored env moves it
    assert (unscored.engine.ema_a == 0).all() and (scored.engine.ema_a != 0).any()
