"""Portfolio evaluation: the report of DESIGN section 9 from backtests of the hierarchy and the baselines.

`evaluate_portfolio` runs the system, the equal allocation over the same frozen specialists and every
baseline (`baselines.baseline_policies`) on the same bars through one `PortfolioEnv`
(`backtest.run_backtests`), and builds the report: each policy's metrics, the per-regime table, the
specialists' utilisation, the targets of DESIGN sections 10 and 14, the risk layer and, for the test
report, the bootstrap confidence intervals. `format_report` prints it for a person; `report.py`
writes it as Markdown and figures. The conventions of the metrics are in `mtq_common.backtest`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from kernels import LIMIT_NAMES, NOT_APPLIED
from mtq_common.backtest import (
    Backtest,
    backtest_metrics,
    mean_allocation,
    per_regime_metrics,
    risk_layer_stats,
    run_backtests,
    specialist_utilization,
)
from mtq_common.baselines import (
    BASELINE_NAMES,
    TrendFilter,
    baseline_policies,
)
from mtq_common.config import Config
from mtq_common.hierarchy import HierarchyPolicy, instrument_specialist_index
from mtq_common.market import MarketData, iso_time
from mtq_common.market_tables import MarketTables, build_tables

TARGETS = {
    1: (("sharpe", ">", 1.5), ("max_drawdown", "<", 0.20), ("win_rate", ">", 0.55)),
    2: (("sharpe", ">", 1.8), ("max_drawdown", "<", 0.18), ("win_rate", ">", 0.60), ("var_compliance", ">", 0.95)),
    3: (("sharpe", ">", 2.0), ("max_drawdown", "<", 0.15), ("win_rate", ">", 0.65), ("var_compliance", ">", 0.98)),
    "final": (
        ("sharpe", ">", 2.0), ("max_drawdown", "<", 0.15), ("win_rate", ">", 0.60), ("var_compliance", ">=", 1.0),
    ),
}  # fmt: skip
"""DESIGN section 10, one column per phase ("final" is the last column; VaR compliance 100% is >= 1.0)."""
_COMPARE = {">": lambda v, x: v > x, "<": lambda v, x: v < x, ">=": lambda v, x: v >= x}


def target_checks(portfolio: dict, phase: int | str = 2) -> list[dict]:
    """The phase's column of DESIGN section 10: `{metric, target, threshold, op, value, pass}` per row."""
    if phase not in TARGETS:
        raise ValueError(f"phase must be one of {list(TARGETS)}, got {phase!r}")
    rows = []
    for metric, op, threshold in TARGETS[phase]:
        value = float(portfolio[metric])
        rows.append(
            {
                "metric": metric,
                "target": f"{op} {threshold:g}",
                "threshold": float(threshold),
                "op": op,
                "value": value,
                "pass": bool(_COMPARE[op](value, threshold)),
            }
        )
    return rows


CONFIDENCE = 0.9
BOOTSTRAP_SAMPLES = 2000
INTERVAL_KEYS, VS_SYSTEM_KEYS = ("sharpe", "low", "high"), ("difference", "low", "high", "win_share")
"""What the report keeps of each Sharpe interval and of each paired difference with the system."""


def confidence_stats(backtests: dict[str, Backtest], risk_free_rate: float, seed: int = 0) -> dict:
    """How much of each Sharpe ratio is luck (`mtq_common.statistics`), from the policies' return series:

    * `sharpe`: per policy, the Sharpe ratio with a 90% stationary-bootstrap interval;
    * `vs_system`: per reference, the paired difference `Sharpe(system) - Sharpe(reference)` (the same
      resampled bars for both, so the market they share cancels), its 90% interval and `win_share`, the
      share of bootstrap samples in which the system's Sharpe is higher;
    * `psr`: the probabilistic Sharpe ratio of the system against 0 (Bailey and Lopez de Prado).

    Seeded; the mean block length is `statistics.default_block_length` of the series (T^(1/3) bars)."""
    from mtq_common import statistics

    system = backtests["system"]
    bars_per_year = system.bars_per_year
    # every interval and paired difference from one bootstrap (the same numbers as one call each)
    intervals, differences = statistics.compare_sharpes(
        {name: bt.net_return for name, bt in backtests.items()}, "system", bars_per_year, risk_free_rate,
        confidence=CONFIDENCE, num_samples=BOOTSTRAP_SAMPLES, seed=seed)  # fmt: skip
    return {
        "confidence": CONFIDENCE,
        "samples": BOOTSTRAP_SAMPLES,
        "block": statistics.default_block_length(len(system.net_return)),
        "sharpe": {name: {k: v[k] for k in INTERVAL_KEYS} for name, v in intervals.items()},
        "vs_system": {name: {k: v[k] for k in VS_SYSTEM_KEYS} for name, v in differences.items()},
        "psr": statistics.probabilistic_sharpe_ratio(
            system.net_return, 0.0, bars_per_year=bars_per_year, risk_free_rate=risk_free_rate
        ),  # fmt: skip
    }


def relative_targets(report: dict) -> list[dict]:
    """DESIGN section 14's targets against the rules on the same bars, `{metric, target, value, pass}` each:
    Sharpe at least 1.1x momentum's, above the equal allocation's and above trend_filter's, and turnover
    per unit of volatility no higher than momentum's. (The seed's absolute table is `target_checks`.)"""
    system, base = report["portfolio"], report["baselines"]
    rows = [
        ("sharpe", ">=", "1.1 x momentum", 1.1 * base["momentum"]["sharpe"]),
        ("sharpe", ">", "equal_allocation", report["equal_allocation"]["sharpe"]),
        ("sharpe", ">", "trend_filter", base["trend_filter"]["sharpe"]),
        ("turnover_per_vol", "<=", "momentum", base["momentum"]["turnover_per_vol"]),
    ]
    compare = {">=": lambda v, x: v >= x, ">": lambda v, x: v > x, "<=": lambda v, x: v <= x}
    return [
        {"metric": metric, "target": f"{op} {name}", "threshold": float(threshold), "value": float(system[metric]),
         "pass": bool(compare[op](system[metric], threshold))}
        for metric, op, name, threshold in rows
    ]  # fmt: skip


def _json_ready(x):
    """Plain Python types (NaN stays NaN here; `checkpoint.atomic_write_json` writes it as null)."""
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x)
    return x


# ---------------------------------------------------------------------------------------------
# The evaluation report
# ---------------------------------------------------------------------------------------------


def evaluate_portfolio(
    specialists,
    meta,
    market: MarketData,
    cfg: Config,
    trend: TrendFilter,
    device: str | torch.device = "cpu",
    segments: int = 16,
    tables: MarketTables | None = None,
    phase: int | str = 2,
    reference_cache: dict | None = None,
    specialists_frozen: bool = False,
    confidence: bool = False,
) -> tuple[dict, dict[str, Backtest]]:
    """The report of DESIGN section 9 for the hierarchy (`specialists` + `meta`) on `market`.

    Runs, on the same bars: the system, the equal allocation over the same frozen specialists
    (`HierarchyPolicy(meta=None)`) and every baseline (`trend`: the trend filter's parameters, picked on
    the training split by `fit_trend_for`). `segments=1` is one continuous backtest of the whole split
    (the test evaluation); more segments run in parallel (validation). Returns `(report, backtests)` with
    the backtests keyed "system", "equal_allocation" and by baseline name (for plots). `meta=None` makes
    the system the equal allocation itself (allocation efficiency 0). `phase` picks the column of
    targets: 1, 2, 3 or "final".

    The baselines depend on neither level of the hierarchy: pass the same dict as `reference_cache`
    to repeated evaluations on the same market (a training run's validations) and they are computed
    once. The equal allocation depends on the specialists only: with `specialists_frozen=True`
    (Phase 2) it is cached there too. `confidence=True` adds bootstrap intervals (`confidence_stats`).
    """
    tables = tables or build_tables(market, cfg, device)
    rf = cfg.reward.risk_free_rate
    owner = instrument_specialist_index(market.sectors, specialists.names).to(tables.prices.device)
    size = cfg.environment.max_position_size

    def hierarchy(meta_controller):
        return lambda rows: HierarchyPolicy(specialists, meta_controller, owner, size, rows, tables.prices.device)

    def baseline(name):
        return lambda rows: baseline_policies(market, cfg, trend, tables.prices.device)[name]

    references = reference_cache if reference_cache is not None else {}
    makers = {"system": hierarchy(meta)}
    # unless frozen, the specialists may have changed since the last call (Phase 3): not cached
    if not (specialists_frozen and "equal_allocation" in references):
        makers["equal_allocation"] = hierarchy(None)
    if not references:
        makers.update({name: baseline(name) for name in baseline_policies(market, cfg, trend, tables.prices.device)})
    ran = run_backtests(market, cfg, makers, segments, device, tables)  # every policy in one env, bar by bar
    for name, bt in ran.items():
        if name in BASELINE_NAMES or (name == "equal_allocation" and specialists_frozen):
            references[name] = bt
    backtests = {
        "system": ran["system"],
        "equal_allocation": ran.get("equal_allocation", references.get("equal_allocation")),
        **{name: bt for name, bt in references.items() if name != "equal_allocation"},
    }

    end = np.asarray(market.timestamps)[backtests["system"].bars[-1] + 1]  # the last bar whose return is in
    data = {"source": market.source, "split": market.split, "end": iso_time(end, market.bars_per_day)}
    report = report_from_backtests(backtests, list(specialists.names), rf, phase, data, confidence)
    report["trend_filter"] = dataclasses.asdict(trend)
    return _json_ready(report), backtests


def report_from_backtests(backtests: dict[str, Backtest], specialists: list[str], risk_free_rate: float,
                          phase: int | str, data: dict, confidence: bool = False) -> dict:  # fmt: skip
    """The report of DESIGN section 9 from finished backtests ("system", "equal_allocation" and the
    baselines): `evaluate_portfolio`'s, and the walk-forward's over its stitched test blocks. `data` gives
    at least the source, the split and the end date; the rest is read from the system's backtest."""
    rf = risk_free_rate
    system = backtests["system"]
    portfolio = backtest_metrics(system, rf)
    equal_allocation = backtest_metrics(backtests["equal_allocation"], rf)
    limits = {k: (None if v == NOT_APPLIED else v) for k, v in system.limits.items()}  # None: not applied
    report = {
        "portfolio": portfolio,
        "equal_allocation": equal_allocation,
        "baselines": {name: backtest_metrics(bt, rf) for name, bt in backtests.items() if name in BASELINE_NAMES},
        "allocation_efficiency": portfolio["sharpe"] - equal_allocation["sharpe"],
        "specialist_utilization": specialist_utilization(system, specialists),
        "mean_allocation": mean_allocation(system, specialists),
        "per_regime": per_regime_metrics(system, rf),
        "risk_layer": {name: risk_layer_stats(bt) for name, bt in backtests.items()},
        "phase": phase,
        "targets": target_checks(portfolio, phase),
        "limits": {**limits, "notes": system.limit_notes},
        "data": {
            "start": iso_time(system.timestamps[0], system.bars_per_day),
            **data,
            "bars": len(system.net_return),
            "instruments": list(system.symbols),
            "segments": len(system.net_return) // system.segment_length,
            "bars_per_year": float(system.bars_per_year),
            "risk_free_rate": float(rf),  # of every Sharpe and Sortino in the report
        },
    }
    report["relative_targets"] = relative_targets(report)
    if confidence:
        report["confidence"] = confidence_stats(backtests, rf)
    return report


# ---------------------------------------------------------------------------------------------
# Plain-text report
# ---------------------------------------------------------------------------------------------

_COLUMNS = (
    ("sharpe", "sharpe", "{:+.2f}"),
    ("sharpe_before_costs", "pre-cost", "{:+.2f}"),
    ("sortino", "sortino", "{:+.2f}"),
    ("calmar", "calmar", "{:+.2f}"),
    ("max_drawdown", "max_dd", "{:.1%}"),
    ("win_rate", "win", "{:.1%}"),
    ("total_return", "return", "{:+.1%}"),
    ("annual_volatility", "ann_vol", "{:.1%}"),
    ("var_compliance", "var_ok", "{:.1%}"),
    ("var_breach_rate", "var_brch", "{:.1%}"),
    ("turnover", "turnover", "{:.4f}"),
    ("turnover_per_vol", "turn/vol", "{:.2f}"),
)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def cells(line):  # the first column left-aligned (names), the rest right-aligned (numbers)
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        return "  ".join(padded)

    lines = [cells([str(c) for c in line]) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """`evaluate_portfolio`'s report as plain-text tables: system vs baselines, allocation efficiency,
    specialist utilisation, per-regime metrics, targets (PASS/FAIL), limits and data."""
    data = report["data"]
    out = [
        f"Portfolio evaluation: {data['source']} {data['split']} split, {data['start']} .. {data['end']}, "
        f"{data['bars']} bars, {len(data['instruments'])} instruments ({', '.join(data['instruments'])})",
        "",
    ]
    policies = {"system": report["portfolio"]}
    if "equal_allocation" in report:
        policies["equal_allocation"] = report["equal_allocation"]
    policies.update(report["baselines"])
    rows = [[name] + [fmt.format(m.get(key, 0.0)) for key, _, fmt in _COLUMNS] for name, m in policies.items()]
    out += [_table(["policy"] + [label for _, label, _ in _COLUMNS], rows), ""]

    out.append(
        f"Allocation efficiency (Sharpe with the meta-controller - with the equal allocation): "
        f"{report['allocation_efficiency']:+.3f}"
    )
    util = report["specialist_utilization"]
    shares = "  ".join(f"{k} {v:.1%}" for k, v in util.items() if k != "entropy")
    out += [f"Specialist utilisation (share of gross exposure): {shares}  entropy {util['entropy']:.3f}", ""]

    regime_rows = [
        [name, str(m["bars"]), f"{m['sharpe']:+.2f}", f"{m['max_drawdown']:.1%}", f"{m['win_rate']:.1%}",
         f"{m['total_return']:+.1%}", f"{m['annual_volatility']:.1%}"]
        for name, m in report["per_regime"].items()
    ]  # fmt: skip
    header = ["regime", "bars", "sharpe", "max_dd", "win", "return", "ann_vol"]
    out += ["Per regime (drawdown of each subset's bars concatenated):", _table(header, regime_rows), ""]

    target_rows = [
        [t["metric"], t["target"], f"{t['value']:.4g}", "PASS" if t["pass"] else "FAIL"] for t in report["targets"]
    ]
    phase = report.get("phase", "")
    out += [f"Targets (phase {phase}):", _table(["metric", "target", "value", "result"], target_rows), ""]
    if "confidence" in report:
        conf = report["confidence"]
        level = f"{conf['confidence']:.0%}"
        rows = [
            [
                r["policy"],
                f"{r['sharpe']} {r['interval']}",
                f"{r['difference']} {r['difference_interval']}  {r['wins']}",
            ]
            for r in confidence_rows(conf)
        ]
        header = ["policy", f"sharpe [{level} interval]", f"system - policy [{level}]  system wins"]
        title = (
            f"Bootstrap ({conf['samples']} stationary-bootstrap samples, mean block {conf['block']} bars); "
            f"probabilistic Sharpe ratio of the system vs 0: {conf['psr']:.3f}"
        )
        out += [title, _table(header, rows), ""]
    if report.get("relative_targets"):
        rows = [[t["metric"], t["target"], f"{t['threshold']:.4g}", f"{t['value']:.4g}", "PASS" if t["pass"] else
                 "FAIL"] for t in report["relative_targets"]]  # fmt: skip
        out += ["Targets against the rules on the same bars (DESIGN 14):",
                _table(["metric", "target", "threshold", "value", "result"], rows), ""]  # fmt: skip

    if "risk_layer" in report:
        names = list(policies)
        risk_rows = [
            [name]
            + [f"{r['binding'][k]:.1%}" for k in LIMIT_NAMES]
            + [f"{r['gross_kept']:.1%}", f"{r['flat_books']:.1%}"]
            for name, r in ((n, report["risk_layer"][n]) for n in names if n in report["risk_layer"])
        ]
        header = ["policy", *(f"{k} binds" for k in LIMIT_NAMES), "gross kept", "flat books"]
        out += ["Risk layer (share of bars with a non-flat proposal):", _table(header, risk_rows), ""]

    lim = report["limits"]
    out.append(
        f"Limits: position <= {lim['max_position']:g}, one-day VaR <= {lim['max_var']:g}, "
        f"correlation exposure <= {limit_text(lim['max_correlation'])}, sector <= {limit_text(lim['max_sector'])}"
    )
    out += [f"  {note}" for note in lim.get("notes", [])]
    if "trend_filter" in report:
        tf = report["trend_filter"]
        out.append(f"trend_filter: half-life {tf['half_life']} bars, band {tf['band']:g} (picked on the "
                   f"{tf['fitted_on']} split)")  # fmt: skip
    return "\n".join(out)


def confidence_rows(conf: dict) -> list[dict[str, str]]:
    """The report's `confidence` as printable cells, one row per policy (the system's own row has no
    difference): what the plain-text and the Markdown reports both show."""
    rows = []
    for name, s in conf["sharpe"].items():
        paired = conf["vs_system"].get(name)
        row = {"policy": name, "sharpe": f"{s['sharpe']:+.2f}", "interval": f"[{s['low']:+.2f}, {s['high']:+.2f}]",
               "difference": "", "difference_interval": "", "wins": ""}  # fmt: skip
        if paired is not None:
            row.update(difference=f"{paired['difference']:+.2f}", wins=f"{paired['win_share']:.0%}",
                       difference_interval=f"[{paired['low']:+.2f}, {paired['high']:+.2f}]")  # fmt: skip
        rows.append(row)
    return rows


def limit_text(value) -> str:
    """A limit as printed: its value, or "not applied" (None in the report, `NOT_APPLIED` in the kernel)."""
    return "not applied" if value is None or value == NOT_APPLIED else f"{value:g}"
