"""Tests for mtq_common.data.csv_data: the CSV market-data loader and its error messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtq_common.data.csv_data import DataError, infer_bar_frequency, load_csv_market
from mtq_common.data.csv_file import DataWarning
from mtq_common.training.config import CsvConfig

SECTORS = {"AAA": "equity", "BBB": "fx", "CCC": "commodity"}


def write_csv(path, header: str, rows: list[str]) -> None:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")


def business_days(n: int, start: str = "2020-01-01") -> pd.DatetimeIndex:
    return pd.bdate_range(start, periods=n)


def random_prices(n: int, seed: int) -> list[float]:
    """A random walk as Python floats (so that ``repr`` writes plain, exactly round-tripping numbers)."""
    rng = np.random.default_rng(seed)
    return (100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, n)))).tolist()


def write_simple(path, times, prices, header: str = "Date,Close") -> None:
    """A two-column file; ``prices`` entries may be strings (written verbatim)."""
    rows = [
        f"{t:%Y-%m-%d %H:%M:%S},{p if isinstance(p, str) else repr(float(p))}"
        for t, p in zip(times, prices, strict=True)
    ]
    write_csv(path, header, rows)


def write_rows(path, header: str, times: list[str], values: list[str], delimiter: str = ",") -> None:
    """A two-column file with the times and values written verbatim."""
    write_csv(path, header, [f"{t}{delimiter}{v}" for t, v in zip(times, values, strict=True)])


def day_strings(n: int, fmt: str, start: str = "2020-01-01") -> list[str]:
    return [f"{d:{fmt}}" for d in business_days(n, start)]


def all_prices(data) -> np.ndarray:
    return np.concatenate([data[k].prices for k in data])


def all_times(data) -> np.ndarray:
    return np.concatenate([data[k].timestamps for k in data])


# ----------------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------------


def test_round_trip_three_files_with_different_layouts(tmp_path):
    n = 300
    days = business_days(n)
    a, b, c = random_prices(n, 1), random_prices(n, 2), random_prices(n, 3)
    # AAA: full OHLCV with capitalised names.
    write_csv(
        tmp_path / "AAA.csv",
        "Date,Open,High,Low,Close,Volume",
        [f"{d:%Y-%m-%d},1,2,0.5,{p!r},1000" for d, p in zip(days, a, strict=True)],
    )
    # BBB: lower-case timestamp/close.
    write_csv(tmp_path / "BBB.csv", "timestamp,close", [f"{d:%Y-%m-%d},{p!r}" for d, p in zip(days, b, strict=True)])
    # CCC: Adj Close must win over Close (which holds a decoy value).
    write_csv(
        tmp_path / "CCC.csv",
        "Date,Close,Adj Close,Volume",
        [f"{d:%Y-%m-%d},999.0,{p!r},5" for d, p in zip(days, c, strict=True)],
    )

    symbols = ["CCC", "AAA", "BBB"]
    data = load_csv_market(tmp_path, symbols, SECTORS)

    assert list(data) == ["train", "val", "test"]
    assert [len(data[k].timestamps) for k in data] == [210, 45, 45]
    for name, split in data.items():
        assert split.split == name
        assert split.source == "csv"
        assert split.symbols == symbols
        assert split.sectors == ["commodity", "equity", "fx"]
        assert split.prices.dtype == np.float64
        assert split.timestamps.dtype == np.dtype("datetime64[ns]")
        assert np.all(np.diff(split.timestamps) > np.timedelta64(0))
        assert split.bars_per_year == 252 and split.bars_per_day == 1
        assert split.regime is None and split.drift is None
    # Consecutive in time, no overlap, nothing lost.
    assert data["train"].timestamps[-1] < data["val"].timestamps[0]
    assert data["val"].timestamps[-1] < data["test"].timestamps[0]
    all_times = np.concatenate([data[k].timestamps for k in data])
    np.testing.assert_array_equal(all_times, days.to_numpy(dtype="datetime64[ns]"))
    all_prices = np.concatenate([data[k].prices for k in data])
    np.testing.assert_array_equal(all_prices, np.column_stack([c, a, b]))


def test_hourly_data_gives_24_bars_per_day(tmp_path):
    hours = pd.date_range("2021-03-01", periods=24 * 20, freq="h")  # every day of the week: 365 of them a year
    write_simple(tmp_path / "AAA.csv", hours, random_prices(len(hours), 0), header="datetime,close")
    data = load_csv_market(tmp_path, ["AAA"], SECTORS)
    assert data["train"].bars_per_day == 24
    assert data["test"].bars_per_year == 24 * 365  # (it was 24 x 252, which understated Sharpe ratios by 1.2x)
    hours = hours[hours.day_of_week < 5]  # a market closed at weekends
    write_simple(tmp_path / "AAA.csv", hours, random_prices(len(hours), 0), header="datetime,close")
    assert load_csv_market(tmp_path, ["AAA"], SECTORS)["test"].bars_per_year == 24 * 252


@pytest.mark.parametrize(
    ("freq", "expected"),
    [("B", (252.0, 1.0)), ("D", (365.0, 1.0)), ("W-FRI", (52.0, 0.2)), ("MS", (12.0, 1 / 21))],  # D: every day
)
def test_infer_bar_frequency(freq, expected):
    assert infer_bar_frequency(pd.date_range("2020-01-01", periods=60, freq=freq)) == pytest.approx(expected)


def test_infer_bar_frequency_intraday_ignores_partial_sessions():
    # 8 bars per session on business days; the first session starts mid-day.
    session = pd.timedelta_range("09:00:00", periods=8, freq="h")
    times = pd.DatetimeIndex([d + s for d in business_days(10) for s in session])[3:]
    assert infer_bar_frequency(times) == (252.0 * 8, 8.0)


def test_misaligned_files_are_aligned_on_the_intersection(tmp_path):
    days = business_days(320)
    a, b = np.array(random_prices(320, 4)), np.array(random_prices(320, 5))
    write_simple(tmp_path / "AAA.csv", days[:300], a[:300])
    write_simple(tmp_path / "BBB.csv", days[20:], b[20:])
    # CCC also lacks a few bars in the middle.
    keep = np.ones(320, dtype=bool)
    keep[[100, 150, 151]] = False
    write_simple(tmp_path / "CCC.csv", days[keep], a[keep] * 2)

    with pytest.warns(DataWarning, match="aligning the files"):  # every file loses rows
        data = load_csv_market(tmp_path, ["AAA", "BBB", "CCC"], SECTORS)

    expected = days[20:300].difference(days[[100, 150, 151]])
    times = np.concatenate([data[k].timestamps for k in data])
    np.testing.assert_array_equal(times, expected.to_numpy(dtype="datetime64[ns]"))
    prices = np.concatenate([data[k].prices for k in data])
    idx = days.get_indexer(expected)
    np.testing.assert_array_equal(prices, np.column_stack([a[idx], b[idx], 2 * a[idx]]))


def test_timezone_aware_timestamps_are_converted_to_utc(tmp_path):
    times = [f"2020-01-{d:02d}T10:00:00+02:00" for d in range(1, 31)]
    write_csv(tmp_path / "AAA.csv", "Date,Close", [f"{t},{i + 1}" for i, t in enumerate(times)])
    data = load_csv_market(tmp_path, ["AAA"], SECTORS)
    assert data["train"].timestamps[0] == np.datetime64("2020-01-01T08:00:00", "ns")


# ----------------------------------------------------------------------------------------------------------
# Tolerated defects (fixed with a warning)
# ----------------------------------------------------------------------------------------------------------


def test_unsorted_timestamps_are_sorted_with_a_warning(tmp_path):
    days, prices = business_days(40), np.array(random_prices(40, 6))
    order = np.arange(40)
    order[[5, 6]] = order[[6, 5]]
    write_simple(tmp_path / "AAA.csv", days[order], prices[order])

    with pytest.warns(DataWarning) as record:
        data = load_csv_market(tmp_path, ["AAA"], SECTORS)

    np.testing.assert_array_equal(all_prices(data)[:, 0], prices)
    messages = [str(w.message) for w in record]
    assert messages == [f"{tmp_path / 'AAA.csv'}: the timestamps are not in increasing order (1 row(s) earlier than "
                        "the row before them); sorted the 40 rows by time"]  # fmt: skip


def test_duplicated_timestamps_keep_the_last_with_a_warning(tmp_path):
    days, prices = business_days(40), random_prices(40, 7)
    times = list(days[:11]) + [days[10], days[10]] + list(days[11:])
    values = list(prices[:11]) + [55.5, 66.6] + list(prices[11:])
    write_simple(tmp_path / "AAA.csv", times, values)

    with pytest.warns(DataWarning) as record:
        data = load_csv_market(tmp_path, ["AAA"], SECTORS)

    loaded = all_prices(data)[:, 0]
    assert len(loaded) == 40
    assert loaded[10] == 66.6
    (message,) = [str(w.message) for w in record]
    assert "AAA.csv" in message and "duplicated" in message and "dropped 2 row(s)" in message
    assert str(days[10]) in message and "3 times" in message


def test_short_nan_gap_is_forward_filled_with_a_warning(tmp_path):
    days, prices = business_days(40), random_prices(40, 8)
    values = [repr(p) for p in prices]
    values[20:23] = ["", "", ""]  # a gap of exactly max_ffill = 3
    write_simple(tmp_path / "AAA.csv", days, values)

    with pytest.warns(DataWarning) as record:
        data = load_csv_market(tmp_path, ["AAA"], SECTORS)

    loaded = all_prices(data)[:, 0]
    np.testing.assert_array_equal(loaded[20:23], [prices[19]] * 3)
    np.testing.assert_array_equal(loaded[23:], prices[23:])
    (message,) = [str(w.message) for w in record]
    assert "AAA.csv" in message and "forward-filled 3 missing price(s) in 1 gap(s)" in message and "row 21" in message


def test_alignment_warns_per_file_with_the_rows_dropped_and_the_period_kept(tmp_path):
    days = business_days(100)
    write_simple(tmp_path / "AAA.csv", days, random_prices(100, 1))
    write_simple(tmp_path / "BBB.csv", days[10:], random_prices(90, 2))

    with pytest.warns(DataWarning) as record:
        data = load_csv_market(tmp_path, ["AAA", "BBB"], SECTORS)

    assert len(all_times(data)) == 90
    (message,) = [str(w.message) for w in record]  # BBB loses nothing: no warning for it
    assert message.startswith(f"{tmp_path / 'AAA.csv'}: ")
    assert "dropped 10 of its 100 rows (10%" in message and "kept 90 rows from 2020-01-15 to 2020-05-19" in message


def test_data_warnings_show_on_the_terminal_once_and_in_the_log_file_each_time(tmp_path):
    """A pipeline-like process (logging set up as `pipeline.py` does, the data read through `load_splits`
    twice, as two phases would): the warning is printed on stderr once and written to the log twice."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    days, prices = business_days(800), random_prices(800, 9)
    order = np.arange(800)
    order[[5, 6]] = order[[6, 5]]
    write_simple(data_dir / "AAA.csv", days[order], np.array(prices)[order])
    script = (
        "import sys\n"
        "from mtq_common.training.settings import config_from_dict\n"
        "from mtq_common.data.splits import load_splits\n"
        "from mtq_common.training.plumbing import setup_logging\n"
        "setup_logging(sys.argv[2], 'pipeline')\n"
        "cfg = config_from_dict({'instruments': {'AAA': {'sector': 'equity'}}, 'specialists': ['equity'],\n"
        "    'data': {'source': 'csv', 'data_dir': sys.argv[1], 'instruments': ['AAA']}})\n"
        "for _ in range(2):\n"
        "    assert load_splits(cfg)['train'].num_bars == 560\n"
    )
    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"PYTHONPATH": str(repo)}
    log_file = tmp_path / "pipeline.log"
    run = subprocess.run([sys.executable, "-c", script, str(data_dir), str(log_file)], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    said = f"{data_dir / 'AAA.csv'}: the timestamps are not in increasing order"
    assert run.stderr.count(said) == 1 and "DataWarning" in run.stderr
    assert log_file.read_text().count(said) == 2


def test_load_splits_and_walk_forward_read_with_the_config_options(tmp_path):
    """`data.csv` and `data.allow_partial_overlap` reach the loaders through `splits.load_splits` and
    `splits.full_market`."""
    from mtq_common.data.splits import full_market, load_splits
    from mtq_common.training.settings import config_from_dict

    days = business_days(1600)  # BBB's 750 bars: enough for three splits of the feature window and more
    write_rows(tmp_path / "AAA.csv", "Date;Close", [f"{d:%d.%m.%Y}" for d in days], ["101,5"] * 1600, ";")
    write_rows(tmp_path / "BBB.csv", "Date;Close", [f"{d:%d.%m.%Y}" for d in days[:750]], ["7"] * 750, ";")
    raw = {"instruments": {"AAA": {"sector": "equity"}, "BBB": {"sector": "equity"}}, "specialists": ["equity"],
           "data": {"source": "csv", "data_dir": str(tmp_path), "instruments": ["AAA", "BBB"],
                    "csv": {"delimiter": ";", "decimal": ",", "dayfirst": True}}}  # fmt: skip
    with pytest.raises(DataError, match="allow_partial_overlap"):  # BBB covers less than half of AAA
        load_splits(config_from_dict(raw))
    raw["data"]["allow_partial_overlap"] = True
    cfg = config_from_dict(raw)
    with pytest.warns(DataWarning, match="dropped 850 of its 1600 rows"):
        splits = load_splits(cfg)
    assert sum(s.num_bars for s in splits.values()) == 750
    assert splits["train"].prices[0].tolist() == [101.5, 7.0]
    market = full_market(cfg)
    np.testing.assert_array_equal(market.timestamps, days[:750].to_numpy("datetime64[ns]"))


def test_spot_instruments_pay_the_risk_free_rate_in_every_market_a_run_reads(tmp_path):
    """`instruments.SYMBOL.spot` reaches the train, validation and test splits, the walk-forward folds, the
    curriculum's scenarios, `--mode act`'s data (`Policy.book`), a market handed to the Gymnasium environment and
    the execution that acting checks; the risk model still reads the price returns."""
    import gymnasium as gym

    from mtq_common.agents.curriculum import generate_scenario
    from mtq_common.data.splits import financed, load_splits
    from mtq_common.data.tables import build_tables
    from mtq_common.policy import execution_settings, market_from_prices
    from mtq_common.training.settings import config_from_dict

    days = business_days(900)
    for symbol, seed in (("AAA", 1), ("BBB", 2)):
        write_simple(tmp_path / f"{symbol}.csv", days, random_prices(900, seed))
    raw = {"instruments": {"AAA": {"sector": "equity", "spot": True}, "BBB": {"sector": "equity"}},
           "specialists": ["equity"], "reward": {"risk_free_rate": 0.03},
           "data": {"source": "csv", "data_dir": str(tmp_path), "instruments": ["AAA", "BBB"]}}  # fmt: skip
    cfg = config_from_dict(raw)

    def check(market):
        price_return = market.prices[1:] / market.prices[:-1] - 1.0
        np.testing.assert_allclose(market.returns[1:, 0], price_return[:, 0] - 0.03 / 252, rtol=0, atol=1e-15)
        np.testing.assert_array_equal(market.returns[1:, 1], price_return[:, 1])  # BBB: a future, no financing

    for market in load_splits(cfg).values():
        check(market)
    cfg.data.folds, cfg.data.fold = 2, 1
    for market in load_splits(cfg).values():
        check(market)
    cfg.data.folds = 0
    check(generate_scenario(0, cfg))
    frame = pd.DataFrame(load_splits(cfg)["test"].prices, index=days[-135:], columns=["AAA", "BBB"])
    check(financed(market_from_prices(frame, ["AAA", "BBB"], ["equity", "equity"]), cfg))
    plain = load_csv_market(tmp_path, ["AAA", "BBB"], {"AAA": "equity", "BBB": "equity"})["test"]  # not financed
    env = gym.make("MTQ/Portfolio-v0", config=cfg, market=plain).unwrapped.batched
    np.testing.assert_allclose(env.engine.tables.returns.numpy(), financed(plain, cfg).returns, rtol=0, atol=1e-8)
    spot, futures = (build_tables(m, cfg) for m in (financed(plain, cfg), plain))
    assert torch.equal(spot.cov, futures.cov) and torch.equal(spot.vol, futures.vol)  # risk is of the prices
    settings = execution_settings(cfg.to_dict(), ["AAA", "BBB"])
    assert settings["instruments.AAA.spot"] is True and settings["reward.risk_free_rate"] == 0.03
    assert execution_settings(cfg.to_dict(), ["BBB"])["reward.risk_free_rate"] == "unused: no spot instrument"
    cfg.reward.risk_free_rate = 0.0  # no cash rate: nothing to give up
    assert all(m.financing is None for m in load_splits(cfg).values())


# ----------------------------------------------------------------------------------------------------------
# The files overlap little: refused unless data.allow_partial_overlap
# ----------------------------------------------------------------------------------------------------------


def test_alignment_dropping_most_of_a_file_is_refused_unless_allowed(tmp_path):
    days = business_days(400, "2005-01-03")
    write_simple(tmp_path / "AAA.csv", days, random_prices(400, 1))
    write_simple(tmp_path / "BBB.csv", days, random_prices(400, 2))
    write_simple(tmp_path / "CCC.csv", days[300:], random_prices(100, 3))  # starts much later

    with pytest.raises(DataError) as err:
        load_csv_market(tmp_path, ["AAA", "BBB", "CCC"], SECTORS)
    message = str(err.value)
    assert "more than half of the rows of AAA.csv, BBB.csv:" in message
    assert "the shared period runs 2006-02-27 to 2006-07-14 (100 rows" in message
    assert f"{tmp_path / 'AAA.csv'} has 400 rows from 2005-01-03 to 2006-07-14" in message
    assert f"{tmp_path / 'CCC.csv'} has 100 rows from 2006-02-27 to 2006-07-14" in message
    assert "data.allow_partial_overlap: true" in message

    with pytest.warns(DataWarning) as record:
        data = load_csv_market(tmp_path, ["AAA", "BBB", "CCC"], SECTORS, allow_partial_overlap=True)
    assert len(all_times(data)) == 100
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    for name, message in zip(["AAA.csv", "BBB.csv"], messages, strict=True):
        assert name in message and "dropped 300 of its 400 rows (75%" in message
        assert "kept 100 rows from 2006-02-27 to 2006-07-14" in message


# ----------------------------------------------------------------------------------------------------------
# data.csv options: delimiter, decimal mark, day-first dates, date format, time zones
# ----------------------------------------------------------------------------------------------------------


def test_semicolon_file_names_the_delimiter_option_and_loads_with_it(tmp_path):
    times = day_strings(30, "%Y-%m-%d")
    values = [f"{100 + i},25" for i in range(30)]
    write_rows(tmp_path / "AAA.csv", "Date;Close", times, values, delimiter=";")

    with pytest.raises(DataError, match="looks like ';'-separated: set data.csv.delimiter: ';'") as err:
        load_csv_market(tmp_path, ["AAA"], SECTORS)
    assert "AAA.csv" in str(err.value) and "'Date;Close'" in str(err.value)
    with pytest.raises(DataError, match="decimal comma: set data.csv.decimal: ','"):
        load_csv_market(tmp_path, ["AAA"], SECTORS, csv=CsvConfig(delimiter=";"))

    data = load_csv_market(tmp_path, ["AAA"], SECTORS, csv=CsvConfig(delimiter=";", decimal=","))
    np.testing.assert_array_equal(all_prices(data)[:, 0], [100.25 + i for i in range(30)])


def test_tab_separated_file_names_the_tab(tmp_path):
    write_rows(tmp_path / "AAA.csv", "Date\tClose", day_strings(30, "%Y-%m-%d"), ["1"] * 30, delimiter="\t")
    with pytest.raises(DataError, match='set data.csv.delimiter: "\\\\t"'):
        load_csv_market(tmp_path, ["AAA"], SECTORS)
    assert len(all_times(load_csv_market(tmp_path, ["AAA"], SECTORS, csv=CsvConfig(delimiter="\t")))) == 30


def test_decimal_comma_refuses_a_thousands_point(tmp_path):
    values = ["101,5"] * 30
    values[3] = "1.234,5"
    write_rows(tmp_path / "AAA.csv", "Date;Close", day_strings(30, "%Y-%m-%d"), values, delimiter=";")
    with pytest.raises(DataError, match="row 4") as err:
        load_csv_market(tmp_path, ["AAA"], SECTORS, csv=CsvConfig(delimiter=";", decimal=","))
    assert "'1.234,5'" in str(err.value) and "101,25" in str(err.value)


def test_day_first_dates_name_the_option_and_load_with_it(tmp_path):
    # Row 1 (02/01/2020) reads either way; row 8 (13/01/2020) only day first.
    write_rows(tmp_path / "AAA.csv", "Date,Close", day_strings(40, "%d/%m/%Y", "2020-01-02"), ["1"] * 40)

    with pytest.raises(DataError, match="set data.csv.dayfirst: true") as err:
        load_csv_market(tmp_path, ["AAA"], SECTORS)
    assert "'13/01/2020'" in str(err.value) and "row 8" in str(err.value)

    data = load_csv_market(tmp_path, ["AAA"], SECTORS, csv=CsvConfig(dayfirst=True))
    np.testing.assert_array_equal(all_times(data), business_days(40, "2020-01-02").to_numpy("datetime64[ns]"))


def test_dayfirst_keeps_year_first_dates(tmp_path):
    # pandas alone would read 2020-01-02 day first as 1 February.
    write_rows(tmp_path / "AAA.csv", "Date,Close", day_strings(40, "%Y-%m-%d", "2020-01-02"), ["1"] * 40)
    data = load_csv_market(tmp_path, ["AAA"], SECTORS, csv=CsvConfig(dayfirst=True))
    np.testing.assert_array_equal(all_times(data), business_days(40, "2020-01-02").to_numpy("datetime64[ns]"))


def test_date_format(tmp_path):
    write_rows(tmp_path / "AAA.csv", "Date,Close", day_strings(30, "%d.%m.%Y 17:30"), ["1"] * 30)
    data = load_csv_market(tmp_path, ["AAA"], SECTORS, csv=CsvConfig(date_format="%d.%m.%Y %H:%M"))
    expected = business_days(30) + pd.Timedelta(hours=17, minutes=30)
    np.testing.assert_array_equal(all_times(data), expected.to_numpy("datetime64[ns]"))
    with pytest.raises(DataError, match="does not match data.csv.date_format '%Y-%m-%d'"):
        load_csv_market(tmp_path, ["AAA"], SECTORS, csv=CsvConfig(date_format="%Y-%m-%d"))


def test_files_with_different_offsets_point_to_the_timezone_option(tmp_path):
    # Daily bars stamped at each exchange's local midnight: the same dates, 6 hours apart in UTC.
    dates = day_strings(30, "%Y-%m-%d")
    write_rows(tmp_path / "AAA.csv", "Date,Close", [f"{d}T00:00:00+01:00" for d in dates], ["1"] * 30)
    write_rows(tmp_path / "BBB.csv", "Date,Close", [f"{d} 00:00:00-05:00" for d in dates], ["2"] * 30)

    with pytest.raises(DataError, match="share no timestamp") as err:
        load_csv_market(tmp_path, ["AAA", "BBB"], SECTORS)
    message = str(err.value)
    assert "AAA.csv (+01:00), BBB.csv (-05:00)" in message and "they share 30 timestamps" in message
    assert "data.csv.timezone: as_written" in message

    data = load_csv_market(tmp_path, ["AAA", "BBB"], SECTORS, csv=CsvConfig(timezone="as_written"))
    np.testing.assert_array_equal(all_times(data), business_days(30).to_numpy("datetime64[ns]"))


def test_files_with_and_without_offsets_point_to_the_timezone_option(tmp_path):
    dates = day_strings(30, "%Y-%m-%d")
    write_rows(tmp_path / "AAA.csv", "Date,Close", [f"{d}T00:00:00-05:00" for d in dates], ["1"] * 30)
    write_rows(tmp_path / "BBB.csv", "Date,Close", dates, ["2"] * 30)

    with pytest.raises(DataError) as err:
        load_csv_market(tmp_path, ["AAA", "BBB"], SECTORS)
    message = str(err.value)
    assert "AAA.csv (-05:00) is written with UTC offsets and BBB.csv without" in message
    assert "Set data.csv.timezone to the zone the times without an offset are in" in message

    # AAA converted to New York time (its midnight), BBB's dates taken as New York times.
    data = load_csv_market(tmp_path, ["AAA", "BBB"], SECTORS, csv=CsvConfig(timezone="America/New_York"))
    np.testing.assert_array_equal(all_times(data), business_days(30).to_numpy("datetime64[ns]"))
    # In UTC, AAA's bars are at 05:00 and share nothing with BBB's midnights.
    with pytest.raises(DataError, match="share no timestamp"):
        load_csv_market(tmp_path, ["AAA", "BBB"], SECTORS, csv=CsvConfig(timezone="UTC"))


def test_times_with_and_without_offset_in_one_file_are_refused(tmp_path):
    times = day_strings(30, "%Y-%m-%d 10:00")
    times[4] += "+02:00"
    write_rows(tmp_path / "AAA.csv", "Date,Close", times, ["1"] * 30)
    with pytest.raises(DataError, match="row 5") as err:
        load_csv_market(tmp_path, ["AAA"], SECTORS)
    assert "has a UTC offset but row 1 ('2020-01-01 10:00') has no UTC offset" in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# Refused inputs: each DataError names the file and the column/row/value at fault
# ----------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    write_simple(tmp_path / "AAA.csv", business_days(30), random_prices(30, 0))
    with pytest.raises(DataError) as err:
        load_csv_market(tmp_path, ["AAA", "BBB"], SECTORS)
    message = str(err.value)
    assert str(tmp_path / "BBB.csv") in message
    assert "AAA.csv, BBB.csv" in message  # the files expected


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        load_csv_market(tmp_path / "nowhere", ["AAA"], SECTORS)
    assert str(tmp_path / "nowhere") in str(err.value) and "AAA.csv" in str(err.value)


def test_missing_close_column(tmp_path):
    write_csv(tmp_path / "AAA.csv", "Date,Open,Volume", ["2020-01-01,1,2", "2020-01-02,1,2"])
    with pytest.raises(DataError) as err:
        load_csv_market(tmp_path, ["AAA"], SECTORS)
    message = str(err.value)
    assert "AAA.csv" in message and "'Open'" in message and "'Volume'" in message and "Close" in message


def test_non_numeric_price_names_value_and_row(tmp_path):
    values = [repr(p) for p in random_prices(30, 0)]
    values[16] = "12,5x"  # quoted below so that the comma stays inside the cell
    rows = [f'2020-01-{i + 1:02d},"{v}"' for i, v in enumerate(values)]
    write_csv(tmp_path / "AAA.csv", "Date,Close", rows)
    with pytest.raises(DataError) as err:
        load_csv_market(tmp_path, ["AAA"], SECTORS)
    message = str(err.value)
    assert "AAA.csv" in message and "'Close'" in message and "row 17" in message and "'12,5x'" in message


@pytest.mark.parametrize("bad", ["0", "-3.5"])
def test_non_positive_price(tmp_path, bad):
    values = [repr(p) for p in random_prices(30, 0)]
    values[4] = bad
    write_simple(tmp_path / "AAA.csv", business_days(30), values)
    with pytest.raises(DataError, match="non-positive") as err:
        load_csv_market(tmp_path, ["AAA"], SECTORS)
    message = str(err.value)
    assert "AAA.csv" in message and "'Close'" in message and "row 5" in message and repr(bad) in message


def test_long_nan_gap_is_refused(tmp_path):
    values = [repr(p) for p in random_prices(60, 0)]
    values[39:44] = [""] * 5  # rows 40..44
    write_simple(tmp_path / "AAA.csv", business_days(60), values)
    with pytest.raises(DataError) as err:
        load_csv_market(tmp_path, ["AAA"], SECTORS)
    message = str(err.value)
    assert "AAA.csv" in message and "'Close'" in message and "row 40" in message and "5 missing" in message


def test_nan_in_first_row_is_refused(tmp_path):
    values = [repr(p) for p in random_prices(30, 0)]
    values[0] = ""
    write_simple(tmp_path / "AAA.csv", business_days(30), values)
    with pytest.raises(DataError, match="first bar") as err:
        load_csv_market(tmp_path, ["AAA"], SECTORS)
    assert "AAA.csv" in str(err.value) and "row 1" in str(err.value)


def test_too_few_rows(tmp_path):
    write_simple(tmp_path / "AAA.csv", business_days(10), random_prices(10, 0))
    with pytest.raises(DataError, match="too few rows") as err:
        load_csv_market(tmp_path, ["AAA"], SECTORS, min_bars_per_split=5)
    message = str(err.value)
    assert "train 7, val 2, test 1" in message
    assert "at least 5" in message and "at least 32 aligned rows" in message


def test_no_common_timestamps(tmp_path):
    days = business_days(60)
    write_simple(tmp_path / "AAA.csv", days[:30], random_prices(30, 0))
    write_simple(tmp_path / "BBB.csv", days[30:], random_prices(30, 1))
    with pytest.raises(DataError, match="share no timestamp") as err:
        load_csv_market(tmp_path, ["AAA", "BBB"], SECTORS)
    assert "AAA.csv has 30 rows" in str(err.value) and "BBB.csv has 30 rows" in str(err.value)


def test_unknown_symbol_without_sector(tmp_path):
    # Checked before any file is read: the directory does not even exist.
    with pytest.raises(DataError) as err:
        load_csv_market(tmp_path / "nowhere", ["AAA", "ZZZ"], SECTORS)
    message = str(err.value)
    assert "unknown symbol ZZZ" in message and "`instruments:`" in message and "sector" in message


def test_empty_symbol_list(tmp_path):
    with pytest.raises(DataError, match="no symbols"):
        load_csv_market(tmp_path, [], SECTORS)


@pytest.mark.parametrize("splits", [(0.7, 0.2, 0.2), (0.8, 0.2, 0.0), (0.5, 0.5)])
def test_bad_splits(tmp_path, splits):
    with pytest.raises(ValueError, match="splits"):
        load_csv_market(tmp_path, ["AAA"], SECTORS, splits=splits)


def test_unparseable_date(tmp_path):
    rows = [f"2020-01-{i + 1:02d},{100 + i}" for i in range(30)]
    rows[11] = "2020-01-1x,111"
    write_csv(tmp_path / "AAA.csv", "Date,Close", rows)
    with pytest.raises(DataError) as err:
        load_csv_market(tmp_path, ["AAA"], SECTORS)
    message = str(err.value)
    assert "AAA.csv" in message and "'Date'" in message and "row 12" in message and "'2020-01-1x'" in message


def test_a_hole_in_the_calendar_is_refused_naming_the_files_and_the_dates(tmp_path):
    """Rows missing for months are not a bar: their price move would be booked as one bar's return."""
    days = business_days(900)
    kept = (days < "2021-03-01") | (days > "2021-09-30")
    for symbol, seed in (("AAA", 0), ("BBB", 1)):  # the same hole in both files
        write_simple(tmp_path / f"{symbol}.csv", days[kept], random_prices(int(kept.sum()), seed))
    hole = r"every file has no row between 2021-02-26 and 2021-10-01 \(217 days, where bars are 1 day\(s\) apart"
    with pytest.raises(DataError, match=hole + r".*fill the missing rows, or cut the files to one side of the hole"):
        load_csv_market(tmp_path, ["AAA", "BBB"], SECTORS)
    write_simple(tmp_path / "BBB.csv", days, random_prices(len(days), 1))  # the hole in one file only
    with pytest.raises(DataError, match=r"AAA.csv has no row between 2021-02-26 and 2021-10-01"):
        load_csv_market(tmp_path, ["AAA", "BBB"], SECTORS)
    # a week's closure (as after 11 September 2001) is a market's, not a hole in the data
    closed = (days < "2021-03-01") | (days > "2021-03-05")
    for symbol, seed in (("AAA", 0), ("BBB", 1)):
        write_simple(tmp_path / f"{symbol}.csv", days[closed], random_prices(int(closed.sum()), seed))
    assert load_csv_market(tmp_path, ["AAA", "BBB"], SECTORS)["train"].num_bars > 0
