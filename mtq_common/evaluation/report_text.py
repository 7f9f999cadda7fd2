"""An evaluation report as plain text, what the scripts print (`format_report`, `format_episodes`), and the cells
it shares with the Markdown report (`report.py`): `confidence_rows`, `paired_interval`, `limit_text`,
`spot_sentence`.
"""

from __future__ import annotations

from kernels import LIMIT_NAMES, NOT_APPLIED
from mtq_common.evaluation.tearsheet import policy_metrics

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


def spot_sentence(spot: list[str]) -> str:
    """How the spot instruments are accounted, for the report's data paragraph ("" when there are none)."""
    if not spot:
        return ""
    are = "is a spot instrument" if len(spot) == 1 else "are spot instruments"
    return f" {', '.join(spot)} {are}: a long position pays the risk-free rate on the cash it uses (futures use none)."


def format_report(report: dict) -> str:
    """`evaluate_portfolio`'s report as plain-text tables: system vs baselines, allocation efficiency,
    specialist utilisation, per-regime metrics, targets (PASS/FAIL), limits and data."""
    data = report["data"]
    out = [
        f"Portfolio evaluation: {data['source']} {data['split']} split, {data['start']} .. {data['end']}, "
        f"{data['bars']} bars, {len(data['instruments'])} instruments ({', '.join(data['instruments'])})."
        + spot_sentence(data.get("spot_instruments", [])),
        "",
    ]
    policies = policy_metrics(report)
    rows = [[name] + [fmt.format(m.get(key, 0.0)) for key, _, fmt in _COLUMNS] for name, m in policies.items()]
    out += [_table(["policy"] + [label for _, label, _ in _COLUMNS], rows), ""]

    if "meta_appetite" in report:
        a = report["meta_appetite"]
        out.append(f"Risk appetite of the system: mean {a['mean']:.3f}, std {a['std']:.3f}, min {a['min']:.3f}, "
                   f"correlation with the log market volatility {a['vol_correlation']:+.2f}")  # fmt: skip
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
        rows = [[t["metric"], t["target"], f"{t['threshold']:.4g}", f"{t['value']:.4g}", paired_interval(t),
                 "PASS" if t["pass"] else "FAIL"] for t in report["relative_targets"]]  # fmt: skip
        out += ["Targets against references traded alike on the same bars (DESIGN 14):",
                _table(["metric", "target", "threshold", "value", "90% interval of the difference", "result"], rows),
                ""]  # fmt: skip

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
    for name, v in report.get("vol_managed", {}).items():
        out.append(f"{name}: half-life {v['half_life']} bars, power {v['power']} (picked on the {v['picked_on']} "
                   f"split, Sharpe there {v['val_sharpe']:+.2f})")  # fmt: skip
    if "position_rate" in report:
        out.append(f"Execution: every policy's own positions move {report['position_rate']:g} of the way to its "
                   "target each bar; a stopped instrument stays flat until its target changes sign")  # fmt: skip
    return "\n".join(out)


def format_episodes(summary: dict, count: int) -> str:
    """Evaluation episodes' metrics (`backtest.summarize_episodes` over `count` episodes), one a line: the mean
    and the spread, or the value alone for a single episode (it has no spread)."""
    return "\n".join(f"  {key:<18} {v['mean']:+.3f}" + (f" +- {v['std']:.3f}" if count > 1 else "")
                     for key, v in summary.items())  # fmt: skip


def paired_interval(target: dict) -> str:
    """A target row's paired interval of `system - reference` as printed (empty without a bootstrap)."""
    return f"[{target['low']:+.2f}, {target['high']:+.2f}]" if "low" in target else ""


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
