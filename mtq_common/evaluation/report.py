"""The evaluation report on disk: `report.json`, `report.md`, three figures and three per-bar CSV files.

`write_report(report, backtests, out_dir)` takes what `portfolio_eval.evaluate_portfolio` returns and
writes (DESIGN section 9, "evaluation"; `FILES`):

* `report.json`: the report dict as it is (plus the repeated-episode summary under "episodes"),
  sorted keys, strict JSON (a NaN or inf is an error, never written);
* `report.md`: the same numbers as a page a person reads (`markdown_report`), with a tear sheet;
* `equity.png`: equity curves of the system, the equal allocation and every baseline, each scaled to
  the system's volatility, with the system's drawdown beneath (`equity_figure`);
* `allocation.png`: the system's share of gross exposure per specialist over time, and the
  meta-controller's allocation when it has one (`allocation_figure`);
* `tearsheet.png`: the system's monthly and yearly returns, one-year rolling Sharpe ratio and
  volatility against the equal allocation and the best rule, the worst drawdowns, the exposure
  (`tearsheet_figure`);
* `returns.csv`, `equity.csv`, `weights.csv`: per bar, indexed by `date`, the net return and the equity
  of every policy and the system's executed weights (`tearsheet.export_frames`, whose docstring says
  what a row is).

Every file is rendered in memory first and then written atomically (temporary file in the same
folder, fsync, rename), so a run killed while writing leaves each file either old or new, never
half-written; a report that cannot be serialised fails before any file is touched.

The figures and the per-specialist sleeves are in `report_plots.py`, the per-bar tables and the tear
sheet's tables in `tearsheet.py`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kernels import LIMIT_NAMES
from mtq_common.data.market import REGIME_NAMES
from mtq_common.evaluation.backtest import Backtest
from mtq_common.evaluation.plots import (
    allocation_figure,
    equity_figure,
    figure_png,
    segment_count,
    sleeve_performance,
    specialist_names,
    tearsheet_figure,
)
from mtq_common.evaluation.report_text import confidence_rows, paired_interval, spot_sentence
from mtq_common.evaluation.rules import MOMENTUM_LOOKBACK
from mtq_common.evaluation.tearsheet import csv_bytes, export_frames, policy_metrics, tearsheet_markdown
from mtq_common.evaluation.tearsheet import markdown_table as _markdown_table
from mtq_common.training.checkpoint import atomic_write_bytes

FILES = {
    "json": "report.json",
    "markdown": "report.md",
    "equity": "equity.png",
    "allocation": "allocation.png",
    "tearsheet": "tearsheet.png",
    "returns": "returns.csv",
    "equity_csv": "equity.csv",
    "weights": "weights.csv",
}
"""What `write_report` writes, by the key of the path it returns."""

POLICY_NOTES = {
    "system": "the hierarchy: frozen specialists, the meta-controller's allocation, the risk manager",
    "equal_allocation": "the same specialists with an equal allocation (no meta-controller)",
    "equal_weight": "long every instrument at the position limit, rebalanced every bar",
    "buy_and_hold": "long every instrument at the position limit when flat, then holding what the prices make of it "
    "(cut back to the position limit where it drifts above)",
    "risk_parity": "long every instrument, inverse to its EWMA volatility",
    "momentum": f"sign of the {MOMENTUM_LOOKBACK}-bar price change, at the position limit",
    "trend_filter": "sign of the EWMA drift estimate over its standard error with a no-trade band, at the position "
    "limit (half-life and band picked on the training split)",
    "scaled_trend": "the EWMA drift z-score times a scale, clipped to the position limit (half-life and scale "
    "picked on the training split): the rule the specialists start at",
    "oracle": "sign of the latent drift (synthetic data only): the upper reference of what the market allows",
    "vol_managed_equal_allocation": "the equal allocation scaled by min(1, (sigma* / sigma_t)^p), sigma_t the "
    "instruments' causal EWMA volatility (half-life and p picked on the validation split): risk timing by rule",
    "vol_managed_trend_filter": "trend_filter scaled the same way (its own half-life and p)",
}
"""One line per policy under the comparison table. Every policy trades through the same env, limits and
execution (the specialists' partial-adjustment rate and the stop-loss lock-out)."""

# How each metric reads: ratios signed to two decimals, fractions as percentages.
_FORMATS = {
    "sharpe": "{:+.2f}",
    "sortino": "{:+.2f}",
    "calmar": "{:+.2f}",
    "max_drawdown": "{:.1%}",
    "win_rate": "{:.1%}",
    "total_return": "{:+.1%}",
    "annual_return": "{:+.1%}",
    "annual_volatility": "{:.1%}",
    "var_compliance": "{:.1%}",
    "var_breach_rate": "{:.1%}",
    "turnover": "{:.4f}",
    "sharpe_before_costs": "{:+.2f}",
    "turnover_per_vol": "{:.2f}",
}
_LABELS = {
    "sharpe": "Sharpe",
    "sortino": "Sortino",
    "calmar": "Calmar",
    "max_drawdown": "max drawdown",
    "win_rate": "win rate",
    "total_return": "total return",
    "annual_return": "annual return",
    "annual_volatility": "annual volatility",
    "var_compliance": "VaR compliance",
    "var_breach_rate": "VaR breach rate",
    "turnover": "turnover",
    "sharpe_before_costs": "Sharpe before costs",
    "turnover_per_vol": "turnover / volatility",
}
COMPARISON_KEYS = (
    "sharpe", "sharpe_before_costs", "sortino", "calmar", "max_drawdown", "win_rate", "total_return",
    "annual_volatility", "var_compliance", "var_breach_rate", "turnover", "turnover_per_vol",
)  # fmt: skip
"""Columns of the system-vs-baselines table (DESIGN section 9's portfolio keys)."""
REGIME_COLUMNS = ("sharpe", "max_drawdown", "win_rate", "total_return", "annual_volatility")
LIMIT_LABELS = {
    "max_position": "position per instrument (fraction of equity)",
    "max_var": "one-day VaR of the book (fraction of equity)",
    "max_correlation": "correlation exposure of the book (w'Rw / (gross x largest book))",
    "max_sector": "sector share of the largest book (N x position limit)",
    "var_scale": "VaR scale, z(confidence) x sqrt(bars per day)",
}


def _fmt(metric: str, value) -> str:
    """A metric's value as the tables show it (`{:.4g}` for a metric without a format of its own)."""
    return _FORMATS.get(metric, "{:.4g}").format(value)


# ---------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------


def markdown_report(
    report: dict, backtests: dict[str, Backtest], episodes: dict | None = None, title: str = "MTQuant evaluation"
) -> str:
    """`report.md`: the evaluation as a page a person reads.

    In order: title and data line, system vs baselines, allocation efficiency, targets (PASS/FAIL),
    per regime, per specialist (utilisation and each sleeve's performance from the system backtest),
    the repeated episodes (mean ± std, when given), the limits in force, the tear sheet
    (`tearsheet.tearsheet_markdown`), and links to the figures and the per-bar CSV files.
    """
    data = report["data"]
    instruments = list(data["instruments"])
    segments = segment_count(report, backtests)
    out = [
        f"# {title}",
        "",
        f"**Data:** {data['source']}, {data['split']} split, {data['start']} to {data['end']}, {data['bars']} bars, "
        f"{len(instruments)} instruments ({', '.join(instruments)}).",
        "",
        (
            f"The backtests are {data['layout']}. "
            if "layout" in data
            else "One continuous backtest of the whole split, starting flat, for the system and every baseline. "
            if segments == 1
            else f"The split runs as {segments} parallel segments of consecutive bars that each start flat; the "
            "metrics and curves are of the segments stitched in time order. "
        )
        + "Returns are the account's (cash yield + trading - costs); Sharpe and Sortino are over the risk-free "
        "rate." + spot_sentence(data.get("spot_instruments", [])),
        "",
    ]

    # SYSTEM VS BASELINES: every policy trades through the same env, risk manager and costs
    policies = policy_metrics(report)
    rows = [
        [f"**{name}**" if name == "system" else name] + [_fmt(k, m.get(k, 0.0)) for k in COMPARISON_KEYS]
        for name, m in policies.items()
    ]
    out += [
        "## System vs baselines",
        "",
        _markdown_table(["policy"] + [_LABELS[k] for k in COMPARISON_KEYS], rows),
        "",
        *[f"- `{name}`: {POLICY_NOTES[name]}" for name in policies if name in POLICY_NOTES],
        "",
        "Win rate: share of closed trades (runs of one position sign per instrument) with positive pnl. "
        "VaR compliance: share of bars whose one-day VaR is within the limit. VaR breach rate: share of bars "
        "whose loss exceeds the ex-ante VaR of one bar. Turnover: mean sum of |weight changes| per bar.",
        "",
    ]

    # WALK-FORWARD FOLDS: each fold's own test block
    if report.get("folds"):
        names = list(report["folds"][0]["sharpe"])
        rows = [
            [str(f["fold"]), " to ".join(f["train"]), " to ".join(f["test"]), str(f["bars"]),
             *(f"{f['sharpe'][n]:+.2f}" for n in names),
             f"{f['trend_filter']['half_life']} / {f['trend_filter']['band']:g}"]
            for f in report["folds"]
        ]  # fmt: skip
        header = ["fold", "trained on", "tested on", "bars", *(f"{n} Sharpe" for n in names), "trend_filter h / band"]
        out += ["## Folds", "", "Each fold's test block alone (the table above is of all of them stitched).", "",
                _markdown_table(header, rows, align="llll" + "r" * (len(names) + 1)), ""]  # fmt: skip

    # CONFIDENCE: how much of each Sharpe ratio could be luck
    if "confidence" in report:
        conf = report["confidence"]
        level = f"{conf['confidence']:.0%}"
        keys = ("policy", "sharpe", "interval", "difference", "difference_interval", "wins")
        rows = [[row[key] for key in keys] for row in confidence_rows(conf)]
        header = ["policy", "Sharpe", f"{level} interval", "system - policy", f"{level} interval", "system wins"]
        out += [
            "## Confidence",
            "",
            f"Stationary block bootstrap of each policy's return series ({conf['samples']} samples, mean block "
            f"{conf['block']} bars, seeded): a {level} interval for every Sharpe ratio, and the paired difference "
            "of the system's Sharpe ratio and each other policy's on the same resampled bars, with the share of "
            "samples in which the system wins. Probabilistic Sharpe ratio of the system against 0 "
            f"(Bailey and Lopez de Prado): **{conf['psr']:.3f}**.",
            "",
            _markdown_table(header, rows),
            "",
        ]

    # ALLOCATION EFFICIENCY
    efficiency = report["allocation_efficiency"]
    line = (
        "Sharpe with the meta-controller minus Sharpe with an equal allocation over the same specialists: "
        f"**{efficiency:+.3f}**"
    )
    if "equal_allocation" in report:
        line += f" ({report['portfolio']['sharpe']:+.2f} vs {report['equal_allocation']['sharpe']:+.2f})"
    out += ["## Allocation efficiency", "", line + ".", ""]

    # TARGETS: evaluated and printed, never tuned
    target_rows = []
    for t in report["targets"]:
        # the threshold in the metric's own units ("< 18.0%"), else the report's own string
        has_threshold = "op" in t and "threshold" in t
        target = f"{t['op']} {_fmt(t['metric'], t['threshold']).lstrip('+')}" if has_threshold else t["target"]
        result = "**PASS**" if t["pass"] else "**FAIL**"
        target_rows.append([_LABELS.get(t["metric"], t["metric"]), target, _fmt(t["metric"], t["value"]), result])
    passed = sum(bool(t["pass"]) for t in report["targets"])
    out += [
        f"## Targets (phase {report.get('phase', '?')})",
        "",
        _markdown_table(["metric", "target", "value", "result"], target_rows, align="lrrl"),
        "",
        f"{passed} of {len(report['targets'])} targets met.",
        "",
    ]

    if report.get("relative_targets"):
        rows = [
            [_LABELS.get(t["metric"], t["metric"]), t["target"], _fmt(t["metric"], t["threshold"]).lstrip("+"),
             _fmt(t["metric"], t["value"]), paired_interval(t), "**PASS**" if t["pass"] else "**FAIL**"]
            for t in report["relative_targets"]
        ]  # fmt: skip
        out += [
            "Against references traded alike on the same bars (DESIGN section 14: what the learning must be worth; "
            "with a 90% paired interval a row passes only when the interval is above 0 as well):",
            "",
            _markdown_table(
                ["metric", "target", "threshold", "value", "90% interval of the difference", "result"],
                rows,
                align="llrrll",
            ),  # fmt: skip
            "",
        ]

    # PER REGIME
    regimes = report["per_regime"]
    if set(regimes) <= set(REGIME_NAMES):
        how = "Bars grouped by the synthetic market's regime at the bar each position was chosen."
    else:
        how = (
            "The data has no regime labels: bars grouped by terciles of the realised volatility "
            "(mean over instruments)."
        )
    regime_rows = [[name, str(m["bars"])] + [_fmt(k, m[k]) for k in REGIME_COLUMNS] for name, m in regimes.items()]
    out += [
        "## Per regime",
        "",
        how + " A subset's drawdown is that of its bars concatenated in time order.",
        "",
        _markdown_table(["regime", "bars"] + [_LABELS[k] for k in REGIME_COLUMNS], regime_rows),
        "",
    ]

    # PER SPECIALIST: utilisation from the report, sleeves from the system backtest's per-instrument pnl
    util = report["specialist_utilization"]
    system = backtests["system"]
    names = specialist_names(report, system)
    sleeves = sleeve_performance(system, names)
    specialist_rows = [
        [
            name,
            ", ".join(sleeves[name]["instruments"]) or "-",
            f"{util.get(name, 0.0):.1%}",
            f"{sleeves[name]['exposure_share']:.1%}",
            f"{sleeves[name]['sharpe']:+.2f}",
            f"{sleeves[name]['total_pnl']:+.2%}",
        ]
        for name in names
    ]
    header = ["specialist", "instruments", "utilisation", "share of gross exposure", "sleeve Sharpe", "sleeve pnl"]
    out += [
        "## Per specialist",
        "",
        _markdown_table(header, specialist_rows, align="llrrrr"),
        "",
        f"Utilisation: mean over held bars of the specialist's share of that bar's gross exposure; normalised "
        f"entropy of the shares {util.get('entropy', 0.0):.3f} (1 = even use). Share of gross exposure: the "
        "same, weighted by exposure over the whole split. Sleeve: the specialist's instruments in the system's "
        "book; Sharpe of its per-bar pnl (no risk-free rate), pnl summed over bars as a fraction of equity.",
        "",
    ]

    # EPISODES: repeated evaluation episodes, mean and spread of each metric
    if episodes:
        episode_rows = [
            [
                _LABELS.get(k, k),
                f"{_fmt(k, s['mean'])} ± {_fmt(k, s['std']).lstrip('+')}",
                _fmt(k, s["min"]),
                _fmt(k, s["max"]),
            ]
            for k, s in episodes.items()
        ]
        out += [
            "## Evaluation episodes",
            "",
            f"Repeated evaluation episodes ({report.get('episodes_source', 'as run')}), each starting flat (std over "
            "episodes, ddof = 1).",
            "",
            _markdown_table(["metric", "mean ± std", "min", "max"], episode_rows),
            "",
        ]

    # RISK LAYER: what the risk manager did to each policy's proposals
    if "risk_layer" in report:
        risk_rows = [
            [name, *(f"{r['binding'][k]:.1%}" for k in LIMIT_NAMES), f"{r['gross_kept']:.1%}", f"{r['flat_books']:.1%}"]
            for name, r in report["risk_layer"].items()
        ]
        header = ["policy", *(f"{k} binds" for k in LIMIT_NAMES), "gross kept", "flat books"]
        out += [
            "## Risk layer",
            "",
            "Over the bars with a non-flat proposal: how often each limit scaled the book, the mean share of the "
            "proposed gross exposure kept, and the share of books executed flat (every limit is reached by "
            "scaling, so never).",
            "",
            _markdown_table(header, risk_rows),
            "",
        ]

    # LIMITS in force
    limits = report["limits"]
    out += ["## Limits", ""]
    for key, value in limits.items():
        if key in ("notes", "var_scale"):
            continue
        out.append(f"- {LIMIT_LABELS.get(key, key)}: {'not applied' if value is None else f'<= {value:g}'}")
    if "var_scale" in limits:
        out.append(f"- {LIMIT_LABELS['var_scale']}: {limits['var_scale']:.4g}")
    notes = limits.get("notes", [])
    out += ["", *notes] if notes else ["", "Every limit applies."]
    if "trend_filter" in report:
        tf = report["trend_filter"]
        out += ["", f"trend_filter: half-life {tf['half_life']} bars, band {tf['band']:g}, picked on the "
                f"{tf['fitted_on']} split."]  # fmt: skip
    out.append("")

    out += [tearsheet_markdown(report, backtests, FILES["tearsheet"])]

    out += [
        "## Figures",
        "",
        f"- [Equity curves, each policy scaled to the system's volatility, and drawdown]({FILES['equity']})",
        f"- [Allocation over time]({FILES['allocation']})",
        f"- [Tear sheet]({FILES['tearsheet']})",
        f"- Per bar, indexed by date: [net returns]({FILES['returns']}) and [equity]({FILES['equity_csv']}) of "
        f"every policy, [the system's executed weights]({FILES['weights']})",
        "",
        f"![Equity curves of the system and the baselines, at the system's volatility]({FILES['equity']})",
        "",
        f"![The system's allocation over time]({FILES['allocation']})",
        "",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# write_report
# ---------------------------------------------------------------------------------------------


def write_report(
    report: dict,
    backtests: dict[str, Backtest],
    out_dir: str | Path,
    title: str = "MTQuant evaluation",
    episodes: dict | None = None,
) -> dict[str, Path]:
    """Write into `out_dir` (created) every file of `FILES`: `report.json`, `report.md` (with the tear
    sheet), `equity.png`, `allocation.png`, `tearsheet.png`, and the per-bar `returns.csv`, `equity.csv`
    (every policy's net return and equity) and `weights.csv` (the system's executed weights).

    `report, backtests` are `evaluate_portfolio`'s result; `episodes` is an optional
    `{metric: {mean, std, min, max}}` from repeated evaluation episodes (`summarize_episodes`),
    stored under "episodes" in the JSON and tabled in the Markdown. Returns the written paths by
    `FILES` key. Everything is rendered before the first write, and each write is atomic; existing
    files are replaced. Raises ValueError (and writes nothing) when the report holds a NaN or inf, or
    when a policy's backtest is not on the system's bars.
    """
    out_dir = Path(out_dir)
    payload = dict(report) if episodes is None else {**report, "episodes": episodes}
    try:
        text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except ValueError as exc:
        bad = ", ".join(_non_finite(payload)) or str(exc)
        raise ValueError(f"the report for {out_dir / FILES['json']} holds non-finite numbers: {bad}") from None
    rendered = {
        "json": text.encode(),
        "markdown": markdown_report(report, backtests, episodes, title).encode(),
        "equity": figure_png(equity_figure(report, backtests, title)),
        "allocation": figure_png(allocation_figure(report, backtests, title)),
        "tearsheet": figure_png(tearsheet_figure(report, backtests, title)),
        **{key: csv_bytes(frame) for key, frame in export_frames(report, backtests).items()},
    }
    paths = {key: out_dir / name for key, name in FILES.items()}
    for key, data in rendered.items():
        atomic_write_bytes(paths[key], data)
    return paths


def _non_finite(x, path: str = "") -> list[str]:
    """Paths of the NaN / inf leaves of a nested dict or list (for the error message)."""
    if isinstance(x, dict):
        return [p for k, v in x.items() for p in _non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(x, (list, tuple)):
        return [p for i, v in enumerate(x) for p in _non_finite(v, f"{path}[{i}]")]
    if isinstance(x, float) and not math.isfinite(x):
        return [path]
    return []
