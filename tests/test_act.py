"""--mode act: the target book for the next bar equals what the continuous test backtest traded, bad input refused."""

import shutil

import numpy as np
import pandas as pd
import pytest

import phase3_joint
import pipeline
from mtq_common import checkpoint as ckpt
from mtq_common.act import target_book
from mtq_common.backtest import run_backtests
from mtq_common.config import ConfigError, load_config
from mtq_common.hierarchy import HierarchyPolicy, instrument_specialist_index, load_specialists
from mtq_common.market import load_splits
from mtq_common.nets import MetaController


@pytest.fixture(scope="module")
def trained(tiny_phases, tmp_path_factory):
    """A pipeline output folder (phase1 and phase3 best.pt) from the tiny Phase 1 and 2 runs, its config,
    and the hierarchy itself."""
    _, config, (phase1_dir, phase2_dir) = tiny_phases
    cfg = load_config(config)
    out = tmp_path_factory.mktemp("act_run")
    shutil.copytree(phase1_dir, out / "phase1")
    test = load_splits(cfg)["test"]
    specialists, owner = load_specialists(phase1_dir, test, "cpu")
    state = ckpt.load_checkpoint(phase2_dir / "best.pt", "phase2")
    meta = MetaController.from_spec(state)
    meta.load_state_dict(state["model"])
    states = {"specialists": specialists.state_dict(), "meta": meta.state_dict()}
    ckpt.save_checkpoint(out / "phase3" / "best.pt", phase3_joint.model_payload(states, specialists, meta, cfg))
    return out, config, cfg, specialists, meta


def test_acting_on_data_cut_at_a_bar_gives_what_the_test_backtest_traded_there(trained):
    _, _, cfg, specialists, meta = trained
    test = load_splits(cfg)["test"]
    owner = instrument_specialist_index(test.sectors, specialists.names)
    size = cfg.environment.max_position_size

    def system(rows):
        return HierarchyPolicy(specialists, meta, owner, size, rows, "cpu")

    backtest = run_backtests(test, cfg, {"system": system}, segments=1)["system"]
    for t in (backtest.bars[0] + 1, backtest.bars[0] + 37, backtest.bars[-1] - 5):  # act needs 2 bars after warm-up
        book = target_book(specialists, meta, test.window(0, t + 1, "test"), cfg)
        executed = np.array([book["instruments"][s]["executed_weight"] for s in test.symbols], dtype=np.float32)
        k = int(np.flatnonzero(backtest.bars == t)[0])
        np.testing.assert_array_equal(executed, backtest.weights[k].astype(np.float32))
        assert book["last_bar"] == str(test.timestamps[t])[:10]


def test_same_data_same_book_and_units(trained):
    _, _, cfg, specialists, meta = trained
    data = load_splits(cfg)["test"].window(0, 400, "test")
    a = target_book(specialists, meta, data, cfg, capital=100_000.0)
    b = target_book(specialists, meta, data, cfg, capital=100_000.0)
    assert a == b
    for symbol, row in a["instruments"].items():
        assert row["units"] == pytest.approx(row["executed_weight"] * 100_000.0 / row["close"]), symbol
        assert row["trade_weight"] == pytest.approx(row["executed_weight"] - row["current_weight"])
    assert a["book"]["gross"] == pytest.approx(sum(abs(r["executed_weight"]) for r in a["instruments"].values()))


def test_pipeline_act_writes_the_book(trained, tmp_path):
    out, config, *_ = trained
    result = pipeline.main(pipeline.Args(mode="act", config=str(config), output_dir=str(out),
                                         log_dir=str(tmp_path / "logs"), capital=50_000.0))  # fmt: skip
    assert (out / "act").is_dir() and result["path"].endswith(f"book-{result['book']['last_bar']}.json")


def write_csv(folder, symbols, prices, dates):
    folder.mkdir(parents=True, exist_ok=True)
    for i, symbol in enumerate(symbols):
        pd.DataFrame({"date": dates, "close": prices[:, i]}).to_csv(folder / f"{symbol}.csv", index=False)


@pytest.mark.parametrize("case", ["untrained", "instruments", "short", "stale", "unsorted"])
def test_bad_input_is_refused_and_writes_nothing(trained, tmp_path, case):
    out, config, cfg, *_ = trained
    market = load_splits(cfg)["test"]
    args = dict(mode="act", config=str(config), output_dir=str(out), log_dir=str(tmp_path / "logs"),
                as_of="2030-01-10")  # fmt: skip
    dates = pd.bdate_range("2020-01-01", periods=market.num_bars).strftime("%Y-%m-%d").to_numpy()
    data = tmp_path / "data"
    if case == "untrained":
        args["output_dir"] = str(tmp_path / "nothing")
        error, words = ckpt.CheckpointError, "pipeline.py --mode train"
    elif case == "instruments":
        args["instruments"] = list(market.symbols[:4])
        error, words = ConfigError, "does not match"
    elif case == "short":
        write_csv(data, market.symbols, market.prices[:60], dates[:60])
        args["data_dir"], args["as_of"] = str(data), dates[59]
        error, words = ValueError, "acting needs at least"
    elif case == "stale":
        write_csv(data, market.symbols, market.prices, dates)
        args["data_dir"] = str(data)
        error, words = ConfigError, "stale"
    else:
        swapped = market.prices.copy()
        shuffled = dates.copy()
        shuffled[[100, 101]] = shuffled[[101, 100]]
        write_csv(data, market.symbols, swapped, shuffled)
        args["data_dir"], args["as_of"] = str(data), dates[-1]
        error, words = ValueError, "strictly increasing"
    shutil.rmtree(out / "act", ignore_errors=True)
    with pytest.raises(error, match=words):
        pipeline.main(pipeline.Args(**args))
    assert not (out / "act").exists()
