"""Shared pieces of the test suite: a tiny config, tiny Phase 1 and 2 outputs, a TensorBoard reader, in-process CLI."""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from kernels import RiskLimits
from mtq_common.agents.hierarchy import meta_observation_size
from mtq_common.agents.nets import MetaController, SpecialistAgents
from mtq_common.data.synthetic import generate_market
from mtq_common.data.tables import build_tables
from mtq_common.envs.portfolio_env import PortfolioEnv
from mtq_common.envs.trading_env import SpecialistEnv, instrument_obs_size, position_column
from mtq_common.training.config import Config, default_instruments

REPO = Path(__file__).resolve().parent.parent
# the smallest PPO shapes the phase scripts accept (test budgets)
SMALL = {"num_envs": 8, "num_steps": 32, "minibatch_size": 64, "n_epochs": 2, "eval_segments": 16}

TINY = {
    "environment": {"episode_length": 200},
    "data": {"synthetic": {"train_bars": 1500, "val_bars": 700, "test_bars": 700}},
}


def write_config(path: Path, overrides: dict | None = None) -> Path:
    """A YAML config with small synthetic splits (fast to build) plus `overrides` (merged per section)."""
    config = {section: dict(values) for section, values in TINY.items()}
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            merged = dict(config[section])
            for key, value in values.items():
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
            config[section] = merged
        else:
            config[section] = values
    path.write_text(yaml.safe_dump(config))
    return path


def signal_config(path: Path, signals: dict[str, float]) -> Path:
    """The built-in instruments, each with the latent drift `signals[its sector]` (0: pure noise), no sector
    limit, 4,000 training and 2,000 validation bars: the planted markets of the learning tests."""
    specs = default_instruments()
    instruments = {s: {"sector": spec.sector, "signal": signals[spec.sector]} for s, spec in specs.items()}
    overrides = {
        "environment": {"max_sector_allocation": 1.0},
        "instruments": instruments,
        "data": {"synthetic": {"train_bars": 4000, "val_bars": 2000}},
    }
    return write_config(path, overrides)


def prepare(tmp: Path, config: Path | None, p1: dict | None = None, p2: dict | None = None) -> tuple[Path, Path]:
    """Phase 1 and Phase 2 outputs for `config` (tiny budgets unless given)."""
    import phase1_ppo
    import phase2_meta

    common = dict(config=None if config is None else str(config), device="cpu", progress=False)
    phase1_ppo.main(phase1_ppo.Args(output_dir=str(tmp / "p1"), log_dir=str(tmp / "l1"),
                                    **common, **{**SMALL, "timesteps": 512, **(p1 or {})}))  # fmt: skip
    phase2_meta.main(phase2_meta.Args(output_dir=str(tmp / "p2"), log_dir=str(tmp / "l2"),
                                      specialists_dir=str(tmp / "p1"), **common,
                                      **{**SMALL, "timesteps": 512, **(p2 or {})}))  # fmt: skip
    return tmp / "p1", tmp / "p2"


def tight_config():
    """Small synthetic splits (600 bars) and limits tight enough that the risk manager has work to do."""
    from mtq_common.training.config import Config

    cfg = Config()
    for key in ("train_bars", "val_bars", "test_bars"):
        setattr(cfg.data.synthetic, key, 600)
    cfg.environment.max_portfolio_var = 0.004
    cfg.environment.max_sector_allocation = 0.35
    cfg.environment.max_correlation_exposure = 0.5
    return cfg


def tensorboard_tags(log_dir: Path) -> set[str]:
    """Scalar tags in the event files of `log_dir`, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in Path(log_dir).glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def tensorboard_scalars(log_dir: Path, tag: str) -> list[float]:
    """Every value logged under `tag` in the event files of `log_dir`, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in Path(log_dir).glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return [v for _, v in sorted(values)]


def tensorboard_steps(log_dir: Path, tag: str) -> list[int]:
    """The steps logged under `tag` as TensorBoard shows them: the whole folder read as one run, so that a resumed
    writer's purge of later steps applies (`tensorboard_scalars` reads each file alone)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def run_cli(script: str, *args: str) -> tuple[int, str]:
    """`python script args` run in this process: the exit code and stderr of the script's `__main__` block.

    For the error paths: no interpreter and torch start-up per case (seconds each on the 2-core CI
    machine). The smoke tests still run every script as a real process.
    """
    argv, cwd, err = sys.argv, os.getcwd(), io.StringIO()
    sys.argv, code = [script, *args], 0
    os.chdir(REPO)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return code, err.getvalue()


# ---------------------------------------------------------------------------------------------
# The eight built-in instruments and an independent check of every risk limit
# ---------------------------------------------------------------------------------------------

SECTORS = ["forex", "forex", "forex", "commodities", "commodities", "equity", "equity", "equity"]
ONEHOT = torch.tensor([[s == k for k in ("forex", "commodities", "equity")] for s in SECTORS], dtype=torch.float32)


VOLS = [Config().instruments[s].annual_vol for s in Config().data.instruments]


@functools.lru_cache(maxsize=1)
def _cov_table() -> torch.Tensor:
    cfg = Config()
    return build_tables(generate_market(cfg.data.instruments, SECTORS, VOLS, 3000, 3), cfg).cov


def realistic_cov(batch: int = 1) -> torch.Tensor:
    """Covariances of the last `batch` bars of a synthetic market with the eight instruments."""
    return _cov_table()[-batch:]


def limits_hold(w, cov, limits: RiskLimits, onehot=ONEHOT):
    """Check every limit (DESIGN section 5) with an independent float64 numpy computation."""
    w, cov = w.double().numpy(), cov.double().numpy()
    onehot = onehot.double().numpy()
    b_max = w.shape[-1] * limits.max_position
    for b in range(len(w)):
        x = w[b]
        assert np.all(np.abs(x) <= limits.max_position * (1 + 1e-5))
        var = limits.var_scale * math.sqrt(max(x @ cov[b] @ x, 0.0))
        assert var <= limits.max_var * (1 + 1e-5)
        gross = np.abs(x).sum()
        if gross > 0:
            sigma = np.sqrt(np.diag(cov[b]))
            corr = cov[b] / np.outer(sigma, sigma)
            assert x @ corr @ x / (gross * b_max) <= limits.max_correlation * (1 + 1e-4)
            assert (np.abs(x) @ onehot / b_max).max() <= limits.max_sector * (1 + 1e-4)


def untrained_agents(market, cfg, tables=None, position_rate: float = 1.0,
                     start_rule: dict | None = None) -> tuple[SpecialistAgents, MetaController]:  # fmt: skip
    """Seeded, randomly initialised specialists (the actor head scaled up so that they trade real sizes; with
    `start_rule` as a residual over it) and a meta-controller at its starting point, sized for `market` (the
    evaluation and report tests' hierarchy)."""
    torch.manual_seed(0)
    n = market.num_instruments
    specialists = SpecialistAgents(cfg.specialists, instrument_obs_size(n), hidden=8, position_rate=position_rate,
                                   position_index=position_column(n), start_rule=start_rule)  # fmt: skip
    with torch.no_grad():
        specialists.actor[-1].weight.mul_(100.0)
    env = PortfolioEnv(market, cfg, 1, tables=tables if tables is not None else build_tables(market, cfg))
    meta = MetaController(meta_observation_size(env.portfolio_obs_size, len(cfg.specialists)), 3, hidden=8)
    return specialists, meta


def restarting_portfolio_pair(**second) -> tuple[PortfolioEnv, PortfolioEnv, torch.Generator]:
    """Two `PortfolioEnv`s of 16 rows on one 400-bar market with 7-bar episodes (many restarts), reset alike,
    the second built with `second` (e.g. ``compiled=True``), and a generator for the books they trade."""
    cfg = Config()
    cfg.environment.episode_length = 7
    market = generate_market(cfg.data.instruments, SECTORS, VOLS, 400, 9)
    envs = PortfolioEnv(market, cfg, 16, torch_mode=True, seed=3), PortfolioEnv(market, cfg, 16, torch_mode=True,
                                                                                seed=3, **second)  # fmt: skip
    for env in envs:
        env.reset(seed=3)
    return *envs, torch.Generator().manual_seed(0)


def restarting_specialist_pair(**both) -> tuple[SpecialistEnv, SpecialistEnv, torch.Generator]:
    """Two `SpecialistEnv`s of 16 rows (two per instrument) on one 400-bar market with 7-bar episodes (many
    restarts), reset alike, the second compiled; `both` go to each (e.g. ``next_return_diagnostic=True``)."""
    cfg = Config()
    cfg.environment.episode_length = 7
    market = generate_market(cfg.data.instruments, SECTORS, VOLS, 400, 9)
    rows = list(range(8)) * 2
    envs = (SpecialistEnv(market, cfg, rows, torch_mode=True, seed=3, **both),
            SpecialistEnv(market, cfg, rows, torch_mode=True, seed=3, compiled=True, **both))  # fmt: skip
    for env in envs:
        env.reset(seed=3)
    return *envs, torch.Generator().manual_seed(0)


def random_books(gen: torch.Generator) -> torch.Tensor:
    """Proposed weights for 16 rows of 8 instruments, within +-0.1."""
    return (torch.rand(16, 8, generator=gen) * 2 - 1) * 0.1


def check_sharpe_reward_switch(script, monkeypatch, run) -> dict:
    """Phases 2 and 3's reward switch: `run(name, **overrides)` trains `script` (a phase module) and returns its
    `metrics.json`. By default `meta_reward` gets the Sharpe increment of the start's training-split moments (stored
    as `sharpe_reward`) at every call, the env's and the twin's; with `sharpe_reward=False` it gets None. Returns the
    default run's metrics."""
    seen = []
    real = script.meta_reward

    def spy(reward, info, book, *rest):
        seen.append(book)
        return real(reward, info, book, *rest)

    monkeypatch.setattr(script, "meta_reward", spy)
    on = run("sharpe_on")
    book = on["sharpe_reward"]
    assert set(book) == {"mean", "second", "cash"} and book["second"] > book["mean"] ** 2
    assert seen and all(b is not None and b.as_dict() == book for b in seen)
    seen.clear()
    off = run("sharpe_off", sharpe_reward=False)
    assert off["sharpe_reward"] is None and seen and all(b is None for b in seen)
    return on


def every_iterate_above_momentum(script, monkeypatch) -> None:
    """Make `script`'s turnover check (`selection.turnover_against_momentum`) see the start at 1.0x momentum's
    turnover per unit of volatility (within it, so the gate is on) and every later validation above it."""
    start_within = iter([True])

    def above(ran, confidence, start_ratio=None):
        return {"ratio": 1.0, "low": 1.0, "high": 1.0, "within": next(start_within, False)}

    monkeypatch.setattr(script, "turnover_against_momentum", above)
