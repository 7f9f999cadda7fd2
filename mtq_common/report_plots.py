"""The report's figures and the per-specialist sleeves they draw: `equity.png` (equity curves of the
system, the equal allocation and every baseline, the system's drawdown beneath) and `allocation.png` (each
specialist's share of gross exposure over time, and the meta-controller's allocation when it has one).

Figures are `matplotlib.figure.Figure` objects drawn on an explicit Agg canvas, not pyplot figures:
the report works on a machine without a display and never switches the global backend of a
process that also plots interactively (a notebook), and nothing stays registered in pyplot.
`report.write_report` renders them with the rest of the report.
"""

from __future__ import annotations

import datetime
import io

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from mtq_common import metrics
from mtq_common.backtest import Backtest

DPI = 110
EQUITY_SIZE = (11.0, 7.0)
"""Inches (width, height) of `equity.png`: 1210 x 770 pixels at `DPI`."""
ALLOCATION_SIZE = (11.0, 6.5)
"""Inches (width, height) of `allocation.png` (with or without the meta-controller's panel)."""
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


def time_axis(bt: Backtest) -> tuple[np.ndarray, str]:
    """`(x, label)`: the backtest's timestamps when they are dates, else the bar index in the split."""
    ts = np.asarray(bt.timestamps)
    if np.issubdtype(ts.dtype, np.datetime64):
        return ts, "date"
    if ts.dtype == object and len(ts) and all(isinstance(t, (datetime.date, np.datetime64)) for t in ts):
        return ts.astype("datetime64[ns]"), "date"  # datetimes or pandas Timestamps in an object array
    return np.asarray(bt.bars), "bar (index in the split)"


def drawdown(net_return: np.ndarray) -> np.ndarray:
    """[T] drawdown after each bar, <= 0, with the starting capital as the first peak (as `metrics.max_drawdown`)."""
    equity = metrics.equity_curve(net_return)
    peak = np.maximum(np.maximum.accumulate(equity), 1.0)
    return equity / peak - 1.0


def _segment_starts(bt: Backtest, x: np.ndarray) -> np.ndarray:
    """x of each segment's first bar after the first: where a fresh, flat segment takes over."""
    return x[bt.segment_length :: bt.segment_length] if bt.segment_length > 0 else x[:0]


def _new_figure(size: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas (no pyplot, no global backend: see the module docstring)."""
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def equity_figure(
    report: dict, backtests: dict[str, Backtest], title: str = "MTQuant evaluation", log_scale: bool | None = None
) -> Figure:
    """Equity curves of every backtest (system first and boldest) and the system's drawdown beneath.

    `log_scale=None` picks a log equity axis when the curves span more than a factor of 3 (an oracle
    can dwarf the rest on a linear axis). Dotted verticals mark where a new flat segment begins.
    """
    system = backtests["system"]
    x, xlabel = time_axis(system)
    curves = {name: bt.equity for name, bt in backtests.items()}
    if log_scale is None:
        low = min(float(c.min()) for c in curves.values())
        high = max(float(c.max()) for c in curves.values())
        log_scale = low > 0 and high / low > 3.0

    fig = _new_figure(EQUITY_SIZE)
    ax, ax_dd = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    palette = iter(_PALETTE)
    order = ["system", "equal_allocation"] + [n for n in backtests if n not in ("system", "equal_allocation")]
    for name in (n for n in order if n in backtests):
        equity = curves[name]
        label = f"{name} ({equity[-1] - 1.0:+.1%})"
        bx, _ = time_axis(backtests[name])
        if name == "system":
            ax.plot(bx, equity, color="black", lw=2.0, label=label, zorder=5)
        elif name == "equal_allocation":
            ax.plot(bx, equity, color="0.35", lw=1.4, ls="--", label=label, zorder=4)
        else:
            ax.plot(bx, equity, color=next(palette), lw=1.0, alpha=0.9, label=label)
    ax.axhline(1.0, color="0.6", lw=0.8)
    if log_scale:
        ax.set_yscale("log")
    ax.set_ylabel("equity (start = 1)" + (", log scale" if log_scale else ""))
    ax.legend(loc="upper left", ncol=2, fontsize=9, framealpha=0.9, title="policy (total return)", title_fontsize=9)
    ax.grid(alpha=0.3)

    dd = drawdown(system.net_return)
    ax_dd.fill_between(x, dd, 0.0, color="tab:red", alpha=0.35, lw=0)
    ax_dd.plot(x, dd, color="tab:red", lw=0.8)
    ax_dd.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))  # a 2% drawdown has 0.5% ticks
    ax_dd.set_ylabel("system drawdown")
    ax_dd.set_xlabel(xlabel)
    ax_dd.grid(alpha=0.3)
    for axis in (ax, ax_dd):
        for start in _segment_starts(system, x):
            axis.axvline(start, color="0.5", lw=0.6, ls=":", zorder=1)

    data = report["data"]
    fig.suptitle(f"{title}: equity, {data['source']} {data['split']} split", fontsize=13)
    ax.set_title(
        f"{segment_count(report, backtests)} parallel segments that each start flat (dotted lines), stitched in time "
        f"order; system max drawdown {report['portfolio']['max_drawdown']:.1%}",
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
    ax.set_title(
        "white gaps: a flat book (no exposure to share); dotted lines: a new segment starts flat",
        fontsize=9.5,
        color="0.3",
    )

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
        for start in _segment_starts(system, x):
            axis.axvline(start, color="0.2", lw=0.7, ls=":", zorder=3)  # above the stacked areas
    axes[-1].set_xlabel(xlabel)

    data = report["data"]
    fig.suptitle(f"{title}: the system's allocation, {data['source']} {data['split']} split", fontsize=13)
    return fig


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes (rendered in memory, so the file can be written atomically)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    fig.clear()  # free the artists now: a long run writes a report per validation
    return buffer.getvalue()
