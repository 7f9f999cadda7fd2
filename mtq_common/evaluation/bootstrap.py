"""Confidence statistics for backtest return series (numpy, float64, seeded; no scipy).

A backtest Sharpe ratio is one draw from a noisy estimator. This module says how noisy:

* ``sharpe_interval``: a stationary-bootstrap percentile interval for the annualised Sharpe ratio.
* ``paired_sharpe_difference``: the same for ``Sharpe(a) - Sharpe(b)`` of two policies on the same bars, with
  both series resampled by the SAME indices, so the noise they share (the market) cancels.
* ``compare_sharpes``: both of the above for a reference series against several others, from one bootstrap.
* The probabilistic and deflated Sharpe ratios (PSR, DSR) are `sharpe_significance.py`.

Conventions (shared with ``mtq_common.evaluation.metrics``)
-------------------------------------------------
* ``returns[t]`` is the simple return of bar ``t``; time is axis 0.
* Every Sharpe ratio given to or returned by a public function is ANNUALISED with ``bars_per_year`` (pass
  ``bars_per_year=1`` to work in per-bar units). PSR and DSR are computed on per-bar Sharpe ratios
  internally, as in the papers; the conversion is ``SR_bar = SR_annual / sqrt(bars_per_year)``.
* The Sharpe ratio is exactly ``metrics.sharpe``: ``mean(excess) / std(excess, ddof=1) * sqrt(bars_per_year)``,
  0.0 when ``T < 2`` or when the std is 0 within 1e-15.
* Where ``metrics`` returns NaN for non-finite input, every function here raises ValueError on NaN or inf,
  naming the first bad index: a confidence statement about corrupted data would be dishonest.
* Bootstrap results are reproducible: ``seed`` seeds ``numpy.random.default_rng``, and the resampled indices are
  exactly ``stationary_bootstrap_indices(n, num_samples, block, np.random.default_rng(seed))``.

References
----------
* Politis, D. N. & Romano, J. P. (1994). The stationary bootstrap. JASA 89(428), 1303-1313.
* Politis, D. N. & White, H. (2004). Automatic block-length selection for the dependent bootstrap.
  Econometric Reviews 23(1), 53-70.
* Lo, A. W. (2002). The statistics of Sharpe ratios. Financial Analysts Journal 58(4), 36-52.
* Bailey, D. H. & Lopez de Prado, M. (2012). The Sharpe ratio efficient frontier. Journal of Risk 15(2), 3-44.
* Bailey, D. H. & Lopez de Prado, M. (2014). The deflated Sharpe ratio: correcting for selection bias,
  backtest overfitting and non-normality. Journal of Portfolio Management 40(5), 94-107.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from mtq_common.evaluation import metrics

_CHUNK_ELEMENTS = 1 << 20
"""Bootstrap samples are generated and evaluated in chunks of about this many resampled bars, so memory stays
near 50 MB however long the series (2000 samples of 100k bars would otherwise need several GB at once)."""
_CACHE_ELEMENTS = 1 << 24
"""Sample sets up to this many indices (int32: 64 MB) are drawn once per process and reused (`_sample_chunks`)."""


# --- input checks -----------------------------------------------------------------------------------------------


def _finite_array(values, name: str) -> np.ndarray:
    """``values`` as float64 with a time axis; ValueError naming the first NaN or inf (why: see the module doc)."""
    r = np.asarray(values, dtype=np.float64)
    if r.ndim == 0:
        raise ValueError(f"{name} must have a time axis (axis 0), got a scalar")
    bad = np.argwhere(~np.isfinite(r))
    if bad.size:
        index = int(bad[0][0]) if r.ndim == 1 else tuple(int(i) for i in bad[0])
        raise ValueError(f"{name} has a non-finite value {r[tuple(bad[0])]} at index {index}")
    return r


def finite_series(values, name: str) -> np.ndarray:
    """A finite 1-D series (the bootstrap and PSR functions take one series at a time)."""
    r = _finite_array(values, name)
    if r.ndim != 1:
        raise ValueError(f"{name} must be 1-D [T], got shape {r.shape}")
    return r


def _check_bootstrap_args(confidence: float, num_samples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")


def _check_block(mean_block: float) -> float:
    if not math.isfinite(mean_block) or mean_block < 1.0:
        raise ValueError(f"mean_block must be a finite number >= 1 (bars), got {mean_block}")
    return float(mean_block)


# --- Sharpe ratio and the stationary bootstrap -------------------------------------------------------------------


def annualised_sharpe(returns, bars_per_year, risk_free_rate=0.0):
    """Annualised Sharpe ratio over axis 0, batched over trailing axes: ``metrics.sharpe``, reused as is.

    ``mean(r - rf / bars_per_year) / std(r - rf / bars_per_year, ddof=1) * sqrt(bars_per_year)``; 0.0 when
    ``T < 2`` or the std is 0 within 1e-15. Why reuse: a confidence interval must be about the very number the
    reports print. The one difference: non-finite input raises ValueError here instead of giving 0.0.
    A float for ``[T]`` input, a float64 array of shape ``[B...]`` for ``[T, B...]``.
    """
    r = _finite_array(returns, "returns")
    return metrics.sharpe(r, bars_per_year, risk_free_rate)


def default_block_length(n: int) -> int:
    """Default mean block length of the stationary bootstrap: ``max(1, round(n ** (1/3)))`` bars, at most ``n``.

    Why: the block must grow with ``n`` (to keep more of the serial dependence, e.g. volatility clustering and
    the autocorrelation a held position puts into a policy's returns) but more slowly than ``n`` (so there
    are many blocks to resample); ``n ** (1/3)`` is the rate of the MSE-optimal block length for the stationary
    bootstrap (Politis & White, 2004). E.g. 252 bars -> 6, 500 -> 8, 2000 -> 13, 10000 -> 22. For strongly
    persistent returns (a policy that holds positions for many bars) pass a longer ``mean_block``.
    """
    if n < 1:
        return 1
    return int(min(n, max(1, round(n ** (1.0 / 3.0)))))


def _index_chunks(n: int, num_samples: int, mean_block: float, rng: np.random.Generator):
    """Yield ``(first_sample, indices [rows, n])`` covering ``num_samples`` stationary-bootstrap samples.

    Vectorised over samples and positions: a position starts a new block with probability ``1 / mean_block``
    (always at position 0); block starts get uniform random indices; a position ``k`` bars after its block's
    start ``s`` reads index ``(s + k) % n``, the circular continuation.
    """
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // n)
    t = np.arange(n)
    for first in range(0, num_samples, rows_per_chunk):
        rows = min(rows_per_chunk, num_samples - first)
        new_block = rng.random((rows, n)) < 1.0 / mean_block
        new_block[:, 0] = True
        starts = np.zeros((rows, n), dtype=np.int64)
        starts[new_block] = rng.integers(0, n, size=int(new_block.sum()))
        # The position of the latest block start at or before each position (running max of start positions).
        block_start = np.maximum.accumulate(np.where(new_block, t, 0), axis=1)
        yield first, (np.take_along_axis(starts, block_start, axis=1) + (t - block_start)) % n


@functools.lru_cache(maxsize=2)
def _drawn_indices(n: int, num_samples: int, mean_block: float, seed: int) -> np.ndarray:
    """`stationary_bootstrap_indices` from `default_rng(seed)` as a read-only int32 array (`_sample_chunks`)."""
    out = np.empty((num_samples, n), dtype=np.int32)
    for first, idx in _index_chunks(n, num_samples, mean_block, np.random.default_rng(seed)):
        out[first : first + idx.shape[0]] = idx
    out.flags.writeable = False
    return out


def _sample_chunks(n: int, num_samples: int, mean_block: float, seed):
    """`_index_chunks` of `default_rng(seed)`: the same chunks, the same indices. A set of at most `_CACHE_ELEMENTS`
    indices with an integer seed is drawn once and reused. Why: Phases 2 and 3 compare each validation with their
    starting point (`gain_over_start`) on the same bars with the same seed, and drawing 2,000 samples of 5,000
    bars took 0.3 s of the 0.4 s of each comparison."""
    if n * num_samples > _CACHE_ELEMENTS or not isinstance(seed, (int, np.integer)):
        yield from _index_chunks(n, num_samples, mean_block, np.random.default_rng(seed))
        return
    drawn = _drawn_indices(n, num_samples, float(mean_block), int(seed))
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // n)
    for first in range(0, num_samples, rows_per_chunk):
        yield first, drawn[first : first + rows_per_chunk].astype(np.intp)  # (numpy gathers by intp fastest)


def stationary_bootstrap_indices(n: int, num_samples: int, mean_block: float, rng: np.random.Generator) -> np.ndarray:
    """Indices ``[num_samples, n]`` (int64, in ``[0, n)``) of Politis & Romano's (1994) stationary bootstrap.

    Each sample starts at a uniform random index. At each next position, with probability ``p = 1 / mean_block``
    a new block starts at a uniform random index; otherwise the block continues with the next index, wrapping
    from ``n - 1`` to 0. Block lengths are geometric with mean ``mean_block``.

    Why this bootstrap: resampling single bars (``mean_block = 1``) destroys serial dependence and understates
    the noise of dependent returns; fixed-length blocks make the resampled series non-stationary; random
    geometric lengths on a circle keep it stationary. ``rng`` is a ``numpy.random.Generator``; the bootstrap
    functions of this module draw exactly these indices from ``np.random.default_rng(seed)``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if int(num_samples) != num_samples or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative integer, got {num_samples}")
    mean_block = _check_block(mean_block)
    out = np.empty((int(num_samples), n), dtype=np.int64)
    for first, idx in _index_chunks(n, int(num_samples), mean_block, rng):
        out[first : first + idx.shape[0]] = idx
    return out


def _bootstrap_sharpes(series: list[np.ndarray], bars_per_year, risk_free_rate, num_samples, mean_block, seed):
    """Annualised Sharpe ratios ``[len(series), num_samples]`` of the series, all resampled by the same indices."""
    n = series[0].shape[0]
    out = np.empty((len(series), num_samples))
    for first, idx in _sample_chunks(n, num_samples, mean_block, seed):
        for k, r in enumerate(series):
            # r[idx] is [rows, n]; metrics.sharpe reduces over axis 0, so hand it the transposed view.
            out[k, first : first + idx.shape[0]] = metrics.sharpe(r[idx].T, bars_per_year, risk_free_rate)
    return out


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` percentile interval (linear interpolation between order statistics)."""
    low, high = np.quantile(values, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(low), float(high)


def sharpe_interval(
    returns,
    bars_per_year,
    risk_free_rate=0.0,
    confidence=0.9,
    num_samples=2000,
    mean_block=None,
    seed=0,
    return_distribution=False,
) -> dict:
    """Stationary-bootstrap percentile interval for the annualised Sharpe ratio of a 1-D return series.

    ``sharpe`` is the point estimate (``metrics.sharpe``). ``num_samples`` series of the same length are drawn
    by ``stationary_bootstrap_indices`` (mean block ``mean_block`` bars, default ``default_block_length(T)``);
    ``low`` and ``high`` are the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of their
    Sharpe ratios (the percentile interval, Efron), ``std_error`` their standard deviation (ddof=1).

    Why a block bootstrap rather than Lo's (2002) closed form ``SE = sqrt((1 + SR^2 / 2) / T)``: that form assumes
    i.i.d. normal returns, while policy returns are autocorrelated (held positions), fat-tailed and skewed. On
    i.i.d. normal returns both agree (tested). The percentile interval is first-order accurate: on a few
    hundred bars its coverage is close to nominal (measured in the tests), on a few dozen it is too narrow.

    Returns ``{"sharpe", "low", "high", "std_error", "confidence", "block", "samples", "degenerate"}`` (plain
    Python numbers, JSON-ready), plus ``"distribution"`` (the bootstrap Sharpe ratios, an ndarray) when
    ``return_distribution``. With fewer than 2 returns there is no Sharpe ratio to resample (``metrics`` reports
    0.0): the interval collapses to the point estimate, ``samples`` is 0 and ``degenerate`` is True, rather than
    raising, so a batch of reports does not fail on one empty split. NaN or inf: ValueError naming the index.
    """
    r = finite_series(returns, "returns")
    _check_bootstrap_args(confidence, num_samples)
    block = default_block_length(r.shape[0]) if mean_block is None else _check_block(mean_block)
    boot = None
    if r.shape[0] >= 2:
        boot = _bootstrap_sharpes([r], bars_per_year, risk_free_rate, int(num_samples), block, seed)[0]
    return _interval(annualised_sharpe(r, bars_per_year, risk_free_rate), boot, confidence, block,
                     return_distribution)  # fmt: skip


def _interval(point: float, boot: np.ndarray | None, confidence: float, block: float, distribution: bool) -> dict:
    """`sharpe_interval`'s result from the point estimate and the bootstrap Sharpe ratios (None: fewer than 2
    bars, the degenerate interval)."""
    result = {"sharpe": point, "low": point, "high": point, "std_error": 0.0, "confidence": float(confidence),
              "block": float(block), "samples": 0, "degenerate": True}  # fmt: skip
    if boot is None:
        if distribution:
            result["distribution"] = np.empty(0)
        return result
    low, high = _percentiles(boot, confidence)
    std_error = float(boot.std(ddof=1)) if boot.size > 1 else 0.0
    result.update(low=low, high=high, std_error=std_error, samples=int(boot.size), degenerate=False)
    if distribution:
        result["distribution"] = boot
    return result


def paired_sharpe_difference(
    a,
    b,
    bars_per_year,
    risk_free_rate=0.0,
    confidence=0.9,
    num_samples=2000,
    mean_block=None,
    seed=0,
    return_distribution=False,
) -> dict:
    """Paired stationary-bootstrap interval for ``Sharpe(a) - Sharpe(b)``, two policies' returns on the same bars.

    Each bootstrap sample applies the SAME indices to ``a`` and ``b``. Why paired: both policies trade the same
    market, so most of their Sharpe noise is shared; resampling them together cancels it and the interval is
    about the difference alone (two independent intervals that overlap say little about the difference).

    Returns ``{"difference", "low", "high", "win_share", "tie_share", "sharpe_a", "sharpe_b", "std_error",
    "confidence", "block", "samples", "degenerate"}``: ``difference = Sharpe(a) - Sharpe(b)`` on the full series,
    ``low``/``high`` the percentile interval of the bootstrap differences, ``win_share`` the share of samples with
    ``Sharpe(a) > Sharpe(b)`` (strictly: ties, e.g. ``a == b``, are not wins; they are counted in ``tie_share``).
    ``win_share`` is a bootstrap support, not a p-value. Same conventions as ``sharpe_interval`` (fewer than 2
    bars: collapsed interval, win_share 0, ``degenerate`` True; ``"distribution"``: the per-sample
    differences). Different shapes, not 1-D, NaN or inf: ValueError.
    """
    a = finite_series(a, "a")
    b = finite_series(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must be returns on the same bars (same length), got {a.shape[0]} and {b.shape[0]}")
    _check_bootstrap_args(confidence, num_samples)
    block = default_block_length(a.shape[0]) if mean_block is None else _check_block(mean_block)
    boot_a = boot_b = None
    if a.shape[0] >= 2:
        boot_a, boot_b = _bootstrap_sharpes([a, b], bars_per_year, risk_free_rate, int(num_samples), block, seed)
    sharpes = annualised_sharpe(a, bars_per_year, risk_free_rate), annualised_sharpe(b, bars_per_year, risk_free_rate)
    return _paired(*sharpes, boot_a, boot_b, confidence, block, return_distribution)


def turnover_per_volatility(traded: np.ndarray, returns: np.ndarray) -> np.ndarray:
    """Turnover per unit of volatility over the last axis (`backtest_metrics`: the mean of `traded` over the std
    of `returns`; 0 where the returns do not vary): [..., n] -> [...]."""
    vol = returns.std(axis=-1, ddof=1)
    return np.divide(traded.mean(axis=-1), vol, out=np.zeros_like(vol), where=vol > 0)


def turnover_ratio(traded, returns, ref_traded, ref_returns, confidence=0.9, num_samples=2000, seed=0) -> dict:
    """Paired stationary-bootstrap interval for the ratio of two policies' turnover per unit of volatility on the
    same bars (`backtest_metrics`: the mean of `traded` over the volatility of `returns`; 0 where the returns do
    not vary): `traded`/`returns` over `ref_traded`/`ref_returns`, both resampled by the same indices as in
    `paired_sharpe_difference`. Returns `{"ratio", "low", "high", "confidence"}`."""
    named = {"traded": traded, "returns": returns, "ref_traded": ref_traded, "ref_returns": ref_returns}
    series = [finite_series(x, name) for name, x in named.items()]
    n = series[0].shape[0]
    if n < 2 or any(x.shape[0] != n for x in series):
        raise ValueError(
            f"turnover_ratio needs two policies on the same bars (2 or more), got {[len(x) for x in series]}"
        )
    _check_bootstrap_args(confidence, num_samples)

    def ratio(t, r, rt, rr):
        with np.errstate(divide="ignore", invalid="ignore"):  # (a reference that never trades: inf)
            return turnover_per_volatility(t, r) / turnover_per_volatility(rt, rr)

    samples = np.empty(int(num_samples))
    for first, idx in _sample_chunks(n, int(num_samples), default_block_length(n), seed):
        samples[first : first + idx.shape[0]] = ratio(*(x[idx] for x in series))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return {"ratio": float(ratio(*series)), "low": float(low), "high": float(high), "confidence": float(confidence)}


def _paired(sharpe_a: float, sharpe_b: float, boot_a: np.ndarray | None, boot_b: np.ndarray | None,
            confidence: float, block: float, distribution: bool) -> dict:  # fmt: skip
    """`paired_sharpe_difference`'s result from both point estimates and both series' bootstrap Sharpe ratios
    on the same samples (None: fewer than 2 bars, the degenerate interval)."""
    difference = sharpe_a - sharpe_b
    result = {"difference": difference, "low": difference, "high": difference, "win_share": 0.0, "tie_share": 0.0,
              "sharpe_a": sharpe_a, "sharpe_b": sharpe_b, "std_error": 0.0, "confidence": float(confidence),
              "block": float(block), "samples": 0, "degenerate": True}  # fmt: skip
    if boot_a is None:
        if distribution:
            result["distribution"] = np.empty(0)
        return result
    diffs = boot_a - boot_b
    low, high = _percentiles(diffs, confidence)
    result.update(
        low=low,
        high=high,
        win_share=float(np.mean(boot_a > boot_b)),
        tie_share=float(np.mean(boot_a == boot_b)),
        std_error=float(diffs.std(ddof=1)) if diffs.size > 1 else 0.0,
        samples=int(diffs.size),
        degenerate=False,
    )
    if distribution:
        result["distribution"] = diffs
    return result


def compare_sharpes(
    returns: dict,
    reference: str,
    bars_per_year,
    risk_free_rate=0.0,
    confidence=0.9,
    num_samples=2000,
    mean_block=None,
    seed=0,
) -> tuple[dict, dict]:
    """``sharpe_interval`` of every series of ``returns`` (a name -> 1-D series dict, all on the same bars) and
    ``paired_sharpe_difference(returns[reference], returns[name])`` for every other name, from ONE bootstrap.

    Returns ``(intervals, differences)``, each keyed by name, equal to the functions' results called one by one
    with the same arguments: every call with one ``seed`` draws the same indices (module doc), and each series'
    bootstrap Sharpe ratios depend on that series alone. Why: an evaluation report compares the system with
    every baseline; drawing the indices once and resampling each series once costs a fraction of the separate
    calls (which draw them again for every call and resample the reference every time).
    """
    series = {name: finite_series(r, name) for name, r in returns.items()}
    if reference not in series:
        raise ValueError(f"reference {reference!r} is not one of the series {list(series)}")
    n = series[reference].shape[0]
    for name, r in series.items():
        if r.shape[0] != n:
            raise ValueError(f"every series must be on the same bars: {name!r} has {r.shape[0]}, "
                             f"{reference!r} has {n}")  # fmt: skip
    _check_bootstrap_args(confidence, num_samples)
    block = default_block_length(n) if mean_block is None else _check_block(mean_block)
    names = list(series)
    boots = dict.fromkeys(names)  # None: fewer than 2 bars
    if n >= 2:
        sampled = _bootstrap_sharpes(list(series.values()), bars_per_year, risk_free_rate, int(num_samples), block,
                                     seed)  # fmt: skip
        boots = dict(zip(names, sampled, strict=True))
    points = {name: annualised_sharpe(r, bars_per_year, risk_free_rate) for name, r in series.items()}
    intervals = {name: _interval(points[name], boots[name], confidence, block, False) for name in names}
    differences = {
        name: _paired(points[reference], points[name], boots[reference], boots[name], confidence, block, False)
        for name in names
        if name != reference
    }
    return intervals, differences
