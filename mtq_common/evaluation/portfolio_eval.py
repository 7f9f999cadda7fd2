"""Portfolio evaluation: the report of DESIGN section 9 from backtests of the hierarchy and the baselines.

`evaluate_portfolio` runs the system, the equal allocation over the same frozen specialists and every
baseline (`rules.baseline_policies`) on the same bars through one `PortfolioEnv`
(`backtest.run_backtests`), and builds the report: each policy's metrics, the per-regime table, the
specialists' utilisation, the targets of DESIGN sections 10 and 14, the risk layer and, for the test
report, the bootstrap confidence intervals. `report_text.format_report` prints it for a person; `report.py`
writes it as Markdown and figures. The conventions of the metrics are in `backtest_metrics.py`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from kernels import NOT_APPLIED
from mtq_common.agents.hierarchy import (
    HierarchyPolicy,
    SharedPositions,
    instrument_specialist_index,
    start_levels,
    start_timing,
)
from mtq_common.data.market import MarketData, iso_time
from mtq_common.data.splits import spot_symbols
from mtq_common.data.tables import MarketTables, build_tables, cost_rates
from mtq_common.data.volatility import VolLevels, VolTiming, vol_appetite
from mtq_common.evaluation import bootstrap
from mtq_common.evaluation.backtest import Backtest, run_backtests
from mtq_common.evaluation.backtest_metrics import (
    appetite_stats,
    backtest_metrics,
    mean_allocation,
    per_regime_metrics,
    risk_layer_stats,
    specialist_utilization,
)
from mtq_common.evaluation.rules import (
    BASELINE_NAMES,
    VOL_MANAGED,
    ScaledTrend,
    TrendFilter,
    VolManagedPolicy,
    baseline_policies,
    best_rule,
    pick_vol_timing,
)
from mtq_common.evaluation.sharpe_significance import probabilistic_sharpe_ratio
from mtq_common.evaluation.tearsheet import policy_metrics
from mtq_common.training.config import Config

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


RULE_MARGIN = 0.3
"""How far above the best rule (`rules.best_rule` of `rules.RULES`) the system's Sharpe ratio must be (DESIGN 14)."""


def relative_targets(report: dict) -> list[dict]:
    """DESIGN section 14's targets against references traded alike on the same bars, `{metric, target,
    threshold, value, pass}` each: Sharpe at least `RULE_MARGIN` above the best rule's (`rules.best_rule`), above
    `vol_managed_equal_allocation`'s (when in the report) and the equal allocation's, and turnover per unit
    of volatility no higher than momentum's. With the report's bootstrap (`confidence`) each Sharpe row also
    carries the paired difference's interval (`low`, `high`) and passes only with `low` above 0 as well.
    (The seed's absolute table is `target_checks`.)"""
    system, base, policies = report["portfolio"], report["baselines"], policy_metrics(report)
    best = best_rule({name: m["sharpe"] for name, m in base.items()})
    rows = [("sharpe", ">=", f"{best} + {RULE_MARGIN:g}", best, RULE_MARGIN)]
    if "vol_managed_equal_allocation" in base:
        rows.append(("sharpe", ">", "vol_managed_equal_allocation", "vol_managed_equal_allocation", 0.0))
    rows.append(("sharpe", ">", "equal_allocation", "equal_allocation", 0.0))
    if "phase2_system" in report:  # joint fine-tuning must beat the Phase 2 system it starts from
        rows.append(("sharpe", ">", "phase2_system", "phase2_system", 0.0))
    rows.append(("turnover_per_vol", "<=", "momentum", "momentum", 0.0))
    compare = {">=": lambda v, x: v >= x, ">": lambda v, x: v > x, "<=": lambda v, x: v <= x}
    paired = report.get("confidence", {}).get("vs_system", {})
    out = []
    for metric, op, target, reference, margin in rows:
        ref = policies[reference]
        threshold = float(ref[metric]) + margin
        row = {"metric": metric, "target": f"{op} {target}", "threshold": threshold, "value": float(system[metric]),
               "pass": bool(compare[op](system[metric], threshold))}  # fmt: skip
        if metric == "sharpe" and reference in paired:
            row["low"], row["high"] = paired[reference]["low"], paired[reference]["high"]
            row["pass"] = row["pass"] and row["low"] > 0.0
        out.append(row)
    return out


REFERENCES = (*BASELINE_NAMES, *VOL_MANAGED)
"""The report's baselines, in report order: the rules, then the volatility-managed rules."""

CONFIDENCE = 0.9
BOOTSTRAP_SAMPLES = 2000
INTERVAL_KEYS, VS_SYSTEM_KEYS = ("sharpe", "low", "high"), ("difference", "low", "high", "win_share")
"""What the report keeps of each Sharpe interval and of each paired difference with the system."""


def confidence_stats(backtests: dict[str, Backtest], risk_free_rate: float, seed: int = 0) -> dict:
    """How much of each Sharpe ratio is luck (`mtq_common.evaluation.bootstrap`), from the policies' return series:

    * `sharpe`: per policy, the Sharpe ratio with a 90% stationary-bootstrap interval;
    * `vs_system`: per reference, the paired difference `Sharpe(system) - Sharpe(reference)` (the same
      resampled bars for both, so the market they share cancels), its 90% interval and `win_share`, the
      share of bootstrap samples in which the system's Sharpe is higher;
    * `psr`: the probabilistic Sharpe ratio of the system against 0 (Bailey and Lopez de Prado).

    Seeded; the mean block length is `bootstrap.default_block_length` of the series (T^(1/3) bars)."""
    system = backtests["system"]
    bars_per_year = system.bars_per_year
    # every interval and paired difference from one bootstrap (the same numbers as one call each)
    intervals, differences = bootstrap.compare_sharpes(
        {name: bt.net_return for name, bt in backtests.items()}, "system", bars_per_year, risk_free_rate,
        confidence=CONFIDENCE, num_samples=BOOTSTRAP_SAMPLES, seed=seed)  # fmt: skip
    return {
        "confidence": CONFIDENCE,
        "samples": BOOTSTRAP_SAMPLES,
        "block": bootstrap.default_block_length(len(system.net_return)),
        "sharpe": {name: {k: v[k] for k in INTERVAL_KEYS} for name, v in intervals.items()},
        "vs_system": {name: {k: v[k] for k in VS_SYSTEM_KEYS} for name, v in differences.items()},
        "psr": probabilistic_sharpe_ratio(
            system.net_return, 0.0, bars_per_year=bars_per_year, risk_free_rate=risk_free_rate
        ),  # fmt: skip
    }


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
    vol_levels: VolLevels | None = None,
    timings: dict[str, VolTiming] | None = None,
    phase2: tuple | None = None,
) -> tuple[dict, dict[str, Backtest]]:
    """The report of DESIGN section 9 for the hierarchy (`specialists` + `meta`) on `market`.

    Runs, on the same bars: the system, the equal allocation over the same frozen specialists
    (`HierarchyPolicy(meta=None)`) and every baseline (`trend`: the trend filter's parameters, picked on
    the training split by `fit_trend_for`), each rule at the specialists' `position_rate` (execution alike).
    With `vol_levels` (`volatility.fit_vol_levels` of the training split) also the volatility-managed
    baselines (`rules.VOL_MANAGED`): with their `timings` picked on the validation split
    (`validation_timings`), or, when `market` is the validation split and `timings` is None, picked here
    from this run's backtests (and kept in `reference_cache`: a run's later validations reuse the choice).
    `phase2` (the Phase 1 specialists and the Phase 2 meta-controller) adds the Phase 2 system, the
    hierarchy that Phase 3 starts from, as `phase2_system`. `segments=1` is one continuous backtest of the
    whole split (the test evaluation); more segments run in parallel (validation). Returns `(report, backtests)` with
    the backtests keyed "system", "equal_allocation" and by baseline name (for plots). `meta=None` makes
    the system the equal allocation itself (allocation efficiency 0). `phase` picks the column of
    targets: 1, 2, 3 or "final".

    The baselines depend on neither level of the hierarchy: pass the same dict as `reference_cache`
    to repeated evaluations on the same market (a training run's validations) and they are computed
    once. The equal allocation (and its volatility-managed form) depends on the specialists only: with
    `specialists_frozen=True` (Phase 2) it is cached there too. `confidence=True` adds bootstrap intervals
    (`confidence_stats`).
    """
    tables = tables or build_tables(market, cfg, device)
    rf = cfg.reward.risk_free_rate
    where = tables.prices.device
    owner = instrument_specialist_index(market.sectors, specialists.names).to(where)
    size = cfg.environment.max_position_size
    rate = specialists.position_rate

    shared: dict[int, SharedPositions] = {}  # one per specialists: the hierarchies over them compute once a bar

    def hierarchy(meta_controller, agents=specialists):
        if id(agents) not in shared:  # (not setdefault: its default would be built at every call)
            shared[id(agents)] = SharedPositions(agents)
        positions = shared[id(agents)]
        return lambda rows: HierarchyPolicy(agents, meta_controller, owner, size, rows, where, market, positions)

    scaled = start_rule_of(specialists)  # the rule the specialists start at, traded as a rule

    def baseline(name):
        return lambda rows: baseline_policies(market, cfg, trend, where, rate, scaled)[name]

    references = reference_cache if reference_cache is not None else {}
    timings = with_start_rule(timings or references.get("timings"), meta)  # a run's validations pick once

    def cached(name: str) -> bool:  # the references that stay valid across this run's validations
        learned = name in ("equal_allocation", "vol_managed_equal_allocation")
        return specialists_frozen if learned else name in (*BASELINE_NAMES, "vol_managed_trend_filter")

    def vol_makers() -> dict:
        inner = {"vol_managed_equal_allocation": hierarchy(None), "vol_managed_trend_filter": baseline("trend_filter")}
        levels = dict.fromkeys(VOL_MANAGED, vol_levels)
        if meta is not None and meta.timing is not None:  # the rule it starts from, on the levels it stored
            levels["vol_managed_equal_allocation"] = start_levels(meta.timing)
        return {name: vol_managed(inner[name], market, levels[name], timings[name], size, where)
                for name in VOL_MANAGED if name not in references}  # fmt: skip

    makers = {"system": hierarchy(meta)}
    if phase2 is not None:
        makers["phase2_system"] = hierarchy(phase2[1], phase2[0])
    # unless frozen, the specialists may have changed since the last call (Phase 3): not cached
    if not (specialists_frozen and "equal_allocation" in references):
        makers["equal_allocation"] = hierarchy(None)
    if not any(name in references for name in BASELINE_NAMES):
        makers.update({name: baseline(name) for name in baseline_policies(market, cfg, trend, where, rate, scaled)})
    if vol_levels is not None and timings is not None:
        makers.update(vol_makers())  # the choices are known: one pass for every policy
    ran = run_backtests(market, cfg, makers, segments, device, tables)  # every policy in one env, bar by bar
    if vol_levels is not None and timings is None:  # pick on this (validation) split, then a second pass
        timings = with_start_rule(pick_timings({**references, **ran}, market, vol_levels, cfg), meta)
        ran.update(run_backtests(market, cfg, vol_makers(), segments, device, tables))
    if vol_levels is not None and reference_cache is not None:
        references["timings"] = timings
    for name, bt in ran.items():
        if cached(name):
            references[name] = bt
    backtests = {
        "system": ran["system"],
        **({"phase2_system": ran["phase2_system"]} if phase2 is not None else {}),
        "equal_allocation": ran.get("equal_allocation", references.get("equal_allocation")),
        **{name: bt for name, bt in references.items() if name in BASELINE_NAMES},
        **({name: ran.get(name, references.get(name)) for name in VOL_MANAGED} if vol_levels is not None else {}),
    }

    end = np.asarray(market.timestamps)[backtests["system"].bars[-1] + 1]  # the last bar whose return is in
    data = {"source": market.source, "split": market.split, "end": iso_time(end, market.bars_per_day),
            "spot_instruments": spot_symbols(cfg, list(market.symbols))}  # fmt: skip
    report = report_from_backtests(backtests, list(specialists.names), rf, phase, data, confidence)
    report["trend_filter"] = dataclasses.asdict(trend)
    if scaled is not None:
        report["scaled_trend"] = dataclasses.asdict(scaled)
    if vol_levels is not None:
        report["vol_managed"] = {name: dataclasses.asdict(timings[name]) for name in VOL_MANAGED}
    report["position_rate"] = float(rate)
    return _json_ready(report), backtests


def start_rule_of(specialists) -> ScaledTrend | None:
    """The scaled trend the specialists start at (`SpecialistAgents.start_rule`), or None."""
    rule = getattr(specialists, "start_rule", None)
    if rule is None:
        return None
    return ScaledTrend(**{f.name: rule[f.name] for f in dataclasses.fields(ScaledTrend) if f.name in rule})


def vol_managed(make_inner, market: MarketData, levels: VolLevels, timing: VolTiming, size: float, device):
    """A maker of `make_inner`'s policy scaled by the volatility appetite of `timing` on `market`."""
    appetite = torch.as_tensor(vol_appetite(market, levels, timing), dtype=torch.float32, device=device)
    return lambda rows: VolManagedPolicy(make_inner(rows), appetite, size)


def with_start_rule(timings: dict | None, meta) -> dict | None:
    """`timings` with `vol_managed_equal_allocation` set to the rule a risk-timing `meta` starts from (its stored
    choice, picked on the validation split by Phase 2; `evaluate_portfolio` runs it on the training levels the
    meta-controller stored, which differ on another draw of the market), if it has one: "system minus
    vol_managed_equal_allocation" then measures what training moved the meta-controller from its own start.
    Why: a second pick of the same rule by another validation run (the test evaluation's 8 segments against
    Phase 2's 16) can choose another half-life (bench seed 2: 10 against 20 bars; its meta-controller, at its
    start, trailed that other rule by 0.08 on test)."""
    if timings is None or meta is None or meta.timing is None:
        return timings
    return {**timings, "vol_managed_equal_allocation": start_timing(meta.timing)}


def pick_timings(backtests: dict[str, Backtest], val: MarketData, levels: VolLevels, cfg: Config) -> dict:
    """Each volatility-managed baseline's half-life and power, picked on the validation split `val` from the
    unscaled policy's backtest there (`rules.pick_vol_timing`)."""
    cost = cost_rates(val, cfg, "cpu").double().numpy()
    out = {}
    for name, inner in VOL_MANAGED.items():
        bt = backtests[inner]
        gross = bt.pnl.sum(-1) + bt.cost  # the trading return before costs
        out[name] = pick_vol_timing(val, levels, bt.bars, gross, bt.weights, bt.segment_length, cost,
                                    cfg.reward.risk_free_rate)  # fmt: skip
    return out


def validation_timings(specialists, val: MarketData, cfg: Config, trend: TrendFilter, levels: VolLevels, device="cpu",
                       segments: int = 8, tables: MarketTables | None = None) -> dict[str, VolTiming]:  # fmt: skip
    """The volatility-managed baselines' choices for a test evaluation: the equal allocation and the trend
    filter backtested on the validation split (`segments` pieces), then `pick_timings`."""
    tables = tables or build_tables(val, cfg, device)
    where = tables.prices.device
    owner = instrument_specialist_index(val.sectors, specialists.names).to(where)
    size, rate = cfg.environment.max_position_size, specialists.position_rate
    makers = {
        "equal_allocation": lambda rows: HierarchyPolicy(specialists, None, owner, size, rows, where),
        "trend_filter": lambda rows: baseline_policies(val, cfg, trend, where, rate)["trend_filter"],
    }
    return pick_timings(run_backtests(val, cfg, makers, segments, device, tables), val, levels, cfg)


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
        "baselines": {name: backtest_metrics(bt, rf) for name, bt in backtests.items() if name in REFERENCES},
        **({"phase2_system": backtest_metrics(backtests["phase2_system"], rf)} if "phase2_system" in backtests else {}),
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
    if confidence:
        report["confidence"] = confidence_stats(backtests, rf)
    report["relative_targets"] = relative_targets(report)
    if system.appetite is not None:
        report["meta_appetite"] = appetite_stats(system)
    return report
