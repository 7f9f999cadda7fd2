"""The per-bar series of an evaluation and the tear sheet made from them: what a researcher takes away.

`report.write_report` writes three CSV files beside `report.json` (`export_frames`), one row per bar of
the backtest and one shared index, `date`:

* `returns.csv`: the net return of every policy, one column each, named as in `report.md`: `system` (the
  report's "portfolio"), `equal_allocation` and every baseline (the report's "baselines" keys). These
  are the series every metric of the report is computed from: `metrics.sharpe(returns[name],
  data.bars_per_year, data.risk_free_rate)` is the report's Sharpe ratio of that policy;
* `equity.csv`: the same layout, equity from 1.0, `cumprod(1 + returns)`;
* `weights.csv`: the system's executed weight per instrument (columns = symbols), signed fractions of
  equity.

Row `date` is the bar that ends at `date`: its return was earned from the previous bar's close to the
close of `date` (the pandas / quantstats convention), and its weights are the book held over it, set at
the previous close, so row `date` of weights.csv earns row `date` of returns.csv. The first row's book
was set at the report's `data.start`. Dates are ISO: a date for daily bars, date and time (to the minute,
finer where needed to keep the dates unique) for intraday bars; without calendar timestamps, the bar
number.

The tear sheet (`tearsheet_markdown`, a section of report.md; its figure is
`plots.tearsheet_figure`): the system's monthly and yearly returns, one-year rolling Sharpe
ratio and volatility of the system, the equal allocation and the best rule, the worst drawdowns, and
the gross exposure. Every statistic is `mtq_common.evaluation.metrics`' formula applied to the same series.
"""

from __future__ import annotations

import datetime

import numpy as np
import pandas as pd

from mtq_common.data.market import iso_time
from mtq_common.evaluation import metrics
from mtq_common.evaluation.backtest import Backtest
from mtq_common.evaluation.rules import best_rule

WORST_DRAWDOWNS = 5
"""How many drawdowns the tear sheet tables."""
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
ROLLING_POINTS = 1000
"""The rolling statistics are evaluated at most at this many window ends, spread evenly (enough to plot)."""
_CHUNK_VALUES = 1 << 22
"""At most this many floats of windows at once (32 MiB): a one-year window of minute bars is 360k bars."""


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A Markdown table; `align` has one character per column, "l" or "r" (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


# ---------------------------------------------------------------------------------------------
# The per-bar series: returns.csv, equity.csv, weights.csv
# ---------------------------------------------------------------------------------------------


def policy_metrics(report: dict) -> dict[str, dict]:
    """Every policy's metrics by the name the tables and the CSV columns use: `system` (the report's
    "portfolio"), `phase2_system` and `equal_allocation` when present, then the baselines in the report's order."""
    policies = {"system": report["portfolio"]}
    for name in ("phase2_system", "equal_allocation"):
        if name in report:
            policies[name] = report[name]
    policies.update(report["baselines"])
    return policies


def as_datetimes(timestamps) -> np.ndarray | None:
    """`timestamps` as datetime64[ns] when they are calendar times (datetime64, datetimes, pandas
    Timestamps), else None (bar numbers)."""
    ts = np.asarray(timestamps)
    if np.issubdtype(ts.dtype, np.datetime64):
        return ts.astype("datetime64[ns]")
    if ts.dtype == object and len(ts) and all(isinstance(t, (datetime.date, np.datetime64)) for t in ts):
        return ts.astype("datetime64[ns]")
    return None


def return_times(bt: Backtest) -> np.ndarray:
    """[T] when each bar's return is earned: the end of the bar (`end_timestamps`), or, for a backtest
    that does not record it, the bar at which the position was chosen."""
    return bt.end_timestamps if bt.end_timestamps is not None else bt.timestamps


def date_labels(timestamps, bars_per_day: float) -> list[str]:
    """ISO labels of `timestamps` (`market.iso_time`: a date for daily bars, date and minute for intraday
    ones), at a finer unit where that resolution would repeat a label; bar numbers as they are."""
    ts = as_datetimes(timestamps)
    if ts is None:
        return [str(t) for t in np.asarray(timestamps)]
    labels = [iso_time(t, bars_per_day) for t in ts]
    for unit in ("s", "ns"):
        if len(set(labels)) == len(labels):
            break
        labels = list(np.datetime_as_string(ts, unit=unit))
    return labels


def export_frames(report: dict, backtests: dict[str, Backtest]) -> dict[str, pd.DataFrame]:
    """`{"returns", "equity_csv", "weights"}`: the three per-bar tables of the module docstring, indexed by
    `date`. Raises ValueError when a policy's backtest is not on the system's bars (one index for all)."""
    system = backtests["system"]
    named = policy_metrics(report)
    names = [n for n in named if n in backtests] + [n for n in backtests if n not in named]
    for name in names:
        if not np.array_equal(backtests[name].bars, system.bars):
            raise ValueError(
                f"the {name} backtest is not on the system's bars ({len(backtests[name].bars)} bars, the system "
                f"{len(system.bars)}): returns.csv and equity.csv need every policy on the same bars"
            )
    dates = pd.Index(date_labels(return_times(system), system.bars_per_day), name="date")
    return {
        "returns": pd.DataFrame({n: backtests[n].net_return for n in names}, index=dates),
        "equity_csv": pd.DataFrame({n: backtests[n].equity for n in names}, index=dates),
        "weights": pd.DataFrame(system.weights, index=dates, columns=list(system.symbols)),
    }


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """A table as CSV bytes; floats in their shortest exact form (pandas reads them back bit for bit)."""
    return frame.to_csv(lineterminator="\n").encode()


# ---------------------------------------------------------------------------------------------
# Tables of one return series
# ---------------------------------------------------------------------------------------------


def period_returns(returns, timestamps) -> pd.DataFrame | None:
    """Compounded returns by calendar month: a year x month table (columns 1..12, NaN where the series
    has no bar) with the compounded year in a last column "year". `timestamps[t]` is when `returns[t]`
    was earned; a partial first or last month is the return of its bars. None without calendar times."""
    times = as_datetimes(timestamps)
    if times is None:
        return None
    series = pd.Series(np.asarray(returns, dtype=np.float64), index=pd.DatetimeIndex(times))
    year, month = series.index.year, series.index.month
    table = series.groupby([year, month]).agg(metrics.total_return).unstack().reindex(columns=range(1, 13))
    table["year"] = series.groupby(year).agg(metrics.total_return)
    table.index.name = "year"
    return table


def rolling_stat(stat, returns, window: int, points: int = ROLLING_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """`(ends, values)`: `stat` (a `metrics` function of `[window, B]` returns) of the `window` bars that end
    at each of up to `points` bars spread evenly from the first full window to the last bar. Empty when
    the series is shorter than `window`."""
    r = np.asarray(returns, dtype=np.float64)
    if window < 2 or len(r) < window:
        return np.empty(0, dtype=np.int64), np.empty(0)
    count = min(points, len(r) - window + 1)
    ends = np.unique(np.linspace(window - 1, len(r) - 1, count).round().astype(np.int64))
    windows = np.lib.stride_tricks.sliding_window_view(r, window)  # a view: no copy of [T, window]
    chunk = max(1, _CHUNK_VALUES // window)
    values = [np.atleast_1d(stat(windows[ends[k : k + chunk] - window + 1].T)) for k in range(0, len(ends), chunk)]
    return ends, np.concatenate(values)


def rolling_sharpe_and_vol(returns, bars_per_year: float, risk_free_rate: float) -> dict[str, np.ndarray]:
    """One-year rolling Sharpe ratio and annual volatility (`rolling_stat` with `metrics.sharpe` and
    `metrics.annual_volatility` over round(bars_per_year) bars): `{ends, sharpe, volatility}`."""
    window = int(round(bars_per_year))
    ends, sharpe = rolling_stat(lambda x: metrics.sharpe(x, bars_per_year, risk_free_rate), returns, window)
    _, vol = rolling_stat(lambda x: metrics.annual_volatility(x, bars_per_year), returns, window)
    return {"ends": ends, "sharpe": sharpe, "volatility": vol}


def drawdown(net_return: np.ndarray) -> np.ndarray:
    """[T] drawdown after each bar, <= 0, with the starting capital as the first peak (as `metrics.max_drawdown`)."""
    equity = metrics.equity_curve(net_return)
    peak = np.maximum(np.maximum.accumulate(equity), 1.0)
    return equity / peak - 1.0


def worst_drawdowns(returns, count: int = WORST_DRAWDOWNS) -> list[dict]:
    """The `count` deepest drawdowns, deepest first, as `{peak, trough, recovery, depth}`: bar indices into
    `returns` of the last bar at the peak (-1: the starting capital), of the lowest equity, and of the
    first bar back at the peak (None: not recovered by the last bar); `depth` is a positive fraction."""
    dd = drawdown(np.asarray(returns, dtype=np.float64))
    under = np.diff(np.concatenate(([0], (dd < 0).astype(np.int8), [0])))
    starts, stops = np.flatnonzero(under == 1), np.flatnonzero(under == -1)  # stop: first bar above water
    periods = []
    for start, stop in zip(starts, stops, strict=True):
        trough = int(start + np.argmin(dd[start:stop]))
        recovery = int(stop) if stop < len(dd) else None
        periods.append({"peak": int(start) - 1, "trough": trough, "recovery": recovery, "depth": float(-dd[trough])})
    return sorted(periods, key=lambda p: -p["depth"])[:count]


def shown_rule(report: dict, backtests: dict[str, Backtest]) -> str | None:
    """The rule the tear sheet shows: the report targets' best rule (`rules.best_rule`, the one of momentum,
    `trend_filter` and `vol_managed_trend_filter` with the highest Sharpe ratio in the report) among `backtests`,
    None when there is none. Picked on the evaluated bars themselves: a reference, not a strategy one could have
    chosen in advance."""
    return best_rule({name: m["sharpe"] for name, m in report["baselines"].items() if name in backtests})


def exposure(bt: Backtest) -> dict[str, np.ndarray]:
    """[T] gross (`sum_i |w_i|`) and net (`sum_i w_i`) exposure of the executed book, fractions of equity."""
    return {"gross": np.abs(bt.weights).sum(-1), "net": bt.weights.sum(-1)}


# ---------------------------------------------------------------------------------------------
# The tear-sheet section of report.md
# ---------------------------------------------------------------------------------------------


def _drawdown_rows(bt: Backtest) -> list[list[str]]:
    """The worst drawdowns of a backtest with dates: start (the peak), trough, recovery, depth, bars."""
    labels = date_labels(return_times(bt), bt.bars_per_day)
    origin = date_labels(bt.timestamps[:1], bt.bars_per_day)[0]  # the starting capital: the first book's bar
    rows = []
    for k, p in enumerate(worst_drawdowns(bt.net_return), 1):
        end = p["recovery"] if p["recovery"] is not None else len(labels) - 1
        rows.append([
            str(k), origin if p["peak"] < 0 else labels[p["peak"]], labels[p["trough"]],
            "not recovered" if p["recovery"] is None else labels[p["recovery"]], f"{-p['depth']:.2%}",
            str(end - p["peak"]),
        ])  # fmt: skip
    return rows


def tearsheet_markdown(report: dict, backtests: dict[str, Backtest], figure: str = "tearsheet.png") -> str:
    """The "Tear sheet" section of report.md: the system's monthly and yearly returns, the one-year rolling
    Sharpe ratio and volatility (system, equal allocation, best rule), the worst drawdowns, the exposure."""
    system = backtests["system"]
    rf = float(report["data"].get("risk_free_rate", 0.0))
    window = int(round(system.bars_per_year))
    out = ["## Tear sheet", "", "The system's net returns (returns.csv), compounded by calendar month and year; "
           "a partial first or last month is the return of its bars.", ""]  # fmt: skip

    table = period_returns(system.net_return, return_times(system))
    if table is None:
        out += ["The timestamps are bar numbers, not dates: no calendar table.", ""]
    else:
        rows = [[str(year), *("" if np.isnan(v) else f"{v:+.2%}" for v in table.loc[year])] for year in table.index]
        out += [markdown_table(["year", *MONTHS, "**year**"], rows), ""]

    rule = shown_rule(report, backtests)
    names = [n for n in ("system", "equal_allocation", rule) if n in backtests]
    if len(system.net_return) < window:
        out += [f"The backtest has {len(system.net_return)} bars, less than one year ({window} bars): no rolling "
                "one-year Sharpe ratio or volatility.", ""]  # fmt: skip
    else:
        rows = []
        for name in names:
            rolling = rolling_sharpe_and_vol(backtests[name].net_return, system.bars_per_year, rf)
            s, v = rolling["sharpe"], rolling["volatility"]
            rows.append([name, *(f"{x:+.2f}" for x in (s.min(), np.median(s), s.max())), f"{(s > 0).mean():.0%}",
                         *(f"{x:.2%}" for x in (v.min(), np.median(v), v.max()))])  # fmt: skip
        header = ["policy", "Sharpe min", "median", "max", "windows with Sharpe > 0", "volatility min", "median", "max"]
        chosen = "no baseline rule in the report." if rule is None else (
            f"best rule: `{rule}`, the rule of the report's targets with the highest Sharpe ratio on these bars "
            "(picked after the fact, as a reference).")  # fmt: skip
        out += [
            f"One-year rolling ({window} bars) Sharpe ratio (over the risk-free rate of {rf:.2%}) and annual "
            f"volatility, over the windows that end at up to {ROLLING_POINTS} bars spread evenly over the backtest; "
            f"{chosen}",
            "",
            markdown_table(header, rows),
            "",
        ]

    header = ["#", "start (peak)", "trough", "recovery", "depth", "bars"]
    out += [f"The {WORST_DRAWDOWNS} worst drawdowns of the system (bars: from the peak to the recovery, or to the "
            "last bar):", "", markdown_table(header, _drawdown_rows(system) or [["-"] * 6], align="rlllrr"),
            ""]  # fmt: skip

    gross = exposure(system)["gross"]
    out += [
        f"Gross exposure of the system (sum of |weights|): mean {gross.mean():.1%}, max {gross.max():.1%}, flat on "
        f"{(gross == 0).mean():.1%} of the bars.",
        "",
        f"![Tear sheet: monthly returns, rolling Sharpe and volatility, drawdowns, exposure]({figure})",
        "",
    ]
    return "\n".join(out)
