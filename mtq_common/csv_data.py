"""Real market data from CSV files: one file per instrument, aligned and split by time.

``load_csv_market(data_dir, symbols, sectors)`` returns ``{"train", "val", "test"}`` `MarketData` (see
`mtq_common.market`) with ``source="csv"``. Every problem with the input raises `DataError`, whose message
is one paragraph naming the file, the column, the row, the bad value where there is one, and what would be
accepted. The rules:

Files
    One file per instrument: ``data_dir/<SYMBOL>.csv`` (the name must match the symbol exactly), read with
    pandas. Every symbol must have a sector in ``sectors`` (checked before any file is read).

Rows
    Rows are reported as 1-based data rows: ``row 1`` is the first line after the header (blank lines are
    skipped). Where rows were re-ordered (sorting, see below) the row still refers to the file as written.

Time column
    The first of ``date``, ``datetime``, ``timestamp``, ``time`` present (in that order of preference; names
    compared case-insensitively with surrounding whitespace stripped), else the first column. Values are
    parsed as datetimes, the format being inferred from the first value. Timezone-aware values are converted
    to UTC and the timezone dropped; naive values are taken as they are. Empty or unparseable values are an
    error (numbers such as Unix epoch seconds are not accepted).

Price column
    ``adj close`` / ``adj_close`` / ``adjclose`` where present (adjusted closes make returns correct across
    splits and dividends), else ``close``; case-insensitive. Values must be plain positive finite numbers;
    an empty cell (or ``NA``/``NaN``/``null``) is a missing price.

Order and duplicates
    Unsorted timestamps are sorted (stable) with a warning on the ``mtq`` logger. Duplicated timestamps
    keep the *last* occurrence in file order (the usual convention for a corrected, re-appended bar), with a
    warning naming the timestamp and how many rows were dropped.

Missing prices
    Runs of at most ``max_ffill`` consecutive missing prices are forward-filled from the previous bar (one
    warning per file with the count). A longer run, or a missing price in the first row (nothing to fill
    from), is an error naming the row where the gap starts and its length.

Alignment and splits
    Instruments are aligned on the intersection of their timestamps (inner join). The aligned bars are split
    by time, never shuffled: with ``splits = (a, b, c)`` and ``T`` aligned bars, train is the first
    ``round(a * T)`` bars, val runs up to ``round((a + b) * T)`` and test is the rest (rounding half up).
    Each split needs at least ``min_bars_per_split`` bars.

Bar frequency (`infer_bar_frequency`, on the full aligned timestamps)
    From the median positive spacing ``s`` between consecutive bars:

    * ``20 h <= s < 4 days``: daily, ``(bars_per_year, bars_per_day) = (252, 1)``;
    * ``4 days <= s < 20 days``: weekly, ``(52, 0.2)``;
    * ``s >= 20 days``: monthly, ``(12, 1 / 21)``;
    * ``s < 20 h``: intraday, ``bars_per_day`` = median number of bars per calendar date (over dates that
      have bars) and ``bars_per_year = 252 * bars_per_day``.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.tseries.api import guess_datetime_format

from mtq_common.market import MarketData

log = logging.getLogger("mtq")

TIME_COLUMNS = ("date", "datetime", "timestamp", "time")
ADJ_CLOSE_COLUMNS = ("adj close", "adj_close", "adjclose")
CLOSE_COLUMN = "close"
SPLIT_NAMES = ("train", "val", "test")

ROWS_NOTE = "rows are data rows counted from 1 after the header"
ACCEPTED_PRICE = "a plain positive number such as 101.25 (leave the cell empty for a missing bar)"
ACCEPTED_TIME = "a date or date-time such as 2020-01-31 or 2020-01-31 14:30:00, in one format for the whole column"


class DataError(ValueError):
    """Bad market data: the message names the file, the column and the row, and what would be accepted."""


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def load_csv_market(
    data_dir,
    symbols: list[str],
    sectors: dict[str, str],
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
    min_bars_per_split: int = 1,
    max_ffill: int = 3,
) -> dict[str, MarketData]:
    """Load ``data_dir/<SYMBOL>.csv`` for each symbol, align them and split by time.

    Args:
        data_dir: directory holding one CSV per instrument.
        symbols: instruments to load; their order is the column order of ``prices``.
        sectors: symbol -> sector (asset class) for every symbol.
        splits: train/val/test fractions: three positive numbers summing to 1.
        min_bars_per_split: the fewest bars any split may have.
        max_ffill: the longest run of missing prices that is forward-filled.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` `MarketData` with ``source="csv"``, consecutive in time.

    Raises:
        DataError: on any problem with the arguments or the files (see the module docstring for the rules).
    """
    symbols = list(symbols)
    splits = _check_arguments(symbols, sectors, splits, min_bars_per_split, max_ffill)
    paths = _find_files(Path(data_dir), symbols)

    series = [_read_price_series(path, max_ffill) for path in paths]
    timestamps, prices = _align(paths, series)

    bounds = _split_bounds(len(timestamps), splits)
    sizes = [hi - lo for lo, hi in bounds]
    if min(sizes) < min_bars_per_split:
        raise DataError(
            f"too few rows: the {len(timestamps)} aligned rows split {_fmt_splits(splits)} give "
            f"{_fmt_sizes(sizes)} rows, but each split needs at least {min_bars_per_split} (min_bars_per_split); "
            f"at least {_min_total_bars(splits, min_bars_per_split)} aligned rows would be needed."
            f"{_overlap_note(paths, series, len(timestamps))}"
        )
    # Inferred once on the full aligned data so that all three splits agree.
    bars_per_year, bars_per_day = infer_bar_frequency(timestamps)

    return {
        name: MarketData(
            symbols=list(symbols),
            sectors=[sectors[s] for s in symbols],
            prices=prices[lo:hi].copy(),
            timestamps=timestamps[lo:hi].copy(),
            bars_per_year=bars_per_year,
            bars_per_day=bars_per_day,
            source="csv",
            split=name,
            regime=None,
            drift=None,
        )
        for name, (lo, hi) in zip(SPLIT_NAMES, bounds, strict=True)
    }


def infer_bar_frequency(timestamps) -> tuple[float, float]:
    """``(bars_per_year, bars_per_day)`` from the timestamps' spacing.

    Uses the median positive spacing between consecutive (sorted) timestamps: 20 hours to 4 days is daily
    ``(252, 1)``, 4 to 20 days weekly ``(52, 0.2)``, 20 days or more monthly ``(12, 1/21)``. Below 20 hours the
    data is intraday: ``bars_per_day`` is the median number of bars per calendar date (over dates with bars)
    and ``bars_per_year = 252 * bars_per_day`` (252 trading days a year).

    Raises:
        ValueError: fewer than two distinct timestamps (no spacing to measure).
    """
    ts = np.sort(np.asarray(pd.to_datetime(np.asarray(timestamps).ravel()), dtype="datetime64[ns]"))
    gaps = np.diff(ts)
    gaps = gaps[gaps > np.timedelta64(0, "ns")]
    if gaps.size == 0:
        raise ValueError(f"cannot infer the bar frequency from {ts.size} timestamp(s): need two distinct ones")

    spacing = pd.Timedelta(np.median(gaps.astype(np.int64)), unit="ns")
    if spacing >= pd.Timedelta(days=20):
        return 12.0, 1.0 / 21.0
    if spacing >= pd.Timedelta(days=4):
        return 52.0, 0.2
    if spacing >= pd.Timedelta(hours=20):
        return 252.0, 1.0
    # Intraday: count bars per calendar date; the median ignores partial first/last sessions.
    bars_per_date = pd.Series(ts).dt.normalize().value_counts()
    bars_per_day = float(np.median(bars_per_date.to_numpy()))
    return 252.0 * bars_per_day, bars_per_day


# ----------------------------------------------------------------------------------------------------------
# Arguments and files
# ----------------------------------------------------------------------------------------------------------


def _check_arguments(symbols, sectors, splits, min_bars_per_split, max_ffill) -> tuple[float, float, float]:
    """Validate everything that does not need the files; return the splits as floats."""
    if not symbols:
        raise DataError("no symbols to load: list at least one instrument (with its sector) under `instruments:`.")
    duplicated = sorted({s for s in symbols if symbols.count(s) > 1})
    if duplicated:
        raise DataError(f"symbol(s) {', '.join(duplicated)} listed more than once: list each instrument once.")
    unknown = [s for s in symbols if s not in sectors]
    if unknown:
        also = f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
        raise DataError(
            f"unknown symbol {unknown[0]}: add it to the config under `instruments:` with its sector{also}; "
            f"known symbols: {', '.join(sorted(sectors)) or 'none'}."
        )

    try:
        fractions = tuple(float(x) for x in splits)
    except (TypeError, ValueError):
        fractions = ()
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(
            f"bad splits {splits!r}: expected three positive fractions (train, val, test) summing to 1, "
            "e.g. (0.7, 0.15, 0.15)."
        )
    if int(min_bars_per_split) != min_bars_per_split or min_bars_per_split < 1:
        raise DataError(f"bad min_bars_per_split {min_bars_per_split!r}: expected an integer >= 1.")
    if int(max_ffill) != max_ffill or max_ffill < 0:
        raise DataError(f"bad max_ffill {max_ffill!r}: expected an integer >= 0.")
    return fractions


def _find_files(data_dir: Path, symbols: list[str]) -> list[Path]:
    """The path of each symbol's CSV, or a DataError saying which files are expected."""
    expected = ", ".join(f"{s}.csv" for s in symbols)
    if not data_dir.is_dir():
        raise DataError(
            f"data directory {data_dir} does not exist (or is not a directory): expected a directory holding "
            f"one CSV per instrument: {expected}."
        )
    paths = [data_dir / f"{s}.csv" for s in symbols]
    for symbol, path in zip(symbols, paths, strict=True):
        if not path.is_file():
            # A near miss (wrong case) is the most common cause; point at it.
            near = [p.name for p in data_dir.iterdir() if p.name.lower() == path.name.lower()]
            hint = f" Found {near[0]}: the file name must match the symbol exactly." if near else ""
            raise DataError(
                f"missing file {path} for symbol {symbol}: expected one CSV per instrument in {data_dir}, "
                f"named <SYMBOL>.csv: {expected}.{hint}"
            )
    return paths


# ----------------------------------------------------------------------------------------------------------
# One file
# ----------------------------------------------------------------------------------------------------------


def load_csv_series(data_dir, symbols: list[str], sectors: dict[str, str], max_ffill: int = 3,
                    strict_order: bool = False) -> MarketData:  # fmt: skip
    """The whole aligned series of ``data_dir/<SYMBOL>.csv`` as one `MarketData` (``split="all"``), read by
    the same rules as `load_csv_market`. With ``strict_order`` unsorted or duplicated timestamps are an error
    instead of being repaired (acting on live data must not guess which bar is the latest)."""
    symbols = list(symbols)
    _check_arguments(symbols, sectors, (0.7, 0.15, 0.15), 1, max_ffill)
    paths = _find_files(Path(data_dir), symbols)
    series = [_read_price_series(path, max_ffill, strict_order) for path in paths]
    timestamps, prices = _align(paths, series)
    bars_per_year, bars_per_day = infer_bar_frequency(timestamps)
    return MarketData(
        symbols=symbols,
        sectors=[sectors[s] for s in symbols],
        prices=prices,
        timestamps=timestamps,
        bars_per_year=bars_per_year,
        bars_per_day=bars_per_day,
        source="csv",
        split="all",
    )


def _read_price_series(path: Path, max_ffill: int, strict_order: bool = False) -> pd.Series:
    """One file's prices as a float64 Series indexed by sorted, unique, tz-naive timestamps."""
    try:
        # Everything as text: bad values are then reported exactly as written.
        frame = pd.read_csv(path, dtype=str, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty: expected a header line (e.g. Date,Close) and one row per bar.") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        detail = " ".join(str(err).split())
        raise DataError(f"{path} is not a readable CSV file ({detail}): expected comma-separated text.") from None
    if len(frame) == 0:
        raise DataError(f"{path} has a header but no data rows: expected one row per bar.")

    time_col, time_note = _time_column(frame)
    price_col = _price_column(path, frame)
    timestamps = _parse_timestamps(path, time_col, time_note, frame[time_col])
    prices = _parse_prices(path, price_col, frame[price_col])

    # The index holds each row's position in the file, so later messages can name file rows.
    table = pd.DataFrame({"time": timestamps, "price": prices})
    if strict_order:
        _check_order(path, table)
    table = _sort_and_deduplicate(path, table)
    table["price"] = _fill_gaps(path, price_col, table, max_ffill)
    return pd.Series(table["price"].to_numpy(), index=pd.DatetimeIndex(table["time"]), name=path.stem)


def _normalise(name) -> str:
    return str(name).strip().lower()


def _time_column(frame: pd.DataFrame) -> tuple[str, str]:
    """The time column and a note on how it was chosen (for error messages)."""
    by_name = {_normalise(c): c for c in reversed(frame.columns)}  # reversed: the first of equal names wins
    for candidate in TIME_COLUMNS:
        if candidate in by_name:
            return by_name[candidate], ""
    first = frame.columns[0]
    note = f" (no column named {'/'.join(TIME_COLUMNS)}, so the first column was taken as the time column)"
    return first, note


def _price_column(path: Path, frame: pd.DataFrame) -> str:
    """The adjusted close if present, else the close; a DataError listing the columns otherwise."""
    by_name = {_normalise(c): c for c in reversed(frame.columns)}
    for candidate in (*ADJ_CLOSE_COLUMNS, CLOSE_COLUMN):
        if candidate in by_name:
            return by_name[candidate]
    found = ", ".join(repr(str(c)) for c in frame.columns)
    raise DataError(
        f"{path} has no price column: found columns {found}; expected a column named 'Close' "
        "or 'Adj Close' (also adj_close / adjclose; any letter case)."
    )


def _row(position: int) -> str:
    """A 0-based position in the file as the 1-based data row shown to users."""
    return f"row {position + 1}"


def _parse_timestamps(path: Path, column: str, note: str, raw: pd.Series) -> pd.Series:
    """Parse the time column to tz-naive datetime64[ns]; DataError on the first empty or bad value."""
    text = raw.str.strip()
    if text.isna().any():
        first_bad = int(np.flatnonzero(text.isna().to_numpy())[0])
        raise DataError(
            f"{path}, column {column!r}{note}: {_row(first_bad)} has an empty timestamp ({ROWS_NOTE}); "
            f"expected {ACCEPTED_TIME}."
        )
    with warnings.catch_warnings():
        # pandas warns when it cannot infer one format; bad values become NaT and are reported below.
        warnings.simplefilter("ignore", UserWarning)
        # utc=True: aware values are converted to UTC, naive ones are taken as they are.
        parsed = pd.to_datetime(text, errors="coerce", utc=True)
    bad = parsed.isna().to_numpy()
    if bad.any():
        first_bad = int(np.flatnonzero(bad)[0])
        fmt = guess_datetime_format(text.iloc[0])
        inferred = f"; the format was inferred from row 1 as {fmt!r}" if fmt and first_bad > 0 else ""
        raise DataError(
            f"{path}, column {column!r}{note}: cannot parse {text.iloc[first_bad]!r} at {_row(first_bad)} "
            f"as a date/time ({ROWS_NOTE}; {int(bad.sum())} bad value(s) in all){inferred}; "
            f"expected {ACCEPTED_TIME}."
        )
    return parsed.dt.tz_localize(None).astype("datetime64[ns]")


def _parse_prices(path: Path, column: str, raw: pd.Series) -> pd.Series:
    """Parse the price column to float64 (NaN where empty); DataError on non-numeric or non-positive values."""
    text = raw.str.strip()
    values = pd.to_numeric(text, errors="coerce").astype(np.float64)
    # A value that was written but did not become a finite number (e.g. "1,234.5", "n/a", "inf").
    bad = (text.notna() & ~np.isfinite(values)).to_numpy()
    if bad.any():
        first_bad = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}, column {column!r}: non-numeric price {text.iloc[first_bad]!r} at {_row(first_bad)} "
            f"({ROWS_NOTE}; {int(bad.sum())} bad value(s) in all); expected {ACCEPTED_PRICE}."
        )
    non_positive = (values <= 0).to_numpy()
    if non_positive.any():
        first_bad = int(np.flatnonzero(non_positive)[0])
        raise DataError(
            f"{path}, column {column!r}: non-positive price {text.iloc[first_bad]!r} at {_row(first_bad)} "
            f"({ROWS_NOTE}; {int(non_positive.sum())} such value(s) in all); expected {ACCEPTED_PRICE}."
        )
    return values


def _check_order(path: Path, table: pd.DataFrame) -> None:
    """Refuse timestamps that are not strictly increasing, naming the first offending row."""
    step = table["time"].diff()
    bad = np.flatnonzero((step <= pd.Timedelta(0)).to_numpy())
    if len(bad):
        i = int(bad[0])
        what = "repeats" if step.iloc[i] == pd.Timedelta(0) else "is earlier than"
        raise DataError(
            f"{path}: {_row(int(table.index[i]))} time {table['time'].iloc[i]} {what} the row before it "
            f"({table['time'].iloc[i - 1]}): the rows must be in strictly increasing time order, one per bar."
        )


def _sort_and_deduplicate(path: Path, table: pd.DataFrame) -> pd.DataFrame:
    """Sort by time (stable, with a warning) and keep the last row of each duplicated timestamp."""
    if not table["time"].is_monotonic_increasing:
        log.warning("%s: timestamps are not in increasing order; sorted them", path)
        # Stable, so equal timestamps keep their file order and "last" below means last in the file.
        table = table.sort_values("time", kind="stable")

    dropped = table["time"].duplicated(keep="last")
    if dropped.any():
        counts = table.loc[dropped, "time"].value_counts(sort=False)
        first_time = counts.index[0]
        log.warning(
            "%s: %d duplicated timestamp(s), e.g. %s appears %d times; kept the last row of each and dropped %d row(s)",
            path,
            len(counts),
            first_time,
            int(counts.iloc[0]) + 1,
            int(dropped.sum()),
        )
        table = table.loc[~dropped]
    return table


def _fill_gaps(path: Path, column: str, table: pd.DataFrame, max_ffill: int) -> pd.Series:
    """Forward-fill runs of at most ``max_ffill`` missing prices; DataError on longer runs or a missing first."""
    missing = table["price"].isna().to_numpy()
    if not missing.any():
        return table["price"]

    # Runs of missing values: +1 where one starts, -1 just after one ends.
    edges = np.diff(np.concatenate(([0], missing.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    lengths = np.flatnonzero(edges == -1) - starts
    rows = table.index.to_numpy()  # file positions of the (sorted) rows

    if starts[0] == 0:
        raise DataError(
            f"{path}, column {column!r}: the price is missing in the first bar ({_row(int(rows[0]))}, "
            f"{table['time'].iloc[0]}; {ROWS_NOTE}) and a gap of {int(lengths[0])} bar(s) starts there, with "
            f"nothing before it to fill from; expected {ACCEPTED_PRICE} in the first row."
        )
    too_long = np.flatnonzero(lengths > max_ffill)
    if too_long.size:
        k = too_long[0]
        start = starts[k]
        raise DataError(
            f"{path}, column {column!r}: a gap of {int(lengths[k])} missing prices starts at "
            f"{_row(int(rows[start]))} ({table['time'].iloc[start]}; {ROWS_NOTE}); at most {max_ffill} "
            f"consecutive missing bars are forward-filled (max_ffill); expected {ACCEPTED_PRICE}."
        )
    log.warning("%s, column %r: forward-filled %d missing price(s)", path, column, int(missing.sum()))
    return table["price"].ffill()


# ----------------------------------------------------------------------------------------------------------
# Alignment and splits
# ----------------------------------------------------------------------------------------------------------


def _align(paths: list[Path], series: list[pd.Series]) -> tuple[np.ndarray, np.ndarray]:
    """Inner-join the instruments on time: (timestamps datetime64[ns] [T], prices float64 [T, N])."""
    common = series[0].index
    for s in series[1:]:
        common = common.intersection(s.index)
    common = common.sort_values()
    if len(common) == 0:
        raise DataError(
            "the files share no timestamp (instruments are aligned on the timestamps present in every file):"
            f"{_overlap_note(paths, series, 0)} Expected files covering a common period with the same bar times."
        )
    prices = np.column_stack([s.reindex(common).to_numpy(dtype=np.float64) for s in series])
    return common.to_numpy(dtype="datetime64[ns]"), prices


def _overlap_note(paths: list[Path], series: list[pd.Series], overlap: int) -> str:
    """Per file: its rows and time range, and how many of them survive the alignment (empty if all do)."""
    if all(len(s) == overlap for s in series):
        return ""
    per_file = "; ".join(
        f"{p} has {len(s)} rows from {s.index[0]} to {s.index[-1]}, {overlap} of them shared by all files"
        for p, s in zip(paths, series, strict=True)
    )
    return f" Overlap per file: {per_file}."


def _split_bounds(total: int, splits: tuple[float, float, float]) -> list[tuple[int, int]]:
    """[(start, stop)] of train, val and test: consecutive blocks of ``total`` bars, in time order."""
    cut1 = _round_half_up(total * splits[0])
    cut2 = _round_half_up(total * (splits[0] + splits[1]))
    return [(0, cut1), (cut1, cut2), (cut2, total)]


def _round_half_up(x: float) -> int:
    # The epsilon absorbs float error such as 10 * 0.85 = 8.499999999999998.
    return math.floor(x + 0.5 + 1e-9)


def _min_total_bars(splits: tuple[float, float, float], min_bars: int) -> int:
    """The fewest aligned bars for which every split gets at least ``min_bars`` bars."""
    # A split of fraction p gets about p * total bars (within one), which bounds where the search starts.
    total = max(3 * min_bars, math.floor((min_bars - 1) / min(splits)))
    while min(hi - lo for lo, hi in _split_bounds(total, splits)) < min_bars:
        total += 1
    return total


def _fmt_splits(splits: tuple[float, float, float]) -> str:
    return "/".join(f"{p:g}" for p in splits)


def _fmt_sizes(sizes: list[int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in zip(SPLIT_NAMES, sizes, strict=True))
