"""Gymnasium adapters and registration: check_env, make/make_vec, seeding, spaces, end-of-data truncation."""

import importlib
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

import mtq_common
from mtq_common.data.features import FEATURE_NAMES, compute_features
from mtq_common.data.splits import load_splits
from mtq_common.data.synthetic import generate_market
from mtq_common.data.tables import build_tables
from mtq_common.envs.gym_env import PortfolioSingleEnv, SpecialistSingleEnv, make_portfolio_vec, make_specialist_vec
from mtq_common.envs.portfolio_env import PortfolioEnv
from mtq_common.envs.trading_env import SpecialistEnv
from mtq_common.training.config import Config

F = len(FEATURE_NAMES)
ADAPTERS = {"specialist": SpecialistSingleEnv, "portfolio": PortfolioSingleEnv}


def small_config(episode_length: int = 1000) -> Config:
    """The default config on a short synthetic market (table building stays fast)."""
    cfg = Config()
    s = cfg.data.synthetic
    s.train_bars, s.val_bars, s.test_bars = 2000, 200, 200
    cfg.environment.episode_length = episode_length
    return cfg


@pytest.fixture(scope="module")
def cfg():
    return small_config()


@pytest.fixture(scope="module")
def short_cfg():
    """Episodes of 8 bars: a few hundred steps cross many episode ends."""
    return small_config(episode_length=8)


@pytest.fixture(scope="module")
def market(cfg):
    return load_splits(cfg)["train"]


@pytest.fixture(scope="module")
def tables(cfg, market):
    return build_tables(market, cfg)


@pytest.fixture(scope="module")
def tiny_market():
    """130 bars: after the 100-bar feature warm-up an episode lasts at most ~30 bars before the data end."""
    return generate_market(
        ["EURUSD", "XAUUSD", "SPX500"], ["forex", "commodities", "equity"], [0.07, 0.15, 0.17], 130, 1
    )


def rollout_single(env, seed: int, steps: int, action_seed: int = 0):
    """Observations and rewards of `steps` random actions after `reset(seed=seed)`, resetting at episode ends."""
    rng = np.random.default_rng(action_seed)
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    for _ in range(steps):
        action = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
        obs, reward, terminated, truncated, _ = env.step(action)
        observations.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            obs, _ = env.reset()
            observations.append(obs)
    return observations, rewards


def flat(obs) -> np.ndarray:
    """An observation (array or dict of arrays) as one float array, for exact comparisons."""
    if isinstance(obs, dict):
        return np.concatenate([np.asarray(obs[k]).ravel() for k in sorted(obs)])
    return np.asarray(obs).ravel()


# ---------------------------------------------------------------------------------------------
# Registration and the Gymnasium checker
# ---------------------------------------------------------------------------------------------


def test_ids_are_registered_once():
    assert "MTQ/Specialist-v0" in gym.registry and "MTQ/Portfolio-v0" in gym.registry
    assert gym.spec("MTQ/Portfolio-v0").vector_entry_point == "mtq_common.envs.gym_env:make_portfolio_vec"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Gymnasium warns when an id is registered again
        importlib.reload(mtq_common)


@pytest.mark.parametrize("env_id", ["MTQ/Specialist-v0", "MTQ/Portfolio-v0"])
def test_check_env_passes(env_id, cfg, market):
    env = gym.make(env_id, config=cfg, market=market)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, skip_render_check=True)
    # Float-precision notes ("equal although similar", dtype precision) are acceptable; anything else is not.
    serious = [str(w.message) for w in caught if not any(ok in str(w.message) for ok in ("similar", "precision"))]
    assert not serious, serious


def test_make_with_built_in_defaults():
    env = gym.make("MTQ/Specialist-v0", instrument="XAUUSD")
    obs, info = env.reset(seed=0)
    assert isinstance(env.unwrapped, SpecialistSingleEnv) and env.unwrapped.instrument == "XAUUSD"
    assert obs.dtype == np.float32 and obs in env.observation_space and info == {}


def test_make_vec_returns_the_native_batched_env(cfg, market):
    envs = gym.make_vec(
        "MTQ/Portfolio-v0", num_envs=8, vectorization_mode="vector_entry_point", config=cfg, market=market
    )
    assert isinstance(envs, PortfolioEnv) and envs.num_envs == 8
    assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    n = market.num_instruments
    obs, _ = envs.reset(seed=0)
    assert obs["instruments"].shape[:2] == (8, n)
    envs.action_space.seed(0)
    obs, reward, terminated, truncated, info = envs.step(envs.action_space.sample())
    assert isinstance(reward, np.ndarray) and reward.shape == (8,) and np.isfinite(reward).all()
    assert terminated.dtype == bool and truncated.shape == (8,)
    assert obs in envs.observation_space and info["executed_weights"].shape == (8, n)


def test_specialist_vec_rows_cycle_over_the_instruments(cfg, market, tables):
    envs = gym.make_vec("MTQ/Specialist-v0", num_envs=11, config=cfg, market=market, tables=tables)
    assert isinstance(envs, SpecialistEnv) and envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    obs, _ = envs.reset(seed=0)
    onehot = obs[:, F : F + market.num_instruments]  # the instrument one-hot follows the features
    np.testing.assert_array_equal(onehot.argmax(-1), np.arange(11) % market.num_instruments)


# ---------------------------------------------------------------------------------------------
# Seeding: the same seed gives the same trajectory
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ADAPTERS)
def test_adapter_same_seed_same_trajectory(kind, short_cfg, market):
    make = ADAPTERS[kind]
    # different construction seeds: only reset(seed=...) decides the trajectory
    obs_a, rew_a = rollout_single(make(config=short_cfg, market=market, seed=1), seed=42, steps=20)
    obs_b, rew_b = rollout_single(make(config=short_cfg, market=market, seed=2), seed=42, steps=20)
    obs_c, _ = rollout_single(make(config=short_cfg, market=market, seed=1), seed=43, steps=20)
    assert len(obs_a) == len(obs_b) > 21  # 20 steps plus a reset at every 8-bar episode end
    for a, b in zip(obs_a, obs_b, strict=True):
        np.testing.assert_array_equal(flat(a), flat(b))
    assert rew_a == rew_b
    assert not np.array_equal(flat(obs_a[0]), flat(obs_c[0]))


@pytest.mark.parametrize("torch_mode", [False, True])
@pytest.mark.parametrize("make_vec", [make_specialist_vec, make_portfolio_vec])
def test_batched_same_seed_same_trajectory(make_vec, torch_mode, short_cfg, market, tables):
    def rollout(seed):
        envs = make_vec(8, config=short_cfg, market=market, seed=seed, torch_mode=torch_mode, tables=tables)
        generator = torch.Generator().manual_seed(0)
        obs, _ = envs.reset(seed=42)
        out = [flat(obs)]
        for _ in range(20):  # crosses two 8-bar episode ends: autoreset draws are seeded too
            actions = torch.rand(envs.action_space.shape, generator=generator) * 2 - 1
            obs, reward, *_ = envs.step(actions if torch_mode else actions.numpy())
            if torch_mode:
                assert isinstance(reward, torch.Tensor)
                obs = {k: v.numpy() for k, v in obs.items()} if isinstance(obs, dict) else obs.numpy()
                reward = reward.numpy()
            out += [flat(obs), np.asarray(reward)]
        return out

    first, second = rollout(seed=1), rollout(seed=2)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Spaces and types
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ADAPTERS)
def test_adapter_observations_stay_in_space_with_plain_types(kind, short_cfg, market):
    env = ADAPTERS[kind](config=short_cfg, market=market, seed=0)
    env.action_space.seed(0)
    obs, _ = env.reset(seed=0)
    for _ in range(300):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert obs in env.observation_space
        assert all(v.dtype == np.float32 for v in (obs.values() if isinstance(obs, dict) else [obs]))
        assert type(reward) is float and type(terminated) is bool and type(truncated) is bool
        assert not any(k.startswith("_") for k in info) and "final_obs" not in info
        assert type(info["equity"]) is float
        if truncated:
            assert info["episode"]["l"] == 8
            obs, _ = env.reset()
            assert obs in env.observation_space


@pytest.mark.parametrize("make_vec", [make_specialist_vec, make_portfolio_vec])
def test_batched_observations_stay_in_space(make_vec, short_cfg, market, tables):
    envs = make_vec(16, config=short_cfg, market=market, seed=0, tables=tables)
    envs.action_space.seed(0)
    obs, _ = envs.reset(seed=0)
    assert obs in envs.observation_space
    for _ in range(200):
        obs, _, _, _, info = envs.step(envs.action_space.sample())
        assert obs in envs.observation_space
        assert info["final_obs"] in envs.observation_space


# ---------------------------------------------------------------------------------------------
# The adapter does not autoreset: it truncates at the data end with the final observation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ADAPTERS)
def test_adapter_truncates_at_the_data_end_with_the_final_observation(kind, tiny_market):
    cfg = Config()
    cfg.environment.episode_length = 10_000  # only the data end can end an episode
    env = ADAPTERS[kind](config=cfg, market=tiny_market, seed=0)
    last_features = np.asarray(compute_features(tiny_market.prices)[-1], np.float32)  # [N, F] at the data's last bar
    obs, _ = env.reset(seed=3)
    truncated, steps = False, 0
    while not truncated and steps < tiny_market.num_bars:
        obs, _, terminated, truncated, info = env.step(np.full(env.action_space.shape, 0.5, np.float32))
        steps += 1
        assert terminated is False
    assert truncated is True and info["episode"]["l"] == steps
    assert steps <= tiny_market.num_bars - 100  # the features' warm-up comes first
    # The returned observation is the last bar's, not the first bar of a new (auto-reset) episode.
    if kind == "specialist":
        np.testing.assert_array_equal(obs[:F], last_features[0])
    else:
        np.testing.assert_array_equal(obs["instruments"][:, :F], last_features)
    obs, _ = env.reset()
    assert obs in env.observation_space
