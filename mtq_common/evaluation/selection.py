"""Which iterate a phase's `best.pt` holds: the rules by which a PPO iterate (or Phase 3's joint sizing)
replaces the phase's starting point (Phases 2 and 3).

* ``gain_over_start``: a confident Sharpe gain over the start on validation (`--replace-confidence`);
* ``turnover_against_momentum``: DESIGN 14's T on validation, with the same confidence;
* ``holds_on_train``: Phase 3's check of such an iterate on the training split (`--train-check`).

Why rules and not the highest validation Sharpe: `best.pt` is the highest of many noisy validations, and such
winners lost to their start on other paths of the market and on test (docs/benchmarks.md).
"""

from __future__ import annotations

import math

from mtq_common.evaluation import bootstrap, metrics
from mtq_common.training.config import ConfigError


def check_replace_confidence(replace_confidence: float) -> None:
    """`--replace-confidence` of Phases 2 and 3: 0 (off) or a confidence below 1; anything else a `ConfigError`."""
    if not 0.0 <= replace_confidence < 1.0:
        raise ConfigError(f"--replace-confidence {replace_confidence}: accepted 0 (off) up to, not including, 1")


def gain_over_start(returns, start_returns, bars_per_year, risk_free_rate, replace_confidence: float) -> dict:
    """The rule by which an iterate may replace a phase's starting point in `best.pt` (Phases 2 and 3): its
    validation `returns` against the start's on the same bars, `paired_sharpe_difference` at `replace_confidence`
    (0.9 where it is 0, which only logs the interval), plus `replaces`: with `replace_confidence` 0 always (any
    higher Sharpe wins), else only where the interval's low end is above 0."""
    gain = bootstrap.paired_sharpe_difference(returns, start_returns, bars_per_year, risk_free_rate,
                                              confidence=replace_confidence or 0.9)  # fmt: skip
    return {**gain, "replaces": replace_confidence == 0 or gain["low"] > 0}


def turnover_against_momentum(backtests: dict, replace_confidence: float, start_ratio: float | None = None) -> dict:
    """DESIGN 14's T on a validation of Phase 2 or 3: the system's turnover per unit of volatility over momentum's
    on the same bars (`backtests` of `evaluate_portfolio`), `turnover_ratio` at `replace_confidence` (0.9 where it
    is 0), plus `within`: the interval's high end at most 1 (with `replace_confidence` 0, the ratio itself), or the
    ratio at most the start's `start_ratio` (an iterate that trades no more than its start). An iterate replaces
    its start only where it is within, if the start itself is (its ratio at most 1). Why the high end: the ratio
    moves between splits. On seed 1 of the built-in market, Phase 2's iterates on the Sharpe reward held 0.97-0.99x
    momentum's on validation and 1.02-1.03x on test; the high end is 6-7% above the ratio there."""
    system, momentum = backtests["system"], backtests["momentum"]
    found = bootstrap.turnover_ratio(system.traded, system.net_return, momentum.traded, momentum.net_return,
                                     confidence=replace_confidence or 0.9)  # fmt: skip
    confident = (found["high"] if replace_confidence else found["ratio"]) <= 1.0
    return {**found, "within": confident or (start_ratio is not None and found["ratio"] <= start_ratio)}


def holds_on_train(backtests: dict, start: dict, bars_per_year: float, risk_free_rate: float) -> dict:
    """Phase 3's last check of an iterate that passed on validation: on the training split (`backtests` of the
    iterate, `start` of the start, each with "system" and "momentum" as `allocation_fit.start_backtests` gives
    them) its turnover per unit of volatility over momentum's is at most the larger of 1 and the start's, and its
    Sharpe ratio is no lower than the start's. Returns `{"ratio", "start_ratio", "sharpe", "start_sharpe",
    "holds"}` (Sharpe ratios annualised, over `risk_free_rate`).

    Why (docs/benchmarks.md): under the curriculum Phase 3's updates never see this split (fresh paths), and
    validation misled: its regime mix differs (momentum trades 0.76 per unit of volatility there, 0.69 on test),
    and iterates at 0.91-0.95x momentum's there traded up to 1.05x on train and 1.06x on test; its Sharpe ratio
    lagged a decline (seed 1's highest, iteration 50, was below the start on train and on test)."""
    ref = bootstrap.turnover_per_volatility(start["momentum"].traded, start["momentum"].net_return)

    def facts(bt):  # (turnover per unit of volatility over momentum's, Sharpe ratio)
        ratio = float(bootstrap.turnover_per_volatility(bt.traded, bt.net_return) / ref) if ref > 0 else math.inf
        return ratio, float(metrics.sharpe(bt.net_return, bars_per_year, risk_free_rate))

    (ratio, sharpe), (start_ratio, start_sharpe) = facts(backtests["system"]), facts(start["system"])
    holds = ratio <= max(1.0, start_ratio) and sharpe >= start_sharpe
    return {"ratio": ratio, "start_ratio": start_ratio, "sharpe": sharpe, "start_sharpe": start_sharpe, "holds": holds}
