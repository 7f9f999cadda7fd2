"""--mode act: the target book for the next bar equals what the continuous test backtest traded, trades from the
held book in whole contracts, `load_policy(run).book(prices)` gives the same book, bad input refused."""

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest

import phase3_joint
import pipeline
from mtq_common import load_policy
from mtq_common.agents.hierarchy import HierarchyPolicy, instrument_specialist_index, load_specialists
from mtq_common.agents.nets import MetaController
from mtq_common.data.splits import load_splits
from mtq_common.evaluation.backtest import run_backtests
from mtq_common.evaluation.live_book import target_book
from mtq_common.training import checkpoint as ckpt
from mtq_common.training.config import ConfigError
from mtq_common.training.settings import load_config
from tests.helpers import write_config


@pytest.fixture(scope="module")
def trained(tiny_phases, tmp_path_factory):
    """A pipeline output folder (phase1 and phase3 best.pt, the manifest's config) from the tiny Phase 1 and 2
    runs, its config, and the hierarchy itself."""
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
    ckpt.atomic_write_json(out / "pipeline.json", {"config": cfg.to_dict(), "config_hash": cfg.hash(), "phases": {}})
    return out, config, cfg, specialists, meta


def test_acting_on_data_cut_at_a_bar_gives_what_the_test_backtest_traded_there(trained):
    _, _, cfg, specialists, meta = trained
    test = load_splits(cfg)["test"]
    owner = instrument_specialist_index(test.sectors, specialists.names)
    size = cfg.environment.max_position_size

    def system(rows):
        return HierarchyPolicy(specialists, meta, owner, size, rows, "cpu", test)

    backtest = run_backtests(test, cfg, {"system": system}, segments=1)["system"]
    for t in (backtest.bars[0] + 1, backtest.bars[0] + 37, backtest.bars[-1] - 5):  # act needs 2 bars after warm-up
        book = target_book(specialists, meta, test.window(0, t + 1, "test"), cfg)
        executed = np.array([book["instruments"][s]["executed_weight"] for s in test.symbols], dtype=np.float32)
        k = int(np.flatnonzero(backtest.bars == t)[0])
        np.testing.assert_array_equal(executed, backtest.weights[k].astype(np.float32))
        assert book["last_bar"] == str(test.timestamps[t])[:10]
        # and the rows say what was traded: the appetite applied (not a risk-timing tracker's factor), the allocation
        rows = [book["instruments"][s] for s in test.symbols]
        assert [row["risk_appetite"] for row in rows] == pytest.approx([float(backtest.appetite[k])] * len(rows))
        allocation = backtest.allocation[k][owner.numpy()]
        np.testing.assert_allclose([row["allocation"] for row in rows], allocation, atol=1e-7)
    # with Phase 3's joint sizing the book is the sized one, and each row says its factor
    plain = backtest
    scale = [0.5] + [1.0] * (test.num_instruments - 1)
    sized = MetaController.from_spec({**meta.describe(), "instrument_scale": scale})
    sized.load_state_dict(meta.state_dict())

    def sized_system(rows):
        return HierarchyPolicy(specialists, sized, owner, size, rows, "cpu", test)

    backtest = run_backtests(test, cfg, {"system": sized_system}, segments=1)["system"]
    assert not np.array_equal(backtest.weights[:, 0], plain.weights[:, 0])  # (the factor reaches the book)
    t = backtest.bars[0] + 37
    book = target_book(specialists, sized, test.window(0, t + 1, "test"), cfg)
    executed = np.array([book["instruments"][s]["executed_weight"] for s in test.symbols], dtype=np.float32)
    np.testing.assert_array_equal(
        executed, backtest.weights[int(np.flatnonzero(backtest.bars == t)[0])].astype(np.float32)
    )
    assert [book["instruments"][s]["sizing"] for s in test.symbols] == scale


def test_same_data_same_book_and_units(trained):
    _, _, cfg, specialists, meta = trained
    data = load_splits(cfg)["test"].window(0, 400, "test")
    a = target_book(specialists, meta, data, cfg, capital=100_000.0)
    b = target_book(specialists, meta, data, cfg, capital=100_000.0)
    assert a == b and a["holdings"].startswith("simulated")
    for symbol, row in a["instruments"].items():
        assert row["target_units"] == pytest.approx(row["executed_weight"] * 100_000.0 / row["close"]), symbol
        assert row["units"] == round(row["target_units"]) and row["contract_size"] == 1.0  # whole units
        assert row["trade_weight"] == pytest.approx(row["executed_weight"] - row["current_weight"])
        # without --holdings the trades start from the model's own book, held in whole contracts too
        assert row["held_units"] == round(row["current_weight"] * 100_000.0 / row["close"])
        assert row["trade_units"] == row["units"] - row["held_units"]
    assert a["book"]["gross"] == pytest.approx(sum(abs(r["executed_weight"]) for r in a["instruments"].values()))


def write_test_split_csv(folder, cfg):
    """The test split as CSV files (business-day dates from 2020), and the date of its last bar."""
    market = load_splits(cfg)["test"]
    dates = pd.bdate_range("2020-01-01", periods=market.num_bars).strftime("%Y-%m-%d").to_numpy()
    write_csv(folder, market.symbols, market.prices, dates)
    return market, dates[-1]


def read_closes(folder, symbols):
    """The CSV files of `write_csv` as one DataFrame of closes (columns in reverse order: any order is accepted)."""
    columns = {s: pd.read_csv(folder / f"{s}.csv", index_col="date", parse_dates=True)["close"] for s in symbols}
    return pd.DataFrame(columns)[list(reversed(symbols))]


@pytest.mark.parametrize("capital", [None, 250_000.0])
def test_load_policy_book_equals_the_act_book(trained, tmp_path, capital):
    out, config, cfg, *_ = trained
    data = tmp_path / "data"
    market, last = write_test_split_csv(data, cfg)
    result = pipeline.main(pipeline.Args(mode="act", config=str(config), output_dir=str(out), data_dir=str(data),
                                         log_dir=str(tmp_path / "logs"), as_of=last, capital=capital))  # fmt: skip
    written = json.loads((out / "act" / f"book-{last}.json").read_text())
    policy = load_policy(out)
    assert policy.symbols == market.symbols
    book = policy.book(read_closes(data, market.symbols), capital=capital)
    assert json.loads(json.dumps(ckpt.json_safe(book))) == written == json.loads(json.dumps(result["book"]))


@pytest.mark.parametrize("kind", ["csv", "json"])
def test_trades_take_the_held_book_to_the_target_in_whole_contracts(trained, tmp_path, kind):
    out, config, cfg, *_ = trained
    capital, sizes = 1_000_000.0, {"EURUSD": 25.0, "XAUUSD": 0.5, "SPX500": 3.0}  # the others: 1 unit
    config = config_with_contracts(tmp_path, config, sizes)
    data = tmp_path / "data"
    market, last = write_test_split_csv(data, cfg)
    held = {"EURUSD": 75.0, "XAUUSD": -10.5, "SPX500": 0.0, "US30": 12.0}  # whole contracts; the rest hold none
    path = tmp_path / f"held.{kind}"
    if kind == "json":
        path.write_text(json.dumps(held))
    else:
        path.write_text("symbol,units\n" + "".join(f"{s},{u}\n" for s, u in held.items()))
    book = pipeline.main(pipeline.Args(mode="act", config=str(config), output_dir=str(out), data_dir=str(data),
                                       log_dir=str(tmp_path / "logs"), as_of=last, capital=capital,
                                       holdings=str(path)))["book"]  # fmt: skip
    assert book["holdings"] == f"given: --holdings {path}"
    residual = 0.0
    for symbol, row in book["instruments"].items():
        size, units_held = sizes.get(symbol, 1.0), held.get(symbol, 0.0)
        assert row["contract_size"] == size and row["held_units"] == units_held, symbol
        assert row["current_weight"] == pytest.approx(units_held * row["close"] / capital)
        assert row["held_units"] + row["trade_units"] == row["units"]  # the trade lands on the rounded target
        assert row["contracts"] == round(row["target_units"] / size) and row["units"] == row["contracts"] * size
        assert row["trade_contracts"] == round(row["trade_contracts"])  # whole contracts
        assert abs(row["units"] - row["target_units"]) <= size / 2
        assert row["residual_weight"] == pytest.approx(row["executed_weight"] - row["units"] * row["close"] / capital)
        assert row["residual_notional"] == pytest.approx(row["residual_weight"] * capital)
        residual += abs(row["residual_notional"])
    assert book["book"]["rounding_residual"]["gross_notional"] == pytest.approx(residual)
    assert any(row["trade_units"] != 0 for row in book["instruments"].values())
    # the API gives the same trades from the same holdings
    policy = load_policy(out)
    for symbol, size in sizes.items():
        policy.cfg.instruments[symbol].contract_size = size
    again = policy.book(read_closes(data, market.symbols), holdings=held, capital=capital)
    assert {s: r["trade_units"] for s, r in again["instruments"].items()} == {
        s: r["trade_units"] for s, r in book["instruments"].items()
    }


def config_with_contracts(tmp_path, config, sizes: dict):
    """`config` plus `instruments.SYMBOL.contract_size` for each of `sizes` (the hash ignores contract sizes)."""
    import yaml

    raw = yaml.safe_load(config.read_text())
    defaults = load_config(config).instruments
    raw["instruments"] = {s: {**dataclasses.asdict(defaults[s]), "contract_size": size} for s, size in sizes.items()}
    path = tmp_path / "contracts.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).hash() == load_config(config).hash()
    return path


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda df: df.drop(columns=["EURUSD"]), "missing: EURUSD"),
        (lambda df: df.assign(FOO=1.0), "not traded by the run: FOO"),
        (lambda df: df.iloc[::-1], "strictly increasing"),
        (lambda df: df.reset_index(drop=True), "DatetimeIndex"),
        (lambda df: df.assign(SPX500=np.where(np.arange(len(df)) == 5, np.nan, df["SPX500"])), "SPX500 at"),
    ],
)
def test_policy_refuses_prices_it_cannot_act_on(trained, tmp_path, change, words):
    out, _, cfg, *_ = trained
    market, _ = write_test_split_csv(tmp_path / "data", cfg)
    prices = read_closes(tmp_path / "data", market.symbols)
    with pytest.raises(ValueError, match=words):
        load_policy(out).book(change(prices))


def test_pipeline_act_writes_the_book(trained, tmp_path):
    out, config, *_ = trained
    result = pipeline.main(pipeline.Args(mode="act", config=str(config), output_dir=str(out),
                                         log_dir=str(tmp_path / "logs"), capital=50_000.0))  # fmt: skip
    assert (out / "act").is_dir() and result["path"].endswith(f"book-{result['book']['last_bar']}.json")


def test_a_run_whose_manifest_holds_no_config_acts_unchecked(trained, tmp_path):
    """Phases trained by their scripts (torchrun) and evaluated by the pipeline leave a manifest without the config:
    the execution cannot be compared, so act goes on (with a warning) and gives the same book."""
    out, config, *_ = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("act"))
    (copy / "pipeline.json").write_text(json.dumps({"eval": {}}))
    args = dict(mode="act", config=str(config), log_dir=str(tmp_path / "logs"))
    book = pipeline.main(pipeline.Args(output_dir=str(copy), **args))["book"]
    assert book == pipeline.main(pipeline.Args(output_dir=str(out), **args))["book"]
    shutil.rmtree(out / "act")


def write_csv(folder, symbols, prices, dates):
    folder.mkdir(parents=True, exist_ok=True)
    for i, symbol in enumerate(symbols):
        pd.DataFrame({"date": dates, "close": prices[:, i]}).to_csv(folder / f"{symbol}.csv", index=False)


@pytest.mark.parametrize("case", ["untrained", "instruments", "short", "stale", "unsorted", "holdings-no-capital",
                                  "holdings-missing", "holdings-unknown", "holdings-text", "holdings-binary",
                                  "execution", "as-of",
                                  "as-of-early", "as-of-built-in", "staleness"])  # fmt: skip
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
    elif case == "as-of":
        write_csv(data, market.symbols, market.prices, dates)
        args["data_dir"], args["as_of"] = str(data), "2022-13-45"
        error, words = ConfigError, "--as-of '2022-13-45': accepted a date, YYYY-MM-DD"
    elif case == "as-of-early":  # a date before the last row: the book would be the last row's, not that date's
        write_csv(data, market.symbols, market.prices, dates)
        args["data_dir"], args["as_of"], args["max_staleness_days"] = str(data), dates[-10], None
        error, words = ConfigError, f"--as-of {dates[-10]}: before the data.s last bar, {dates[-1]}.*drop the later"
    elif case == "as-of-built-in":  # the built-in market has no date to be current at: the flag was ignored
        error, words = ConfigError, "--as-of 2030-01-10: applies to CSV data"
    elif case == "staleness":
        args["max_staleness_days"] = -1.0
        error, words = ConfigError, "--max-staleness-days -1.0: accepted a number of days >= 0, or None"
    elif case == "execution":  # another cost and VaR limit than the run's: the book would not be the run's
        args["config"] = str(
            write_config(
                tmp_path / "other.yaml", {"environment": {"transaction_cost": 0.001, "max_portfolio_var": 0.01}}
            )
        )
        error = ConfigError
        words = "environment.transaction_cost: 0.003 in the run, 0.001 now; environment.max_portfolio_var: .*--force"
    elif case.startswith("holdings"):
        args["holdings"], args["capital"] = str(tmp_path / "held.csv"), 100_000.0
        error, words = ConfigError, "--holdings .*: file not found; expected a CSV file with the header `symbol,units`"
        if case == "holdings-no-capital":
            args["capital"], words = None, "need --capital"
        elif case == "holdings-unknown":
            (tmp_path / "held.csv").write_text("symbol,units\nEURUSD,10\nFOO,3\n")
            error, words = ValueError, "unknown symbol.s. FOO; the run trades EURUSD, GBPUSD"
        elif case == "holdings-text":
            (tmp_path / "held.csv").write_text("symbol,units\nEURUSD,ten\n")
            error, words = ValueError, "the units of EURUSD are 'ten'; expected a finite number"
        elif case == "holdings-binary":  # (the decoding error did not name the file)
            (tmp_path / "held.csv").write_bytes(b"symbol,units\nEURUSD,\xd0\x10\n")
            words = "--holdings .*held.csv: not a readable text file \\('utf-8' codec can't decode byte 0xd0"
    else:
        swapped = market.prices.copy()
        shuffled = dates.copy()
        shuffled[[100, 101]] = shuffled[[101, 100]]
        write_csv(data, market.symbols, swapped, shuffled)
        args["data_dir"], args["as_of"] = str(data), dates[-1]
        error, words = ValueError, "strictly increasing"
    if "data_dir" not in args and case != "as-of-built-in":
        del args["as_of"]  # (CSV data's flag; the built-in market refuses it)
    shutil.rmtree(out / "act", ignore_errors=True)
    with pytest.raises(error, match=words):
        pipeline.main(pipeline.Args(**args))
    assert not (out / "act").exists()
    if case == "execution":  # --force trades with the given values (the user's explicit choice)
        book = pipeline.main(pipeline.Args(**args, force=True))["book"]
        assert book != pipeline.main(pipeline.Args(**{**args, "config": str(config)}))["book"]
        shutil.rmtree(out / "act")
