"""Curriculum learning for Phase 3 (DESIGN section 7): difficulty levels, the level rule, the markets.

Levels (``LEVELS``; synthetic data). Each level is harder than the one before on every knob of
`mtq_common.data.synthetic.Difficulty` (crash probability: never lower):

    level  vol_multiplier  crash_prob  signal_to_noise  cost_multiplier  drift/noise (x plain)
    0      0.75            0.000       1.5              0.5              2.0    calm, clear signal, cheap
    1      1.00            0.000       1.0              1.0              1.0    the plain market (PLAIN_LEVEL)
    2      1.25            0.002       0.8              1.25             0.64   stress: ~1 crash in 2 years
    3      1.50            0.005       0.6              1.5              0.4    stress: ~1.3 crashes a year

The last column is ``signal_to_noise / vol_multiplier``, the latent drift relative to the noise. A crash
is a market-wide shock of 6 daily volatilities (`mtq_common.data.synthetic.CRASH_SIGMAS`).

The plain market (``Difficulty()``, level ``PLAIN_LEVEL`` = 1) is what validation and test use, so it is
the target: a disabled curriculum trains on it, and the curriculum starts one level below it. Levels 2
and 3 are *stress* levels, harder than the target (more noise, crashes, a weaker signal and higher
costs), reached only while the plain-market validation Sharpe keeps clearing the threshold; they train
robustness. Phase 3 keeps the checkpoint with the best plain validation Sharpe, so training at a stress
level cannot make the saved model worse than the best one validated. The plain market cannot be the last
level: its crash probability is 0, so no harder level before it could add crashes.

The rule (`Curriculum`): each validation portfolio Sharpe is recorded at the current level; once at least
``min_evaluations`` were made at this level, the mean of the last ``window`` of them (fewer while fewer
exist) is compared with the thresholds: at or above ``threshold`` the curriculum advances exactly one
level; below ``demote_threshold`` it steps back one level, but never more than one below the highest
level reached. A level change starts a fresh record, so a level is never skipped. The level depends on
the evaluations only (not on the step count), and `Curriculum.state_dict` holds all of it, so a resumed
run continues at the same level with the same record.

Scenarios (`generate_scenario`): on synthetic data a fresh training path generated at the level's
difficulty; on CSV data the calmer windows of the training split (see `generate_scenario`). Validation
and test are never touched.
"""

from __future__ import annotations

import math

import numpy as np

from mtq_common.data.features import FEATURE_WINDOW
from mtq_common.data.market import MarketData
from mtq_common.data.splits import financed, load_splits
from mtq_common.data.synthetic import Difficulty, config_options, generate_market

LEVELS: tuple[Difficulty, ...] = (
    Difficulty(vol_multiplier=0.75, crash_prob=0.0, signal_to_noise=1.5, cost_multiplier=0.5),
    Difficulty(),  # the plain market: validation and test
    Difficulty(vol_multiplier=1.25, crash_prob=0.002, signal_to_noise=0.8, cost_multiplier=1.25),
    Difficulty(vol_multiplier=1.5, crash_prob=0.005, signal_to_noise=0.6, cost_multiplier=1.5),
)
"""Difficulty levels, easiest first (see the module docstring's table)."""

PLAIN_LEVEL = 1
"""The level whose market is the plain one (``Difficulty()``): what validation, test and a disabled curriculum use."""

_SCENARIO_STREAM = 7_000_001  # keeps scenario seeds apart from any plain market seed


DEMOTE_THRESHOLD: float = -0.5
"""Rolling validation Sharpe below which the level steps back one (the module docstring); an advance threshold
must lie above it."""


class Curriculum:
    """The current difficulty level, moved by validation portfolio Sharpe (rules in the module docstring).

    Args:
        num_levels: levels used, ``LEVELS[:num_levels]`` (2 to ``len(LEVELS)``).
        threshold: rolling validation Sharpe at or above which the level advances one step.
        window: evaluations in the rolling mean.
        min_evaluations: evaluations needed at a level before it may change.
        demote_threshold: rolling validation Sharpe below which the level steps back one (must be below
            `threshold`).
        enabled: when False the level is always ``PLAIN_LEVEL`` (the plain market) and nothing is recorded.
    """

    def __init__(
        self,
        num_levels: int = len(LEVELS),
        threshold: float = 1.0,
        window: int = 3,
        min_evaluations: int = 2,
        demote_threshold: float = DEMOTE_THRESHOLD,
        enabled: bool = True,
    ):
        if not 2 <= num_levels <= len(LEVELS):
            raise ValueError(f"num_levels must be 2 to {len(LEVELS)}, got {num_levels}")
        if window < 1 or min_evaluations < 1:
            raise ValueError(f"window and min_evaluations must be >= 1, got {window} and {min_evaluations}")
        if not demote_threshold < threshold:
            raise ValueError(f"demote_threshold ({demote_threshold}) must be below threshold ({threshold})")
        self.num_levels, self.threshold, self.demote_threshold = num_levels, float(threshold), float(demote_threshold)
        self.window, self.min_evaluations, self.enabled = window, min_evaluations, enabled
        self.level = 0
        self.highest = 0
        self.recent: list[float] = []
        """The last `window` validation Sharpes at the current level."""
        self.evaluations = 0
        """Evaluations made at the current level."""

    def get_difficulty_level(self, step: int | None = None) -> int:
        """The current level (``PLAIN_LEVEL`` when disabled).

        `step` (the global step) is accepted for the signature of DESIGN section 7 and ignored: the level moves only
        in `update_curriculum`, so it is the same however a run was split across resumes.
        """
        return self.level if self.enabled else PLAIN_LEVEL

    def update_curriculum(self, metrics: dict) -> int:
        """Record ``metrics["val_sharpe"]`` (validation portfolio Sharpe) and return the level after it."""
        if not self.enabled:
            return PLAIN_LEVEL
        if "val_sharpe" not in metrics:
            raise KeyError(f"update_curriculum needs metrics['val_sharpe'], got keys {sorted(metrics)}")
        value = float(metrics["val_sharpe"])
        if not math.isfinite(value):
            raise ValueError(f"validation Sharpe must be finite, got {value}")
        self.recent = [*self.recent, value][-self.window :]
        self.evaluations += 1
        if self.evaluations >= self.min_evaluations:
            mean = sum(self.recent) / len(self.recent)
            if mean >= self.threshold and self.level < self.num_levels - 1:
                self._move_to(self.level + 1)
            elif mean < self.demote_threshold and self.level > 0 and self.level == self.highest:
                self._move_to(self.level - 1)  # level == highest: at most one below the highest reached
        return self.level

    def _move_to(self, level: int) -> None:
        self.level = level
        self.highest = max(self.highest, level)
        self.recent, self.evaluations = [], 0

    def state_dict(self) -> dict:
        """The level and its record as plain Python values (for checkpoints)."""
        return {
            "level": self.level,
            "highest": self.highest,
            "recent": list(self.recent),
            "evaluations": self.evaluations,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`."""
        level, highest = int(state["level"]), int(state["highest"])
        if not 0 <= level <= highest < self.num_levels or level < highest - 1:
            raise ValueError(
                f"curriculum state level {level} / highest {highest} is invalid for {self.num_levels} levels"
            )
        self.level, self.highest = level, highest
        self.recent = [float(v) for v in state["recent"]][-self.window :]
        self.evaluations = int(state["evaluations"])


def generate_scenario(level: int, cfg, seed: int | None = None, num_levels: int = len(LEVELS)) -> MarketData:
    """The training market (split ``"train"``) of curriculum `level` for `cfg` (a `Config`).

    Synthetic data (``cfg.data.source == "synthetic"``): `generate_market` with ``LEVELS[level]``, the
    instruments, sectors, volatilities, signals, drift settings and ``train_bars`` that
    `synthetic_splits` uses, and a seed derived from ``cfg.data.synthetic.seed``, the level and `seed`
    (when given): each level is a different path, the same one on every call. The market's
    ``cost_multiplier`` is the level's.

    CSV data: the training split of `load_splits` is cut into consecutive windows of
    ``cfg.environment.episode_length`` bars (a trailing remainder shorter than a window is dropped), the
    windows are ranked by realised volatility (std of the bar returns inside the window, mean over the
    instruments), and level ``l`` keeps the calmest ``ceil((l + 1) / num_levels)`` fraction of them (at
    least enough for one feature window plus one episode). The kept windows, in time order, are
    chain-linked into one path: each window's prices are rescaled so that it starts at the close where
    the previous one ended. Approximation: the price return of each junction bar is 0 (the real jump between
    two windows is dropped) and features computed across a junction mix the two windows; bars keep their
    own timestamps, so time has gaps. The last level holds every window. Real data has no cost knob:
    ``cost_multiplier`` stays 1 and `seed` is unused.
    """
    if not 0 <= level < num_levels <= len(LEVELS):
        raise ValueError(f"level must be 0 to {num_levels - 1} (num_levels {num_levels}), got {level}")
    if cfg.data.source == "csv":
        return _csv_scenario(load_splits(cfg)["train"], level, num_levels, cfg.environment.episode_length)
    symbols = list(cfg.data.instruments)
    s = cfg.data.synthetic
    entropy = [s.seed, _SCENARIO_STREAM, level] + ([] if seed is None else [seed])
    market = generate_market(
        symbols,
        [cfg.sector_of(sym) for sym in symbols],
        [cfg.instruments[sym].annual_vol for sym in symbols],
        s.train_bars,
        seed=int(np.random.SeedSequence(entropy).generate_state(1)[0]),
        split="train",
        difficulty=LEVELS[level],
        **config_options(cfg, symbols),
    )
    return financed(market, cfg)


def window_volatility(prices: np.ndarray, length: int) -> np.ndarray:
    """Realised volatility of each consecutive `length`-bar window of ``prices [T, N]``: ``[T // length]``.

    The std of the simple returns inside the window (the return into its first bar is excluded), averaged
    over the instruments.
    """
    n_windows = prices.shape[0] // length
    windows = prices[: n_windows * length].reshape(n_windows, length, prices.shape[1])
    returns = windows[:, 1:] / windows[:, :-1] - 1.0
    return returns.std(axis=1).mean(axis=1)


def _csv_scenario(train: MarketData, level: int, num_levels: int, episode_length: int) -> MarketData:
    """The calmer windows of a real training split, chain-linked (see `generate_scenario`)."""
    length = max(2, min(episode_length, train.num_bars))
    vols = window_volatility(train.prices, length)
    n_windows = len(vols)
    wanted = math.ceil((level + 1) / num_levels * n_windows)
    floor = math.ceil((FEATURE_WINDOW + length) / length)  # one feature window plus one episode
    keep = np.sort(np.argsort(vols, kind="stable")[: min(n_windows, max(wanted, floor))])

    prices, timestamps, last = [], [], None
    for w in keep:
        window = train.prices[w * length : (w + 1) * length]
        if last is not None:
            window = window * (last / window[0])
            window[0] = last  # exactly: the junction bar's price return is 0
        prices.append(window)
        timestamps.append(train.timestamps[w * length : (w + 1) * length])
        last = window[-1]
    return MarketData(
        symbols=list(train.symbols),
        sectors=list(train.sectors),
        prices=np.concatenate(prices),
        timestamps=np.concatenate(timestamps),
        bars_per_year=train.bars_per_year,
        bars_per_day=train.bars_per_day,
        source=train.source,
        split="train",
        cost_multiplier=train.cost_multiplier,
        financing=train.financing,
    )
