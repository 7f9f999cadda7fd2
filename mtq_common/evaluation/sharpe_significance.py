"""Whether a Sharpe ratio is more than luck, from its moments (numpy, float64; no scipy):

* ``probabilistic_sharpe_ratio`` (PSR): the probability that the true Sharpe exceeds a benchmark, from the
  observed Sharpe, its length, skewness and kurtosis (Bailey & Lopez de Prado, 2012).
* ``deflated_sharpe_ratio`` (DSR): the PSR against the Sharpe that the best of N tried configurations would
  reach by luck alone (Bailey & Lopez de Prado, 2014). Use it whenever the reported run was chosen among
  several (seeds, hyperparameters): the best of N is biased upwards.
* ``normal_cdf`` and its inverse ``normal_ppf``, to about machine precision, which both need.

The conventions (annualised Sharpe ratios in and out, ValueError on NaN or inf) are those of
``bootstrap.py``; PSR and DSR work on per-bar Sharpe ratios internally, as in the papers.

References: Bailey & Lopez de Prado (2012, 2014), as in ``bootstrap.py``; Acklam, P. J. (2003). An algorithm
for computing the inverse normal cumulative distribution function.
"""

from __future__ import annotations

import math

import numpy as np

from mtq_common.evaluation.bootstrap import annualised_sharpe, finite_series
from mtq_common.evaluation.metrics import _TOL

EULER_GAMMA = 0.5772156649015329
"""The Euler-Mascheroni constant (used by the expected maximum of N Gaussian draws)."""


# --- the standard normal distribution ---------------------------------------------------------------


# Acklam's rational approximation of the inverse normal CDF (relative error < 1.15e-9 before refinement).
_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
      -3.066479806614716e01, 2.506628277459239e00)  # fmt: skip
_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
      -1.328068155288572e01)  # fmt: skip
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
      4.374664141464968e00, 2.938163982698783e00)  # fmt: skip
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
_P_LOW = 0.02425


def _horner(coefficients, x: float) -> float:
    """The polynomial with ``coefficients`` (highest power first) at ``x``."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


def normal_cdf(x: float) -> float:
    """Standard normal CDF, ``Phi(x) = erfc(-x / sqrt(2)) / 2``.

    Why erfc rather than ``(1 + erf(x / sqrt(2))) / 2``: the same function, but without the cancellation that
    loses all relative precision in the lower tail (``1 + erf`` with ``erf`` near -1).
    """
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def normal_ppf(p: float) -> float:
    """Inverse standard normal CDF, ``Phi^-1(p)`` for ``0 < p < 1`` (-inf at 0, inf at 1).

    Acklam's (2003) rational approximation (tail and central regions, relative error < 1.15e-9), then one
    Halley step on ``Phi(x) - p``, which brings it to about machine precision; ``p > 0.5`` by symmetry.
    ``statistics.NormalDist().inv_cdf`` of the standard library is as accurate; the tests use it as reference.
    """
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"normal_ppf needs 0 <= p <= 1, got {p}")
    if p == 0.0:
        return -math.inf
    if p == 1.0:
        return math.inf
    if p > 0.5:
        # Symmetry: 1 - p is exact here (Sterbenz), and the Halley step below is accurate only where Phi(x) is
        # small: Phi(x) - p near p = 1 would cancel to the 1e-16 spacing of floats near 1.
        return -normal_ppf(1.0 - p)
    if p < _P_LOW:
        q = math.sqrt(-2.0 * math.log(p))
        x = _horner(_C, q) / (_horner(_D, q) * q + 1.0)
    else:
        q = p - 0.5
        x = _horner(_A, q * q) * q / (_horner(_B, q * q) * q * q + 1.0)
    # Halley step: u = (Phi(x) - p) / phi(x); x -= u / (1 + x u / 2).
    u = (normal_cdf(x) - p) * math.sqrt(2.0 * math.pi) * math.exp(0.5 * x * x)
    return x - u / (1.0 + 0.5 * x * u)


# --- probabilistic and deflated Sharpe ratios ---------------------------------------------------------------


def sample_moments(returns) -> tuple[float, float]:
    """``(skewness, kurtosis)`` of a 1-D series from population (ddof=0) central moments.

    ``skew = m3 / m2 ** 1.5``, ``kurt = m4 / m2 ** 2`` (NOT excess: 3 for a normal distribution), as in Bailey &
    Lopez de Prado. Why population moments: they are the moments of the empirical distribution, so they always
    satisfy ``kurt >= 1 + skew ** 2``, which keeps the PSR radicand non-negative. A constant series (std 0
    within 1e-15, the tolerance of ``metrics.sharpe``) or fewer than 2 bars has no shape: (0.0, 3.0), normal.
    """
    r = finite_series(returns, "returns")
    if r.shape[0] < 2:
        return 0.0, 3.0
    d = r - r.mean()
    m2 = float(np.mean(d * d))
    if math.sqrt(m2) <= _TOL:
        return 0.0, 3.0
    return float(np.mean(d**3)) / m2**1.5, float(np.mean(d**4)) / m2**2


def probabilistic_sharpe_from_summary(sharpe, n, bars_per_year, benchmark_sharpe=0.0, skew=0.0, kurtosis=3.0) -> float:
    """PSR from summary statistics: ``Phi((SR - SR*) * sqrt(n - 1) / sqrt(1 - skew SR + (kurt - 1) / 4 SR^2))``.

    Bailey & Lopez de Prado (2012), eq. for the PSR, where ``SR`` and ``SR*`` are PER-BAR Sharpe ratios and
    ``kurt`` is the (non-excess) kurtosis. Here ``sharpe`` and ``benchmark_sharpe`` are ANNUALISED and divided by
    ``sqrt(bars_per_year)`` first (pass ``bars_per_year=1`` to give per-bar values). ``n`` is the number of bars.
    Without the series, the defaults assume normal returns: ``skew = 0``, ``kurtosis = 3`` (then the radicand
    is Lo's (2002) i.i.d. normal variance factor ``1 + SR^2 / 2``); negative skew and fat tails widen the
    standard error and pull the PSR towards 0.5.

    Why: the probability that the true Sharpe exceeds ``SR*``, given estimation error that grows with skewness
    and kurtosis and shrinks with length, is a more honest summary than the Sharpe ratio alone.
    ``n < 2``: 0.5 (no evidence either way). ``kurtosis < 1 + skew ** 2`` is impossible for any distribution:
    ValueError. A radicand of 0 (reachable only at that bound, a two-point distribution) means a zero standard
    error; the limit is returned: 1.0, 0.0 or 0.5 for ``SR`` above, below or equal to ``SR*``.
    """
    values = {"sharpe": sharpe, "benchmark_sharpe": benchmark_sharpe, "skew": skew, "kurtosis": kurtosis}
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if kurtosis < (1.0 + skew * skew) * (1.0 - 1e-9):
        raise ValueError(f"kurtosis {kurtosis} < 1 + skew^2 = {1.0 + skew * skew}: no distribution has these moments")
    if n < 2:
        return 0.5
    scale = math.sqrt(bars_per_year)
    sr, sr_star = sharpe / scale, benchmark_sharpe / scale
    radicand = 1.0 - skew * sr + (kurtosis - 1.0) / 4.0 * sr * sr
    if radicand <= 0.0:
        return 1.0 if sr > sr_star else 0.0 if sr < sr_star else 0.5
    return normal_cdf((sr - sr_star) * math.sqrt(n - 1.0) / math.sqrt(radicand))


def probabilistic_sharpe_ratio(returns, benchmark_sharpe=0.0, *, bars_per_year, risk_free_rate=0.0) -> float:
    """Probabilistic Sharpe ratio (Bailey & Lopez de Prado, 2012) of a 1-D return series against a benchmark.

    ``PSR = Phi((SR - SR*) * sqrt(T - 1) / sqrt(1 - skew SR + (kurt - 1) / 4 SR^2))`` with ``SR`` the per-bar
    Sharpe ratio of the series (``metrics.sharpe / sqrt(bars_per_year)``, std with ddof=1), ``SR*`` the per-bar
    benchmark, and ``skew``, ``kurt`` from ``sample_moments`` (population moments, non-excess kurtosis).
    ``benchmark_sharpe`` is ANNUALISED (e.g. 1.0 for "better than an annual Sharpe of 1") and converted with
    ``sqrt(bars_per_year)``, which is why ``bars_per_year`` is required. See
    ``probabilistic_sharpe_from_summary`` for the formula's guards; NaN or inf: ValueError naming the index.
    """
    r = finite_series(returns, "returns")
    skew, kurtosis = sample_moments(r)
    sharpe = annualised_sharpe(r, bars_per_year, risk_free_rate)
    return probabilistic_sharpe_from_summary(sharpe, r.shape[0], bars_per_year, benchmark_sharpe, skew, kurtosis)


def expected_max_sharpe(trial_variance: float, num_trials: int) -> float:
    """Expected maximum Sharpe of ``num_trials`` independent trials whose true Sharpe is 0 (the "SR0" of the DSR).

    ``SR0 = sqrt(V) * ((1 - gamma) * Phi^-1(1 - 1/N) + gamma * Phi^-1(1 - 1/(N e)))`` (Bailey & Lopez de Prado,
    2014), ``gamma`` the Euler-Mascheroni constant, ``V`` the variance of the trials' Sharpe ratios; the result is
    in the units of ``sqrt(V)``. ``N = 1``: 0.0 (no selection, nothing to deflate). Why: picking the best of N
    noisy estimates inflates it by about this much even when no configuration has any skill.
    """
    if int(num_trials) != num_trials or num_trials < 1:
        raise ValueError(f"num_trials must be a positive integer, got {num_trials}")
    if not math.isfinite(trial_variance) or trial_variance < 0.0:
        raise ValueError(f"trial_variance must be finite and >= 0, got {trial_variance}")
    if num_trials == 1:
        return 0.0
    z_max = (1.0 - EULER_GAMMA) * normal_ppf(1.0 - 1.0 / num_trials)
    z_max += EULER_GAMMA * normal_ppf(1.0 - 1.0 / (num_trials * math.e))
    return math.sqrt(trial_variance) * z_max


def _trial_variance(trial_sharpes, bars_per_year) -> tuple[float, int]:
    """``(V, N)``: the sample variance (ddof=1) of the trials' PER-BAR Sharpe ratios and their number."""
    trials = finite_series(trial_sharpes, "trial_sharpes")
    if trials.shape[0] < 1:
        raise ValueError("trial_sharpes needs at least one trial (the observed run itself)")
    if trials.shape[0] == 1:
        return 0.0, 1
    return float(np.var(trials / math.sqrt(bars_per_year), ddof=1)), int(trials.shape[0])


def deflated_sharpe_from_summary(sharpe, n, trial_sharpes, bars_per_year, skew=0.0, kurtosis=3.0) -> float:
    """DSR from summary statistics: the PSR of ``sharpe`` against ``SR0 = expected_max_sharpe(V, N)``.

    ``sharpe`` (the chosen run's) and ``trial_sharpes`` (all N runs compared, the chosen one included) are
    ANNUALISED with ``bars_per_year`` (pass 1 for per-bar values); ``n`` is the chosen run's number of bars.
    ``V`` is the sample variance (ddof=1: unbiased for a handful of trials) of the trials' per-bar Sharpe
    ratios, ``N = len(trial_sharpes)``. For a caller that only has annualised Sharpe ratios and bar counts (a
    seed sweep across runs), the defaults ``skew = 0``, ``kurtosis = 3`` assume normal returns, which makes the
    DSR optimistic for fat-tailed or negatively skewed returns.

    Why: Bailey & Lopez de Prado (2014). ``N`` counts independent trials; seeds of one configuration on the same
    bars are positively correlated, so their effective number is smaller than ``N`` and ``SR0`` is an upper
    estimate (a conservative DSR), while unreported trials make it too low: pass every run that was compared.
    """
    variance, num_trials = _trial_variance(trial_sharpes, bars_per_year)
    sr0_annual = expected_max_sharpe(variance, num_trials) * math.sqrt(bars_per_year)
    return probabilistic_sharpe_from_summary(sharpe, n, bars_per_year, sr0_annual, skew, kurtosis)


def deflated_sharpe_ratio(returns, trial_sharpes, bars_per_year, risk_free_rate=0.0) -> float:
    """Deflated Sharpe ratio (Bailey & Lopez de Prado, 2014) of the chosen run's 1-D return series.

    ``DSR = PSR(SR0)``: the probabilistic Sharpe ratio (with the series' own skewness and kurtosis) against
    ``SR0 = sqrt(V) * ((1 - gamma) * Phi^-1(1 - 1/N) + gamma * Phi^-1(1 - 1/(N e)))``, the expected best per-bar
    Sharpe of N skill-less trials. ``trial_sharpes`` are the ANNUALISED Sharpe ratios of all N runs compared
    (the chosen one included); ``V`` the variance (ddof=1) of their per-bar values. ``N = 1``: ``SR0 = 0``, so
    the DSR equals ``probabilistic_sharpe_ratio(returns, 0.0, ...)``. See ``deflated_sharpe_from_summary``.
    """
    r = finite_series(returns, "returns")
    skew, kurtosis = sample_moments(r)
    sharpe = annualised_sharpe(r, bars_per_year, risk_free_rate)
    return deflated_sharpe_from_summary(sharpe, r.shape[0], trial_sharpes, bars_per_year, skew, kurtosis)
