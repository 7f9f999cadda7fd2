"""The report writer: every file written atomically, JSON equal to the report, a readable Markdown page,
PNGs that are real images, sleeves that add up, and a CSV-like report (no oracle, volatility terciles)."""

import dataclasses
import json
import math

import matplotlib.image
import numpy as np
import pytest

from mtq_common.data.market import REGIME_NAMES
from mtq_common.evaluation import report as report_writer
from mtq_common.evaluation.plots import (
    ALLOCATION_SIZE,
    DPI,
    EQUITY_SIZE,
    allocation_figure,
    drawdown,
    equity_figure,
    sleeve_performance,
)
from mtq_common.evaluation.portfolio_eval import evaluate_portfolio
from mtq_common.evaluation.report import FILES, markdown_report, write_report
from tests.helpers import untrained_agents

SEGMENTS = 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = (
    "## System vs baselines",
    "## Allocation efficiency",
    "## Targets",
    "## Per regime",
    "## Per specialist",
    "## Limits",
    "## Figures",
)
EPISODES = {
    "sharpe": {"mean": 0.8, "std": 0.3, "min": 0.4, "max": 1.2},
    "max_drawdown": {"mean": 0.05, "std": 0.01, "min": 0.03, "max": 0.07},
}


@pytest.fixture(scope="module")
def agents(market, cfg):
    return untrained_agents(market, cfg)


@pytest.fixture(scope="module")
def evaluated(agents, market, cfg, trend):
    return evaluate_portfolio(*agents, market, cfg, trend, segments=SEGMENTS, phase=2)


@pytest.fixture(scope="module")
def csv_evaluated(agents, market, cfg, trend):
    """The same bars without the generator's truth (as a CSV market), and the equal allocation as the system."""
    csv = dataclasses.replace(market, source="csv", regime=None, drift=None)
    return evaluate_portfolio(agents[0], None, csv, cfg, trend, segments=SEGMENTS, phase="final")


def check_png(path, size):
    """A real PNG of `size` inches at DPI, with more than one colour in it."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    width, height = size
    assert image.shape[:2] == (round(height * DPI), round(width * DPI))
    assert image.shape[2] in (3, 4)
    rgb = np.round(image[..., :3] * 255).astype(np.int64)
    colours = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
    assert len(colours) > 50, "an almost blank image"
    assert image[..., :3].std() > 0.05


def leftovers(folder):
    """Files that are not a finished output (the atomic writer's temporaries are dot-files)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in FILES.values())


# ---------------------------------------------------------------------------------------------
# The files
# ---------------------------------------------------------------------------------------------


def test_every_file_is_written_and_the_json_is_the_report(evaluated, tmp_path):
    report, backtests = evaluated
    paths = write_report(report, backtests, tmp_path / "eval", episodes=EPISODES)
    assert paths == {key: tmp_path / "eval" / name for key, name in FILES.items()}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert leftovers(tmp_path / "eval") == []

    text = paths["json"].read_text()
    assert json.loads(text) == {**report, "episodes": EPISODES}
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in report.json"))  # strict: no NaN / Infinity
    keys = list(json.loads(text))
    assert keys == sorted(keys)
    check_png(paths["equity"], EQUITY_SIZE)
    check_png(paths["allocation"], ALLOCATION_SIZE)


def test_markdown_has_every_section_a_verdict_per_target_and_every_policy(evaluated, tmp_path):
    report, backtests = evaluated
    text = write_report(report, backtests, tmp_path, title="Phase 2 check", episodes=EPISODES)["markdown"].read_text()
    assert text.startswith("# Phase 2 check\n")
    assert text == markdown_report(report, backtests, EPISODES, title="Phase 2 check")
    positions = [text.index(heading) for heading in (*SECTIONS[:5], "## Evaluation episodes", *SECTIONS[5:])]
    assert positions == sorted(positions), "the sections come in the documented order"

    lines = text.splitlines()
    data = report["data"]
    assert any(str(data["bars"]) in line and data["start"] in line and data["split"] in line for line in lines[:4])
    table_rows = {}  # the first table naming a policy is the comparison table (the risk layer's comes later)
    for line in lines:
        if line.startswith("| "):
            table_rows.setdefault(line.split("|")[1].strip().strip("*"), line)
    for name in ["system", "equal_allocation", *report["baselines"]]:
        assert name in table_rows, name
    assert f"{report['portfolio']['sharpe']:+.2f}" in table_rows["system"]

    targets = lines[lines.index(f"## Targets (phase {report['phase']})") :]
    for target in report["targets"]:
        label = report_writer._LABELS[target["metric"]]
        row = next(line for line in targets if line.startswith(f"| {label} |"))
        assert ("PASS" if target["pass"] else "FAIL") in row and ("FAIL" if target["pass"] else "PASS") not in row
    for regime in REGIME_NAMES:
        assert f"| {regime} |" in text
    for name in ("forex", "commodities", "equity"):
        assert f"| {name} |" in text
    assert "+0.80 ± 0.30" in text and "5.0% ± 1.0%" in text
    assert "(equity.png)" in text and "(allocation.png)" in text
    assert f"<= {report['limits']['max_var']:g}" in text and "Every limit applies." in text
    assert "## Risk layer" in text and "trend_filter: half-life" in text
    # a limit that is not applied (None in the report) is said so, with its note
    note = "max_sector_allocation is not applied: the universe has one sector"
    not_applied = {**report, "limits": {**report["limits"], "max_sector": None, "notes": [note]}}
    text = markdown_report(not_applied, backtests)
    assert note in text and "Every limit applies." not in text
    assert f"- {report_writer.LIMIT_LABELS['max_sector']}: not applied" in text


def test_writing_twice_replaces_the_files_and_leaves_no_temporaries(evaluated, tmp_path):
    report, backtests = evaluated
    write_report(report, backtests, tmp_path, episodes=EPISODES)
    paths = write_report(report, backtests, tmp_path)  # the second time without episodes
    assert leftovers(tmp_path) == []
    assert "episodes" not in json.loads(paths["json"].read_text())
    assert "## Evaluation episodes" not in paths["markdown"].read_text()
    check_png(paths["equity"], EQUITY_SIZE)


def test_a_non_finite_report_is_refused_before_any_file_is_written(evaluated, tmp_path):
    report, backtests = evaluated
    broken = {**report, "portfolio": {**report["portfolio"], "sharpe": math.nan}}
    with pytest.raises(ValueError, match=r"portfolio\.sharpe"):
        write_report(broken, backtests, tmp_path / "eval")
    assert not (tmp_path / "eval").exists() or list((tmp_path / "eval").iterdir()) == []


def test_a_csv_like_report_renders(csv_evaluated, tmp_path):
    report, backtests = csv_evaluated
    assert "oracle" not in report["baselines"]
    paths = write_report(report, backtests, tmp_path)
    text = paths["markdown"].read_text()
    for heading in SECTIONS:
        assert heading in text
    for tercile in ("low_vol", "mid_vol", "high_vol"):
        assert f"| {tercile} |" in text
    assert "terciles of the realised volatility" in text and "oracle" not in text
    assert json.loads(paths["json"].read_text()) == report
    check_png(paths["equity"], EQUITY_SIZE)
    check_png(paths["allocation"], ALLOCATION_SIZE)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# What the figures and the specialist table show
# ---------------------------------------------------------------------------------------------


def test_equity_figure_draws_every_policy_and_the_systems_drawdown(evaluated):
    report, backtests = evaluated
    fig = equity_figure(report, backtests)
    ax, ax_dd = fig.axes
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [label.split(" ")[0] for label in labels] == list(backtests)
    system = next(line for line in ax.get_lines() if line.get_label().startswith("system"))
    np.testing.assert_allclose(system.get_ydata(), backtests["system"].equity)
    dd = drawdown(backtests["system"].net_return)
    assert -dd.min() == pytest.approx(report["portfolio"]["max_drawdown"])
    assert ax_dd.get_xlabel() == "date"
    assert f"{report['data']['segments']} parallel segments" in ax.get_title()
    # bar index when the timestamps are not dates; a log axis on request
    numbered = {name: dataclasses.replace(bt, timestamps=np.arange(len(bt.bars))) for name, bt in backtests.items()}
    fig = equity_figure(report, numbered, log_scale=True)
    assert fig.axes[1].get_xlabel().startswith("bar") and fig.axes[0].get_yscale() == "log"
    assert "log scale" in fig.axes[0].get_ylabel()


def test_allocation_figure_stacks_the_exposure_shares_and_draws_the_meta_allocation(evaluated):
    report, backtests = evaluated
    fig = allocation_figure(report, backtests)
    stack, meta = fig.axes[:2]
    assert len(stack.collections) == 3  # one area per specialist
    np.testing.assert_allclose(
        [line.get_ydata() for line in meta.get_lines() if not line.get_label().startswith("_")],
        backtests["system"].allocation.T,
    )
    # the sum of the stacked shares is 1 on a held bar and 0 on a flat one
    top = stack.collections[-1].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(1.0)
    without = {**backtests, "system": dataclasses.replace(backtests["system"], allocation=None)}
    assert len(allocation_figure(report, without).axes) == 1  # no allocation recorded: no second panel


def test_specialist_sleeves_add_up_to_the_account(evaluated, cfg):
    report, backtests = evaluated
    bt = backtests["system"]
    names = ["forex", "commodities", "equity"]
    sleeves = sleeve_performance(bt, names)
    assert [s for name in names for s in sleeves[name]["instruments"]] == bt.symbols
    assert sum(s["exposure_share"] for s in sleeves.values()) == pytest.approx(1.0)
    cash = cfg.reward.risk_free_rate / bt.bars_per_year * len(bt.net_return)
    total = sum(s["total_pnl"] for s in sleeves.values())
    assert total + cash == pytest.approx(bt.net_return.sum(), abs=1e-6)
    forex = bt.pnl[:, [bt.instrument_sectors.index("forex") + k for k in range(3)]].sum(1)
    assert sleeves["forex"]["sharpe"] == pytest.approx(forex.mean() / forex.std(ddof=1) * math.sqrt(bt.bars_per_year))
    # a specialist without instruments has an empty, zero sleeve
    assert sleeve_performance(bt, [*names, "crypto"])["crypto"] == {
        "instruments": [],
        "sharpe": 0.0,
        "total_pnl": 0.0,
        "exposure_share": 0.0,
    }
