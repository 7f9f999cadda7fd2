"""Tests for mtq_common.csv_data: the CSV market-data loader and its error messages."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from mtq_common.csv_data import DataError, infer_bar_frequency, load_csv_market

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


@pytest.fixture
def mtq_log(caplog):
    """Capture warnings of the "mtq" logger (even if some logging setup turned its propagation off)."""
    logger = logging.getLogger("mtq")
    propagate, logger.propagate = logger.propagate, True
    with caplog.at_level(logging.WARNING, logger="mtq"):
        yield caplog
    logger.propagate = propagate


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
    hours = pd.date_range("2021-03-01", periods=24 * 20, freq="h")
    write_simple(tmp_path / "AAA.csv", hours, random_prices(len(hours), 0), header="datetime,close")
    data = load_csv_market(tmp_path, ["AAA"], SECTORS)
    assert data["train"].bars_per_day == 24
    assert data["test"].bars_per_year == 6048


@pytest.mark.parametrize(
    ("freq", "expected"),
    [("B", (252.0, 1.0)), ("D", (252.0, 1.0)), ("W-FRI", (52.0, 0.2)), ("MS", (12.0, 1 / 21))],
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


def test_unsorted_timestamps_are_sorted_with_a_warning(tmp_path, mtq_log):
    days, prices = business_days(40), np.array(random_prices(40, 6))
    order = np.arange(40)
    order[[5, 6]] = order[[6, 5]]
    write_simple(tmp_path / "AAA.csv", days[order], prices[order])

    data = load_csv_market(tmp_path, ["AAA"], SECTORS)

    np.testing.assert_array_equal(np.concatenate([data[k].prices[:, 0] for k in data]), prices)
    assert any("AAA.csv" in r.message and "sorted" in r.message for r in mtq_log.records)


def test_duplicated_timestamps_keep_the_last_with_a_warning(tmp_path, mtq_log):
    days, prices = business_days(40), random_prices(40, 7)
    times = list(days[:11]) + [days[10], days[10]] + list(days[11:])
    values = list(prices[:11]) + [55.5, 66.6] + list(prices[11:])
    write_simple(tmp_path / "AAA.csv", times, values)

    data = load_csv_market(tmp_path, ["AAA"], SECTORS)

    loaded = np.concatenate([data[k].prices[:, 0] for k in data])
    assert len(loaded) == 40
    assert loaded[10] == 66.6
    messages = " ".join(r.message for r in mtq_log.records)
    assert "AAA.csv" in messages and "duplicated" in messages
    assert str(days[10]) in messages and "3 times" in messages


def test_short_nan_gap_is_forward_filled(tmp_path, mtq_log):
    days, prices = business_days(40), random_prices(40, 8)
    values = [repr(p) for p in prices]
    values[20:23] = ["", "", ""]  # a gap of exactly max_ffill = 3
    write_simple(tmp_path / "AAA.csv", days, values)

    data = load_csv_market(tmp_path, ["AAA"], SECTORS)

    loaded = np.concatenate([data[k].prices[:, 0] for k in data])
    np.testing.assert_array_equal(loaded[20:23], [prices[19]] * 3)
    np.testing.assert_array_equal(loaded[23:], prices[23:])
    warnings = [r.message for r in mtq_log.records if "forward-filled" in r.message]
    assert len(warnings) == 1 and "AAA.csv" in warnings[0] and "3" in warnings[0]


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
