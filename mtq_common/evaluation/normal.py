"""The standard normal distribution without scipy: `normal_cdf` and its inverse `normal_ppf`, to about
machine precision (the probabilistic and deflated Sharpe ratios of `mtq_common.evaluation.bootstrap` need both).

Reference: Acklam, P. J. (2003). An algorithm for computing the inverse normal cumulative distribution
function.
"""

from __future__ import annotations

import math

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
    ``bootstrap.NormalDist().inv_cdf`` of the standard library is as accurate; the tests use it as reference.
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
