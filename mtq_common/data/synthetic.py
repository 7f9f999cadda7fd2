"""The built-in synthetic market: correlated daily price paths with regimes, fat tails and a latent drift.

Model, per bar t and instrument i (daily bars, 252 a year):

    log_return[t, i] = drift[t-1, i] + sigma_i * m(regime[t]) * v * eps[t, i] + crash[t] * shock_i

* ``sigma_i``: the instrument's daily volatility, ``annual_vol / sqrt(252)`` (EURUSD 7%, GBPUSD 8%,
  USDJPY 8%, XAUUSD 15%, WTIUSD 35%, SPX500 17%, NAS100 22%, US30 16%).
* ``regime``: a three-state Markov chain (calm / volatile / crisis, ``TRANSITIONS``) with volatility
  multipliers ``REGIME_VOL`` normalised so that the long-run volatility equals ``annual_vol``.
* ``eps``: Student-t(5) noise scaled to unit variance (fat tails), correlated across instruments
  through the Cholesky factor of a block correlation matrix (``correlation_matrix``): EURUSD/GBPUSD
  0.7, USDJPY -0.3 to both, the three indices 0.85-0.95 with each other, gold and oil 0.2, equity and
  oil 0.3, everything else 0.1 within a sector and 0.05 across sectors.
* ``drift``: a latent AR(1) process per instrument, independent across instruments, with half-life
  ``drift_half_life`` bars (60) and a stationary standard deviation of ``drift_scale`` (3.0) times
  the volatility, both annualised: per bar ``drift_scale * annual_vol / 252``. Past returns reveal
  it only partially (per bar it is about 0.19 of the noise). It is exposed as ``MarketData.drift``
  for evaluation only (the oracle baseline) and never enters an observation.
* ``driver`` (optional, 0 by default: the built-in market has none): a loading ``b_i`` in [0, 1] on one
  common driver, a latent instrument of its own (AR(1) drift and Student-t noise of the same form, drawn
  after everything above, so the other draws are unchanged). The instrument's noise and drift become
  ``sqrt(1 - b_i^2) * own + b_i * driver``, each in units of its own volatility and drift std, so its
  volatility and its drift's size stay as configured: two instruments with loadings ``b_i, b_j`` share
  ``b_i * b_j`` of their drift's and their noise's variance (correlation about ``b_i b_j`` beyond the
  table's): they carry one bet, whatever their sectors.
* ``crash``: with probability ``crash_prob`` per bar (0 by default) every instrument takes a shock of
  ``-CRASH_SIGMAS`` of its daily volatility times its sector's crash beta.
* ``Difficulty`` (the curriculum's knob) multiplies the noise volatility (``vol_multiplier``), the
  drift (``signal_to_noise``), sets ``crash_prob`` and scales transaction costs (``cost_multiplier``).

Train, validation and test are three independent random streams of the market seed (fresh paths), so
a policy cannot memorise its test set. Measured Sharpe ratios on the default settings (cost 0.003
per unit of turnover; `python -m benchmarks.market_calibration`) are in the README.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtq_common.data.market import MarketData

BARS_PER_YEAR = 252.0
SPLITS = ("train", "val", "test")
START_DATE = "1900-01-01"
"""Calendar labels only: business days from here, validation after train, test after validation."""

TRANSITIONS = np.array(
    [
        [0.985, 0.012, 0.003],  # calm: lasts ~65 bars on average
        [0.030, 0.960, 0.010],  # volatile
        [0.020, 0.060, 0.920],  # crisis: lasts ~12 bars
    ]
)
REGIME_VOL = np.array([0.75, 1.25, 2.5])
STUDENT_T_DOF = 5.0
CRASH_SIGMAS = 6.0
CRASH_BETA = {"equity": 1.0, "commodities": 0.7, "forex": 0.3}
"""Sector exposure to a crash shock; a sector not listed gets 0.5."""

# Pairwise correlations of the built-in symbols; other pairs fall back to the sector rule.
_PAIR_CORRELATION = {
    ("EURUSD", "GBPUSD"): 0.7,
    ("EURUSD", "USDJPY"): -0.3,
    ("GBPUSD", "USDJPY"): -0.3,
    ("XAUUSD", "WTIUSD"): 0.2,
    ("EURUSD", "XAUUSD"): 0.25,
    ("SPX500", "NAS100"): 0.9,
    ("SPX500", "US30"): 0.95,
    ("NAS100", "US30"): 0.85,
    ("WTIUSD", "SPX500"): 0.3,
    ("WTIUSD", "NAS100"): 0.25,
    ("WTIUSD", "US30"): 0.3,
}
SAME_SECTOR_CORRELATION = 0.1
CROSS_SECTOR_CORRELATION = 0.05


@dataclass(frozen=True)
class Difficulty:
    """A market's difficulty (the curriculum's knob); the defaults are the plain market."""

    vol_multiplier: float = 1.0
    """Multiplies the noise volatility."""
    crash_prob: float = 0.0
    """Probability per bar of a market-wide crash shock."""
    signal_to_noise: float = 1.0
    """Multiplies the latent drift (1 = the configured drift_scale)."""
    cost_multiplier: float = 1.0
    """Scales the transaction cost the environments charge on this market."""


def correlation_matrix(symbols: list[str], sectors: list[str]) -> np.ndarray:
    """The block correlation matrix of `symbols`, made positive definite if the pairs are not."""
    n = len(symbols)
    corr = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            pair = _PAIR_CORRELATION.get((symbols[i], symbols[j]), _PAIR_CORRELATION.get((symbols[j], symbols[i])))
            if pair is None:
                pair = SAME_SECTOR_CORRELATION if sectors[i] == sectors[j] else CROSS_SECTOR_CORRELATION
            corr[i, j] = corr[j, i] = pair
    # User-added symbols can make the table indefinite: clip eigenvalues and renormalise the diagonal.
    vals, vecs = np.linalg.eigh(corr)
    if vals.min() < 1e-6:
        corr = (vecs * np.maximum(vals, 1e-6)) @ vecs.T
        d = np.sqrt(np.diag(corr))
        corr = corr / d[:, None] / d[None, :]
    return corr


def _stationary(transitions: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eig(transitions.T)
    pi = np.real(vecs[:, np.argmin(np.abs(vals - 1.0))])
    return pi / pi.sum()


def _markov_chain(rng: np.random.Generator, n_bars: int) -> np.ndarray:
    """Regime path; sequential by nature, but one cheap comparison per bar."""
    cumulative = np.cumsum(TRANSITIONS, axis=1)
    u = rng.random(n_bars)
    state = int(rng.choice(3, p=_stationary(TRANSITIONS)))
    out = np.empty(n_bars, dtype=np.int64)
    for t in range(n_bars):
        state = int(np.searchsorted(cumulative[state], u[t]))
        out[t] = state
    return out


def _ar1(noise: np.ndarray, phi: float, x0: np.ndarray) -> np.ndarray:
    """x[t] = phi * x[t-1] + noise[t], in blocks: within a block it is a scaled cumulative sum.

    The block length keeps phi**-L below 16, so the scaled cumulative sum stays well conditioned.
    """
    n_bars = noise.shape[0]
    block = int(max(1, min(512, np.floor(np.log(16.0) / -np.log(phi))))) if phi < 1 else 512
    powers = phi ** np.arange(1, block + 1)  # phi^(j+1), j = 0..L-1
    out = np.empty_like(noise)
    prev = x0
    for start in range(0, n_bars, block):
        e = noise[start : start + block]
        p = powers[: len(e), None]
        out[start : start + block] = p * (prev[None, :] + np.cumsum(e / p, axis=0))
        prev = out[start + len(e) - 1]
    return out


def generate_market(
    symbols: list[str],
    sectors: list[str],
    annual_vols: list[float],
    n_bars: int,
    seed: int,
    split: str = "train",
    drift_half_life: float = 60.0,
    drift_scale: float = 3.0,
    difficulty: Difficulty | None = None,
    start_date: str = START_DATE,
    signal: list[float] | None = None,
    driver: list[float] | None = None,
) -> MarketData:
    """One split of the synthetic market; the same arguments always give the same data.

    `signal` multiplies each instrument's latent drift (default 1 for all; 0 makes pure noise). `driver` is each
    instrument's loading in [0, 1] on one common driver (module docstring; default 0 for all: none).
    """
    difficulty = difficulty or Difficulty()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # One independent stream per (seed, split): fresh paths for validation and test.
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split)]))
    n = len(symbols)
    sigma = np.asarray(annual_vols, dtype=np.float64) / np.sqrt(BARS_PER_YEAR)

    regime = _markov_chain(rng, n_bars)
    vol_mult = REGIME_VOL / np.sqrt(_stationary(TRANSITIONS) @ REGIME_VOL**2)  # long-run vol = annual_vol

    t_noise = rng.standard_t(STUDENT_T_DOF, size=(n_bars, n)) / np.sqrt(STUDENT_T_DOF / (STUDENT_T_DOF - 2.0))
    eps = t_noise @ np.linalg.cholesky(correlation_matrix(symbols, sectors)).T
    noise = sigma[None, :] * vol_mult[regime][:, None] * difficulty.vol_multiplier * eps

    phi = 0.5 ** (1.0 / drift_half_life)
    signal_scale = np.ones(n) if signal is None else np.asarray(signal, dtype=np.float64)
    drift_std = difficulty.signal_to_noise * drift_scale * signal_scale * np.asarray(annual_vols) / BARS_PER_YEAR
    innovations = rng.standard_normal((n_bars, n)) * drift_std * np.sqrt(1.0 - phi**2)
    drift = _ar1(innovations, phi, x0=rng.standard_normal(n) * drift_std)

    crashes = rng.random(n_bars) < difficulty.crash_prob
    beta = np.array([CRASH_BETA.get(s, 0.5) for s in sectors])
    shock = -CRASH_SIGMAS * sigma * beta

    if driver is not None and np.any(driver):  # (drawn last: a market without one is bit-identical)
        b = np.asarray(driver, dtype=np.float64)
        if np.any((b < 0) | (b > 1)):
            raise ValueError(f"driver loadings must be in [0, 1], got {list(driver)}")
        common_eps = rng.standard_t(STUDENT_T_DOF, size=n_bars) / np.sqrt(STUDENT_T_DOF / (STUDENT_T_DOF - 2.0))
        unit = rng.standard_normal((n_bars, 1)) * np.sqrt(1.0 - phi**2)
        common_drift = _ar1(unit, phi, x0=rng.standard_normal(1))[:, 0]  # stationary std 1
        own = np.sqrt(1.0 - b**2)
        noise = own * noise + b * sigma * (vol_mult[regime] * difficulty.vol_multiplier * common_eps)[:, None]
        drift = own * drift + b * drift_std * common_drift[:, None]

    log_ret = np.zeros((n_bars, n))
    log_ret[1:] = drift[:-1] + noise[1:] + crashes[1:, None] * shock[None, :]
    prices = 100.0 * np.exp(np.cumsum(log_ret, axis=0))
    timestamps = np.busday_offset(np.datetime64(start_date, "D"), np.arange(n_bars), roll="forward")
    return MarketData(
        symbols=list(symbols),
        sectors=list(sectors),
        prices=prices,
        timestamps=timestamps,
        bars_per_year=BARS_PER_YEAR,
        bars_per_day=1.0,
        source="synthetic",
        split=split,
        regime=regime,
        drift=drift,
        cost_multiplier=difficulty.cost_multiplier,
    )


def config_options(cfg, symbols: list[str]) -> dict:
    """`generate_market`'s keyword options that the config sets for `symbols`: the drift's half-life and scale,
    and each instrument's `signal` and `driver` (one place for every market the config describes)."""
    s = cfg.data.synthetic
    return {"drift_half_life": s.drift_half_life, "drift_scale": s.drift_scale,
            "signal": [cfg.instruments[x].signal for x in symbols],
            "driver": [cfg.instruments[x].driver for x in symbols]}  # fmt: skip


def synthetic_splits(cfg, difficulty: Difficulty | None = None) -> dict[str, MarketData]:
    """Train, validation and test markets for `cfg` (a `mtq_common.training.config.Config`)."""
    symbols = cfg.data.instruments
    s = cfg.data.synthetic
    out: dict[str, MarketData] = {}
    start = np.datetime64(START_DATE, "D")
    for split, n_bars in zip(SPLITS, (s.train_bars, s.val_bars, s.test_bars), strict=True):
        out[split] = generate_market(
            symbols,
            [cfg.sector_of(sym) for sym in symbols],
            [cfg.instruments[sym].annual_vol for sym in symbols],
            n_bars,
            seed=s.seed,
            split=split,
            difficulty=difficulty,
            start_date=str(start),
            **config_options(cfg, symbols),
        )
        start = np.busday_offset(out[split].timestamps[-1], 1, roll="forward")
    return out
