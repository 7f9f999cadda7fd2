"""The per-bar exports and the tear sheet: returns.csv, equity.csv and weights.csv read back with pandas give the
report's Sharpe ratios, the equity and the system's book; the tear-sheet tables are right on hand-made series; a
backtest shorter than a year is handled; the equity figure puts every policy at the system's volatility and its
drawdown axis reads at any scale."""

import dataclasses
import math
import os

import numpy as np
import pandas as pd
import pytest

from mtq_common.evaluation import metrics
from mtq_common.evaluation.backtest import Backtest
from mtq_common.evaluation.plots import TEARSHEET_SIZE, equity_figure, percent_decimals, tearsheet_figure
from mtq_common.evaluation.portfolio_eval import evaluate_portfolio, relative_targets, report_from_backtests
from mtq_common.evaluation.report import FILES, write_report
from mtq_common.evaluation.rules import RULES
from mtq_common.evaluation.tearsheet import (
    date_labels,
    period_returns,
    rolling_sharpe_and_vol,
    shown_rule,
    tearsheet_markdown,
    worst_drawdowns,
)
from mtq_common.training.checkpoint import atomic_write_json
from tests.helpers import untrained_agents
from tests.test_report import check_png


@pytest.fixture(scope="module")
def evaluated(market, cfg, trend):
    """One continuous backtest of the test split (as `pipeline.py --mode eval` runs it), untrained agents."""
    return evaluate_portfolio(*untrained_agents(market, cfg), market, cfg, trend, segments=1, phase="final")


@pytest.fixture(scope="module")
def written(evaluated, tmp_path_factory):
    report, backtests = evaluated
    return write_report(report, backtests, tmp_path_factory.mktemp("exports") / "eval")


def read(path) -> pd.DataFrame:
    return pd.read_csv(path, index_col="date")


def head(bt: Backtest, n: int) -> Backtest:
    """The first n bars of a backtest (every per-bar array cut)."""
    arrays = {f.name: getattr(bt, f.name) for f in dataclasses.fields(bt)}
    cut = {name: value[:n] for name, value in arrays.items() if isinstance(value, np.ndarray)}
    return dataclasses.replace(bt, **cut, segment_length=n)


# ---------------------------------------------------------------------------------------------
# returns.csv, equity.csv, weights.csv
# ---------------------------------------------------------------------------------------------


def test_sharpe_recomputed_from_returns_csv_equals_the_reports_for_every_policy(evaluated, written):
    report, backtests = evaluated
    returns = read(written["returns"])
    assert list(returns.columns) == ["system", "equal_allocation", *report["baselines"]]
    policies = {"system": report["portfolio"], "equal_allocation": report["equal_allocation"], **report["baselines"]}
    bars_per_year, rf = report["data"]["bars_per_year"], report["data"]["risk_free_rate"]
    assert rf == 0.02  # the config's rate, stated in the report so the file alone suffices
    for name, m in policies.items():
        excess = returns[name] - rf / bars_per_year  # what a user types in pandas
        sharpe = excess.mean() / excess.std(ddof=1) * math.sqrt(bars_per_year)
        assert sharpe == pytest.approx(m["sharpe"], rel=1e-9), name
        np.testing.assert_array_equal(returns[name].to_numpy(), backtests[name].net_return)  # bit for bit


def test_dates_are_unique_iso_dates_when_each_return_was_earned(evaluated, written, market):
    report, backtests = evaluated
    returns = read(written["returns"])
    dates = pd.to_datetime(returns.index, format="%Y-%m-%d")
    assert dates.is_unique and dates.is_monotonic_increasing
    system = backtests["system"]
    np.testing.assert_array_equal(dates.to_numpy(), market.timestamps[system.bars + 1].astype("datetime64[ns]"))
    assert returns.index[-1] == report["data"]["end"] and returns.index[0] > report["data"]["start"]
    assert len(returns) == report["data"]["bars"]


def test_equity_csv_is_the_compounded_returns_and_weights_csv_the_systems_book(evaluated, written):
    _, backtests = evaluated
    returns, equity, weights = (read(written[key]) for key in ("returns", "equity_csv", "weights"))
    assert list(equity.columns) == list(returns.columns) and list(equity.index) == list(returns.index)
    np.testing.assert_allclose(equity.to_numpy(), (1.0 + returns).cumprod().to_numpy(), rtol=1e-12)
    system = backtests["system"]
    assert list(weights.columns) == system.symbols and list(weights.index) == list(returns.index)
    np.testing.assert_array_equal(weights.to_numpy(), system.weights)


def test_tearsheet_png_and_the_markdown_section_are_written(evaluated, written):
    report, backtests = evaluated
    assert set(FILES.values()) == {p.name for p in written["json"].parent.iterdir()}  # nothing else, no temporary
    check_png(written["tearsheet"], TEARSHEET_SIZE)
    text = written["markdown"].read_text()
    section = text[text.index("## Tear sheet") : text.index("## Figures")]
    table = period_returns(backtests["system"].net_return, backtests["system"].end_timestamps)
    year = table.index[1]  # a full year of the 600-bar split
    row = next(line for line in section.splitlines() if line.startswith(f"| {year} |"))
    assert row.split("|")[-2].strip() == f"{table.loc[year, 'year']:+.2%}"
    assert "best rule: `" in section and "| system |" in section and "(tearsheet.png)" in section
    for name in ("returns.csv", "equity.csv", "weights.csv", "tearsheet.png"):
        assert f"({name})" in text


def test_the_tear_sheets_best_rule_is_the_one_the_reports_targets_name(evaluated):
    report, backtests = evaluated
    targets = next(t for t in relative_targets(report) if t["target"].startswith(">= "))  # the best rule + margin
    assert shown_rule(report, backtests) == targets["target"].split()[1]
    # a baseline that is not one of the rules (here the volatility-managed allocation) never stands in for them,
    # however high its Sharpe ratio
    names = [n for n in report["baselines"] if n not in RULES]
    assert names and all(n in backtests for n in names)
    lifted = {**report, "baselines": {n: {**m, "sharpe": m["sharpe"] + (100.0 if n in names else 0.0)}
                                      for n, m in report["baselines"].items()}}  # fmt: skip
    assert shown_rule(lifted, backtests) == shown_rule(report, backtests) in RULES
    section = tearsheet_markdown(lifted, backtests)
    assert f"best rule: `{shown_rule(report, backtests)}`" in section


def test_written_files_get_the_umasks_permissions_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "report.json", {"sharpe": 1.0})
    finally:
        os.umask(old)
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644  # (a temporary file from mkstemp: 0o600)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_backtest_on_other_bars_is_refused_before_any_file_is_written(evaluated, tmp_path):
    report, backtests = evaluated
    shifted = {**backtests, "momentum": dataclasses.replace(backtests["momentum"], bars=backtests["momentum"].bars + 1)}
    with pytest.raises(ValueError, match="momentum backtest"):
        write_report(report, shifted, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


# ---------------------------------------------------------------------------------------------
# The tear-sheet tables on hand-made series
# ---------------------------------------------------------------------------------------------


def test_worst_drawdowns_and_monthly_returns_of_a_hand_made_series():
    dates = np.busday_offset(np.datetime64("2021-01-04", "D"), np.arange(120), roll="forward")
    r = np.zeros(120)
    r[2] = -0.01  # a 1% drawdown from the capital (last at the peak on bar 1), recovered on bar 5
    r[5] = 0.10  # a peak, held flat to bar 9 (the last bar at the peak)
    r[10], r[12] = -0.20, -0.05  # trough after bar 12, 1 - 0.8 * 0.95 = 24% below the peak
    r[30] = 1.0 / 0.76 - 1.0 + 0.001  # above the peak again on bar 30
    r[40] = -0.03  # a 3% drawdown from the new peak (last at it on bar 39), never recovered
    found = worst_drawdowns(r, count=5)
    assert [(p["peak"], p["trough"], p["recovery"]) for p in found] == [(9, 12, 30), (39, 40, None), (1, 2, 5)]
    np.testing.assert_allclose([p["depth"] for p in found], [1.0 - 0.8 * 0.95, 0.03, 0.01], rtol=1e-12)
    assert worst_drawdowns(r, count=1) == found[:1]
    assert worst_drawdowns(np.full(10, 0.001)) == []  # never below a peak
    first = worst_drawdowns(np.r_[-0.02, 0.01, 0.05])[0]  # a loss on the first bar: the peak is the capital
    assert (first["peak"], first["trough"], first["recovery"]) == (-1, 0, 2)

    table = period_returns(r, dates)  # business days from Monday 4 January: bars 0..19 are January
    assert list(table.index) == [2021] and str(dates[19]) == "2021-01-29" and str(dates[20]) == "2021-02-01"
    assert table.loc[2021, 1] == pytest.approx(0.99 * 1.10 * 0.80 * 0.95 - 1.0, rel=1e-12)
    assert table.loc[2021, 2] == pytest.approx(r[30], rel=1e-12)  # bar 30 is 15 February
    assert table.loc[2021, "year"] == pytest.approx(np.prod(1.0 + r) - 1.0, rel=1e-12)
    assert np.isnan(table.loc[2021, 12])  # no bar in December
    assert period_returns(r, np.arange(120)) is None  # bar numbers: no calendar


def test_the_markdown_tables_a_hand_made_drawdown_with_its_dates(evaluated):
    report, backtests = evaluated
    system = backtests["system"]
    r = np.full(len(system.net_return), 0.0001)
    r[100], r[110] = -0.05, -0.02  # peak after bar 99, trough after bar 110
    r[200] = 1.0 / (0.95 * 0.98) - 1.0 + 0.01  # recovered (and above) on bar 200
    bt = dataclasses.replace(system, net_return=r)
    labels = date_labels(bt.end_timestamps, bt.bars_per_day)
    text = tearsheet_markdown(report, {**backtests, "system": bt})
    depth = 1.0 - 0.95 * 1.0001**9 * 0.98  # bars 101..109 gain 0.01% each
    assert f"| 1 | {labels[99]} | {labels[110]} | {labels[200]} | {-depth:.2%} | 101 |" in text
    assert "| 2 |" not in text  # the only drawdown


def test_rolling_statistics_are_the_metrics_of_each_one_year_window(evaluated):
    _, backtests = evaluated
    bt = backtests["system"]
    rolling = rolling_sharpe_and_vol(bt.net_return, bt.bars_per_year, 0.02)
    window = round(bt.bars_per_year)
    assert rolling["ends"][0] == window - 1 and rolling["ends"][-1] == len(bt.net_return) - 1
    for k in (0, len(rolling["ends"]) // 2, -1):
        piece = bt.net_return[rolling["ends"][k] - window + 1 : rolling["ends"][k] + 1]
        assert rolling["sharpe"][k] == pytest.approx(metrics.sharpe(piece, bt.bars_per_year, 0.02), rel=1e-12)
        assert rolling["volatility"][k] == pytest.approx(metrics.annual_volatility(piece, bt.bars_per_year))


def test_a_backtest_shorter_than_a_year_gets_exports_and_says_so(evaluated, cfg, tmp_path):
    report, backtests = evaluated
    short = {name: head(bt, 100) for name, bt in backtests.items()}
    data = {"source": "synthetic", "split": "test", "end": date_labels(short["system"].end_timestamps[-1:], 1.0)[0]}
    short_report = report_from_backtests(short, ["forex", "commodities", "equity"], cfg.reward.risk_free_rate,
                                         "final", data)  # fmt: skip
    paths = write_report(short_report, short, tmp_path)
    text = paths["markdown"].read_text()
    assert "100 bars, less than one year (252 bars): no rolling" in text
    returns = read(paths["returns"])
    assert len(returns) == 100
    excess = returns["system"] - cfg.reward.risk_free_rate / 252
    assert excess.mean() / excess.std() * math.sqrt(252) == pytest.approx(short_report["portfolio"]["sharpe"], rel=1e-9)
    check_png(paths["tearsheet"], TEARSHEET_SIZE)
    fig = tearsheet_figure(short_report, short)
    notes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert sum("less than one year" in t for t in notes) == 2  # the Sharpe and the volatility panels
    assert rolling_sharpe_and_vol(returns["system"], 252, 0.02)["sharpe"].size == 0


def test_date_labels_for_intraday_and_numbered_bars():
    hours = np.datetime64("2024-03-01T00:00") + np.arange(5) * np.timedelta64(1, "h")
    assert date_labels(hours, 24.0) == [f"2024-03-01T0{h}:00" for h in range(5)]
    seconds = np.datetime64("2024-03-01T10:00:00") + np.arange(3) * np.timedelta64(20, "s")
    assert date_labels(seconds, 3000.0) == ["2024-03-01T10:00:00", "2024-03-01T10:00:20", "2024-03-01T10:00:40"]
    assert date_labels(np.arange(3), 1.0) == ["0", "1", "2"]


# ---------------------------------------------------------------------------------------------
# The equity figure
# ---------------------------------------------------------------------------------------------


def _curves(fig) -> dict[str, np.ndarray]:
    """The equity curves drawn, by policy name (the first word of the legend label)."""
    return {line.get_label().split(" ")[0]: np.asarray(line.get_ydata()) for line in fig.axes[0].get_lines()
            if not line.get_label().startswith("_")}  # fmt: skip


def test_equity_figure_puts_every_policy_at_the_systems_volatility_with_its_sharpe(evaluated):
    report, backtests = evaluated
    fig = equity_figure(report, backtests)
    curves = _curves(fig)
    assert set(curves) == set(backtests)
    system = backtests["system"]
    target = metrics.annual_volatility(system.net_return, system.bars_per_year)
    policies = {"system": report["portfolio"], "equal_allocation": report["equal_allocation"], **report["baselines"]}
    for name, equity in curves.items():
        r = equity / np.r_[1.0, equity[:-1]] - 1.0
        assert metrics.annual_volatility(r, system.bars_per_year) == pytest.approx(target, rel=1e-9), name
        assert metrics.sharpe(r, system.bars_per_year, 0.02) == pytest.approx(policies[name]["sharpe"], rel=1e-9)
    assert "each policy scaled to the system's volatility" in fig.texts[0].get_text()  # the suptitle
    title = fig.axes[0].get_title()
    assert "one continuous backtest" in title and "dotted" not in title
    assert not any(line.get_linestyle() == ":" for ax in fig.axes for line in ax.get_lines())


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_drawdown_axis_reads_at_any_scale(evaluated, scale):
    report, backtests = evaluated
    small = {**backtests, "system": dataclasses.replace(backtests["system"],
                                                        net_return=backtests["system"].net_return * scale)}  # fmt: skip
    fig = equity_figure(report, small)
    fig.canvas.draw()
    ax_dd = fig.axes[1]
    low, high = ax_dd.get_ylim()
    labels = [t.get_text() for t in ax_dd.get_yticklabels() if low <= t.get_position()[1] <= high]
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels  # never "0.0%" on every tick
    assert all(label.endswith("%") for label in labels)


def test_percent_decimals_follow_the_tick_step():
    assert [percent_decimals(s) for s in (0.05, 0.01, 0.005, 0.0025, 0.0005, 0.00005)] == [0, 0, 1, 2, 2, 3]
