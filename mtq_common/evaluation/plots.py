"""The report's figures and the per-specialist sleeves they draw: `equity.png` (equity curves of the
system, the equal allocation and every baseline, each scaled to the system's volatility, the system's
drawdown beneath), `allocation.png` (each specialist's share of gross exposure over time, and the
meta-controller's allocation when it has one) and `tearsheet.png` (the tear sheet of `tearsheet.py`:
monthly returns, rolling Sharpe ratio and volatility, the worst drawdowns, the exposure).

Figures are `matplotlib.figure.Figure` objects drawn on an explicit Agg canvas, not pyplot figures:
the report works on a machine without a display and never switches the global backend of a
process that also plots interactively (a notebook), and nothing stays registered in pyplot.
`report.write_report` renders them with the rest of the report.
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from mtq_common.evaluation import metrics
from mtq_common.evaluation.backtest import Backtest
from mtq_common.evaluation.tearsheet import (
    MONTHS,
    as_datetimes,
    drawdown,
    exposure,
    period_returns,
    policy_metrics,
    return_times,
    rolling_sharpe_and_vol,
    shown_rule,
    worst_drawdowns,
)

DPI = 110
EQUITY_SIZE = (11.0, 7.0)
"""Inches (width, height) of `equity.png`: 1210 x 770 pixels at `DPI`."""
ALLOCATION_SIZE = (11.0, 6.5)
"""Inches (width, height) of `allocation.png` (with or without the meta-controller's panel)."""
TEARSHEET_SIZE = (11.0, 14.0)
"""Inches (width, height) of `tearsheet.png`."""
_PALETTE = matplotlib.colormaps["tab10"].colors

# ---------------------------------------------------------------------------------------------
# Per-specialist sleeves of the system backtest
# ---------------------------------------------------------------------------------------------


def specialist_names(report: dict, bt: Backtest) -> list[str]:
    """Specialists in the report's order (`specialist_utilization`), then any sector it does not name."""
    names = [k for k in report.get("specialist_utilization", {}) if k != "entropy"]
    return names + [s for s in dict.fromkeys(bt.instrument_sectors) if s not in names]


def _exposure_by_specialist(bt: Backtest, names: list[str]) -> np.ndarray:
    """[T, K] gross exposure `sum_{i of k} |w_i|` of each specialist's instruments."""
    onehot = np.array([[float(sector == name) for name in names] for sector in bt.instrument_sectors])  # [N, K]
    return np.abs(bt.weights) @ onehot


def exposure_shares(bt: Backtest, names: list[str]) -> np.ndarray:
    """[T, K] each specialist's share of the bar's gross exposure; 0 for every specialist on a flat bar."""
    exposure = _exposure_by_specialist(bt, names)
    gross = exposure.sum(-1, keepdims=True)
    return np.divide(exposure, gross, out=np.zeros_like(exposure), where=gross > 0)


def sleeve_performance(bt: Backtest, names: list[str]) -> dict[str, dict]:
    """Each specialist's sleeve of the system: its instruments' per-instrument pnl summed per bar.

    Returns `{name: {instruments, sharpe, total_pnl, exposure_share}}`:
    * `sharpe`: of the sleeve's per-bar pnl, annualised, with no risk-free rate subtracted (the pnl is
      trading over cash already: the cash yield is the account's, not a sleeve's);
    * `total_pnl`: the sum of the sleeve's per-bar pnl, a fraction of equity. Sums, not products, so the
      sleeves add up: their totals plus the cash yield are the sum of the account's returns;
    * `exposure_share`: the sleeve's share of all gross exposure over the split, `sum_t sum_{i of k}
      |w| / sum_t sum_i |w|` (weighted by exposure, where utilisation averages each bar's share).
    """
    exposure = _exposure_by_specialist(bt, names).sum(0)  # [K]
    total = exposure.sum()
    out = {}
    for k, name in enumerate(names):
        columns = [i for i, sector in enumerate(bt.instrument_sectors) if sector == name]
        pnl = bt.pnl[:, columns].sum(-1)
        out[name] = {
            "instruments": [bt.symbols[i] for i in columns],
            "sharpe": float(metrics.sharpe(pnl, bt.bars_per_year, 0.0)),
            "total_pnl": float(pnl.sum()),
            "exposure_share": float(exposure[k] / total) if total > 0 else 0.0,
        }
    return out


def segment_count(report: dict, backtests: dict[str, Backtest]) -> int:
    """How many parallel segments the split ran as (the report's count, else the system backtest's)."""
    if "segments" in report.get("data", {}):
        return int(report["data"]["segments"])
    bt = backtests.get("system")
    return max(1, len(bt.net_return) // bt.segment_length) if bt is not None else 1


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def time_axis(bt: Backtest, timestamps: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """`(x, label)`: the backtest's timestamps (or the `timestamps` given) when they are dates, else the bar
    index in the split."""
    ts = as_datetimes(bt.timestamps if timestamps is None else timestamps)
    return (ts, "date") if ts is not None else (np.asarray(bt.bars), "bar (index in the split)")


def _layout(report: dict, backtests: dict[str, Backtest]) -> tuple[str, bool]:
    """`(words, dotted)`: how the backtest was laid out, for a subtitle, and whether the figures mark
    the segment starts with dotted lines (parallel segments only; a walk-forward's blocks are unequal)."""
    data = report.get("data", {})
    if "layout" in data:
        return data["layout"].split(" (")[0], False
    segments = segment_count(report, backtests)
    if segments == 1:
        return "one continuous backtest of the whole split from flat", False
    return f"{segments} parallel segments that each start flat (dotted lines), stitched in time order", True


def _segment_starts(bt: Backtest, x: np.ndarray) -> np.ndarray:
    """x of each segment's first bar after the first: where a fresh, flat segment takes over."""
    return x[bt.segment_length :: bt.segment_length] if bt.segment_length > 0 else x[:0]


def percent_decimals(step: float) -> int:
    """The fewest decimals (0..6) that write a tick step of `step` (a fraction) exactly as a percentage:
    5% ticks need 0, 0.5% ticks 1, 0.005% ticks 3."""
    pct = abs(step) * 100.0
    return next((d for d in range(7) if abs(round(pct, d) - pct) <= 1e-6 * pct), 6)


def _readable_percent_axis(ax, low: float, high: float) -> None:
    """y from `low` to `high` with about five ticks, labelled as percentages with as many decimals as the
    tick step needs, so a drawdown of 0.02% reads as well as one of 20%."""
    if not high > low:
        low, high = low - 1e-3, high + 1e-3  # a flat series: show a small band around it
    locator = MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10])
    ticks = locator.tick_values(low, high)
    ax.set_ylim(low, high)
    ax.yaxis.set_major_locator(locator)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=percent_decimals(float(np.diff(ticks).min()))))


def vol_scaled_returns(backtests: dict[str, Backtest], risk_free_rate: float) -> dict[str, tuple[np.ndarray, float]]:
    """`{name: (returns, scale)}`: each policy's excess return over cash scaled to the system's realised
    volatility, `c + scale * (r - c)` with `c = risk_free_rate / bars_per_year` and `scale = vol(system) /
    vol(policy)`. Every series then has the system's volatility and keeps its Sharpe ratio, so equity
    curves compare risk-adjusted. A policy without volatility, or a flat system, keeps scale 1."""
    system = backtests["system"]
    target = metrics.annual_volatility(system.net_return, system.bars_per_year)
    out = {}
    for name, bt in backtests.items():
        vol = metrics.annual_volatility(bt.net_return, bt.bars_per_year)
        scale = target / vol if vol > 0 and target > 0 else 1.0
        cash = risk_free_rate / bt.bars_per_year
        out[name] = (cash + scale * (bt.net_return - cash), scale)
    return out


def _new_figure(size: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas (no pyplot, no global backend: see the module docstring)."""
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def equity_figure(
    report: dict, backtests: dict[str, Backtest], title: str = "MTQuant evaluation", log_scale: bool | None = None
) -> Figure:
    """Equity curves of every backtest (system first and boldest), each policy scaled to the system's
    volatility (`vol_scaled_returns`), and the system's drawdown beneath.

    At its own volatility a cautious system next to rules at full size looks worst although its Sharpe
    ratio is the highest; at one volatility the curves rank nearly as the Sharpe ratios do. The legend gives
    each policy's Sharpe ratio and the scale applied. `log_scale=None` picks a log equity axis when the
    curves span more than a factor of 3. With parallel segments, dotted verticals mark where a new flat
    segment begins. The drawdown axis has as many decimals as its scale needs.
    """
    system = backtests["system"]
    x, xlabel = time_axis(system)
    rf = float(report.get("data", {}).get("risk_free_rate", 0.0))
    scaled = vol_scaled_returns(backtests, rf)
    curves = {name: metrics.equity_curve(r) for name, (r, _) in scaled.items()}
    if log_scale is None:
        low = min(float(c.min()) for c in curves.values())
        high = max(float(c.max()) for c in curves.values())
        log_scale = low > 0 and high / low > 3.0

    fig = _new_figure(EQUITY_SIZE)
    ax, ax_dd = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    palette = iter(_PALETTE)
    named = policy_metrics(report)
    order = ["system", "equal_allocation"] + [n for n in backtests if n not in ("system", "equal_allocation")]
    for name in (n for n in order if n in backtests):
        equity, bt = curves[name], backtests[name]
        sharpe = named[name]["sharpe"] if name in named else metrics.sharpe(bt.net_return, bt.bars_per_year, rf)
        label = f"{name} (Sharpe {sharpe:+.2f}, x{scaled[name][1]:.2g})"
        bx, _ = time_axis(bt)
        if name == "system":
            ax.plot(bx, equity, color="black", lw=2.0, label=label, zorder=5)
        elif name == "equal_allocation":
            ax.plot(bx, equity, color="0.35", lw=1.4, ls="--", label=label, zorder=4)
        else:
            ax.plot(bx, equity, color=next(palette), lw=1.0, alpha=0.9, label=label)
    ax.axhline(1.0, color="0.6", lw=0.8)
    if log_scale:
        ax.set_yscale("log")
        # plain numbers (1.5, 2, 3) instead of matplotlib's 2 x 10^0 on a log axis
        plain = FuncFormatter(lambda y, _: f"{y:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel("equity (start = 1)" + (", log scale" if log_scale else ""))
    ax.legend(loc="upper left", ncol=2, fontsize=9, framealpha=0.9, title="policy (Sharpe, scale applied)",
              title_fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)

    dd = drawdown(system.net_return)
    ax_dd.fill_between(x, dd, 0.0, color="tab:red", alpha=0.35, lw=0)
    ax_dd.plot(x, dd, color="tab:red", lw=0.8)
    _readable_percent_axis(ax_dd, 1.08 * float(dd.min()) if dd.min() < 0 else -1e-4, 0.0)
    ax_dd.set_ylabel("system drawdown")
    ax_dd.set_xlabel(xlabel)
    ax_dd.grid(alpha=0.3)
    layout, dotted = _layout(report, backtests)
    for axis in (ax, ax_dd):
        for start in _segment_starts(system, x) if dotted else ():
            axis.axvline(start, color="0.5", lw=0.6, ls=":", zorder=1)

    data = report["data"]
    vol = metrics.annual_volatility(system.net_return, system.bars_per_year)
    fig.suptitle(f"{title}: equity, each policy scaled to the system's volatility ({vol * 100:.3g}% a year), "
                 f"{data['source']} {data['split']} split", fontsize=12.5)  # fmt: skip
    ax.set_title(
        f"{layout}; system max drawdown {report['portfolio']['max_drawdown']:.2%}\n"
        "each curve: cash + scale x (return - cash), so the Sharpe ratios are the report's",
        fontsize=9.5,
        color="0.3",
    )
    return fig


def allocation_figure(report: dict, backtests: dict[str, Backtest], title: str = "MTQuant evaluation") -> Figure:
    """The system's allocation over time: each specialist's share of gross exposure (stacked; a flat bar
    shows as a gap), and the meta-controller's allocation as lines when the backtest recorded one."""
    system = backtests["system"]
    x, xlabel = time_axis(system)
    names = specialist_names(report, system)
    shares = exposure_shares(system, names)
    colors = [_PALETTE[k % len(_PALETTE)] for k in range(len(names))]
    has_meta = system.allocation is not None

    fig = _new_figure(ALLOCATION_SIZE)
    axes = fig.subplots(2 if has_meta else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    util = report.get("specialist_utilization", {})
    labels = [f"{name} ({util.get(name, 0.0):.0%} avg)" for name in names]
    ax.stackplot(x, shares.T, labels=labels, colors=colors, alpha=0.85, lw=0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlim(x[0], x[-1])
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_ylabel("share of gross exposure\n(executed weights)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, title="specialist", title_fontsize=9)
    ax.grid(alpha=0.3)
    layout, dotted = _layout(report, backtests)
    ax.set_title(f"white gaps: a flat book (no exposure to share); {layout}", fontsize=9.5, color="0.3")

    if has_meta:
        ax_meta = axes[1]
        allocation = system.allocation
        for k in range(allocation.shape[1]):
            name = names[k] if allocation.shape[1] == len(names) else f"allocation {k}"
            ax_meta.plot(x, allocation[:, k], color=colors[k % len(colors)], lw=0.9, label=name)
        ax_meta.set_ylim(0.0, 1.0)
        ax_meta.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax_meta.set_ylabel("meta-controller\nallocation")
        ax_meta.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
        ax_meta.grid(alpha=0.3)
    for axis in axes:
        for start in _segment_starts(system, x) if dotted else ():
            axis.axvline(start, color="0.2", lw=0.7, ls=":", zorder=3)  # above the stacked areas
    axes[-1].set_xlabel(xlabel)

    data = report["data"]
    fig.suptitle(f"{title}: the system's allocation, {data['source']} {data['split']} split", fontsize=13)
    return fig


def _heatmap(ax, values: np.ndarray, rows: list[str], columns: list[str]) -> None:
    """A table of returns as coloured cells (red loss, green gain, symmetric around 0; blank: no bar),
    each cell written in percent while the table is small enough to read."""
    finite = values[np.isfinite(values)]
    limit = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1e-9
    ax.imshow(values, cmap="RdYlGn", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    decimals = int(np.clip(np.ceil(-np.log10(limit * 100.0)) + 1, 1, 3))  # 5%: +4.2; 0.05%: +0.042
    if values.shape[0] <= 20:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):  # white on the darkest cells
                colour = "white" if abs(v) > 0.7 * limit else "black"
                ax.text(j, i, f"{v * 100:+.{decimals}f}", ha="center", va="center", fontsize=7.5, color=colour)
    ax.set_xticks(range(len(columns)), columns, fontsize=8.5)
    ax.set_yticks(range(len(rows)), rows, fontsize=8.5)
    ax.tick_params(length=0)


def _no_data(ax, text: str) -> None:
    """An empty panel that says why it is empty (instead of axes without curves)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=10, color="0.3")
    ax.set_yticks([])


def tearsheet_figure(report: dict, backtests: dict[str, Backtest], title: str = "MTQuant evaluation") -> Figure:
    """`tearsheet.png`: the system's monthly and yearly returns (% per cell), the one-year rolling Sharpe
    ratio and volatility of the system, the equal allocation and the best rule (`tearsheet.shown_rule`),
    the system's drawdown with its worst drawdowns shaded and numbered, and its gross and net exposure.
    Time is when each return was earned (`tearsheet.return_times`). A backtest shorter than a year says so
    in the rolling panels; timestamps that are not dates leave the calendar panel empty with a note."""
    system = backtests["system"]
    times = return_times(system)
    x, xlabel = time_axis(system, times)
    rf = float(report.get("data", {}).get("risk_free_rate", 0.0))
    window = int(round(system.bars_per_year))
    table = period_returns(system.net_return, times)
    years = 0 if table is None else len(table)

    fig = _new_figure(TEARSHEET_SIZE)
    grid = fig.add_gridspec(5, 2, width_ratios=(12, 1.3), height_ratios=(min(3.5, 0.6 + 0.3 * max(years, 2)), 1.1,
                                                                         1.1, 1.1, 0.9))  # fmt: skip
    ax_month, ax_year = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_sharpe = fig.add_subplot(grid[1, :])
    ax_vol, ax_dd, ax_exp = (fig.add_subplot(grid[k, :], sharex=ax_sharpe) for k in (2, 3, 4))

    # CALENDAR: compounded monthly returns, the year beside them on its own colour scale
    if table is None:
        _no_data(ax_month, "the timestamps are bar numbers, not dates: no calendar table")
        ax_year.set_axis_off()
    else:
        labels = [str(y) for y in table.index]
        _heatmap(ax_month, table[list(range(1, 13))].to_numpy(), labels, list(MONTHS))
        _heatmap(ax_year, table[["year"]].to_numpy(), labels, ["year"])
        ax_year.set_yticks([])
    ax_month.set_title("monthly returns of the system (%, compounded; blank: no bar)", fontsize=10)

    # ROLLING: one-year Sharpe ratio and volatility of the system and its two references
    rule = shown_rule(report, backtests)
    styles = {"system": {"color": "black", "lw": 1.6}, "equal_allocation": {"color": "0.4", "lw": 1.1, "ls": "--"}}
    if len(system.net_return) < window:
        note = f"{len(system.net_return)} bars, less than one year ({window} bars): no rolling one-year statistics"
        _no_data(ax_sharpe, note)
        _no_data(ax_vol, note)
    else:
        for name in (n for n in ("system", "equal_allocation", rule) if n in backtests):
            rolling = rolling_sharpe_and_vol(backtests[name].net_return, system.bars_per_year, rf)
            style = styles.get(name, {"color": "tab:blue", "lw": 1.1})
            label = name if name != rule else f"{name} (best rule)"
            ax_sharpe.plot(x[rolling["ends"]], rolling["sharpe"], label=label, **style)
            ax_vol.plot(x[rolling["ends"]], rolling["volatility"], label=label, **style)
        ax_sharpe.axhline(0.0, color="0.6", lw=0.8)
        ax_sharpe.legend(loc="upper left", fontsize=8.5, framealpha=0.9)
        ax_vol.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    ax_sharpe.set_ylabel("Sharpe ratio")
    ax_vol.set_ylabel("annual volatility")
    chosen = (f"best rule: {rule}, the rule of the report's targets with the highest Sharpe ratio on these bars "
              "(picked after the fact)") if rule else "no baseline rule in the report"  # fmt: skip
    ax_sharpe.set_title(f"one-year rolling Sharpe ratio ({window} bars, over the risk-free rate of {rf:.2%})\n"
                        f"{chosen}", fontsize=9.5)  # fmt: skip
    ax_vol.set_title("one-year rolling annual volatility", fontsize=9.5)

    # DRAWDOWN: the underwater curve, the troughs of the worst drawdowns numbered
    dd = drawdown(system.net_return)
    ax_dd.fill_between(x, dd, 0.0, color="tab:red", alpha=0.3, lw=0)
    ax_dd.plot(x, dd, color="tab:red", lw=0.8)
    for k, p in enumerate(worst_drawdowns(system.net_return), 1):
        ax_dd.plot(x[p["trough"]], dd[p["trough"]], "o", color="black", ms=3.5)
        ax_dd.annotate(str(k), (x[p["trough"]], dd[p["trough"]]), textcoords="offset points", xytext=(0, -11),
                       ha="center", fontsize=8)  # fmt: skip
    _readable_percent_axis(ax_dd, 1.18 * float(dd.min()) if dd.min() < 0 else -1e-4, 0.0)
    ax_dd.set_ylabel("drawdown")
    ax_dd.set_title("drawdown of the system; numbered: the troughs of the worst drawdowns (dates in report.md)",
                    fontsize=9.5)  # fmt: skip

    # EXPOSURE: gross and net, fractions of equity
    book = exposure(system)
    ax_exp.plot(x, book["gross"], color="tab:purple", lw=0.9, label="gross (sum of |w|)")
    ax_exp.plot(x, book["net"], color="tab:orange", lw=0.7, alpha=0.8, label="net (sum of w)")
    ax_exp.axhline(0.0, color="0.6", lw=0.8)
    low, high = min(float(book["net"].min()), 0.0), max(float(book["gross"].max()), 0.0)
    _readable_percent_axis(ax_exp, low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax_exp.set_ylabel("exposure")
    ax_exp.legend(loc="upper left", fontsize=8.5, framealpha=0.9, ncol=2)
    ax_exp.set_xlabel(xlabel)
    for axis in (ax_sharpe, ax_vol, ax_dd, ax_exp):
        axis.grid(alpha=0.3)
    ax_exp.set_xlim(x[0], x[-1])

    data = report["data"]
    fig.suptitle(f"{title}: tear sheet of the system, {data['source']} {data['split']} split", fontsize=13)
    return fig


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes (rendered in memory, so the file can be written atomically)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    fig.clear()  # free the artists now: a long run writes a report per validation
    return buffer.getvalue()
