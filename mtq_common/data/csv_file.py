"""One CSV file of prices -> a clean price series (`read_price_file` / `read_price_series`), or a `DataError`
whose message is one paragraph naming the file, the column, the row, the bad value, what would be accepted
and, where a setting explains it, the `data.csv` key to set. `mtq_common.data.csv_data` aligns the files of a
market and splits them by time. How the text is read is set by a `CsvConfig` (the config's ``data.csv``:
delimiter, decimal mark, day-first dates or an explicit date format, time zone). One file's rules:

Rows
    Rows are reported as 1-based data rows: ``row 1`` is the first line after the header (blank lines are
    skipped). Where rows were re-ordered (sorting, see below) the row still refers to the file as written.

Columns
    Separated by ``data.csv.delimiter`` (``,``). A header line without that character but with another
    usual one (``;``, tab, ``|``, ``,``) is refused with the delimiter to set.

Time column
    The first of ``date``, ``datetime``, ``timestamp``, ``time`` present (in that order of preference; names
    compared case-insensitively with surrounding whitespace stripped), else the first column. Values are
    parsed as datetimes in ``data.csv.date_format`` when set, else in the format inferred from the first
    value (``data.csv.dayfirst`` reads 01/02/2020 as 1 February; dates starting with a four-digit year are
    always year-month-day). Every value of a file is written with a UTC offset (``Z``, ``+01:00``, ...) or
    none is. Empty or unparseable values are an error (numbers such as Unix epoch seconds are not accepted).

Time zones (``data.csv.timezone``)
    Unset: times with an offset are converted to UTC; times without one are taken as written; a market
    mixing files with and without offsets is refused (`mtq_common.data.csv_data`). A zone name (``UTC``,
    ``Europe/London``, ``America/New_York``): times with an offset are converted to that zone, times
    without one are taken as times in it. ``as_written``: every time keeps the clock time written in the
    file and its offset is dropped (daily bars stamped at each exchange's local midnight). In every case the
    times are then naive (no zone), so that files compare.

Price column
    ``adj close`` / ``adj_close`` / ``adjclose`` where present (adjusted closes make returns correct across
    splits and dividends), else ``close``; case-insensitive. Values must be plain positive finite numbers
    with ``data.csv.decimal`` (``.``) as the decimal mark and no thousands separator; an empty cell (or
    ``NA``/``NaN``/``null``) is a missing price.

Order and duplicates
    Unsorted timestamps are sorted (stable) with a warning. Duplicated timestamps keep the *last* occurrence
    in file order (the usual convention for a corrected, re-appended bar), with a warning naming the
    timestamp and how many rows were dropped.

Missing prices
    Runs of at most ``max_ffill`` consecutive missing prices are forward-filled from the previous bar (one
    warning per file with the count). A longer run, or a missing price in the first row (nothing to fill
    from), is an error naming the row where the gap starts and its length.

Warnings
    Every change made to the data (here and in the alignment) is a `DataWarning` (Python's `warnings`, so
    ``python -W ignore::UserWarning`` or `warnings.filterwarnings` silences it): printed on the terminal once
    per process (the pipeline reads the same files in every phase), attributed to the line outside
    ``mtq_common`` that loaded the data, and written to the run's log file through the ``mtq`` logger every
    time (`mtq_common.training.plumbing.setup_logging`).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.tseries.api import guess_datetime_format

from mtq_common.training.config import AS_WRITTEN, CsvConfig

log = logging.getLogger("mtq.data")
# The terminal copy of a data warning comes from `warnings`; without this handler logging's last resort
# would print it a second time when no log file is set up (the "mtq" logger's file handler still gets it).
log.addHandler(logging.NullHandler())

TIME_COLUMNS = ("date", "datetime", "timestamp", "time")
ADJ_CLOSE_COLUMNS = ("adj close", "adj_close", "adjclose")
CLOSE_COLUMN = "close"
DELIMITERS = (";", "\t", "|", ",")
"""The usual column separators, recognised in a header line that lacks the configured one."""

ROWS_NOTE = "rows are data rows counted from 1 after the header"
ACCEPTED_TIME = "a date or date-time such as 2020-01-31 or 2020-01-31 14:30:00, in one format for the whole column"

# A UTC offset at the end of a time (after hours:minutes[:seconds[.fraction]]): Z, UTC, GMT, +01:00, -0500, +05.
UTC_OFFSET = re.compile(
    r"\d:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:(?P<utc>Z|UTC|GMT)|(?P<sign>[+-])(?P<hours>\d{2}):?(?P<minutes>\d{2})?)$",
    re.IGNORECASE,
)


class DataError(ValueError):
    """Bad market data: the message names the file, the column and the row, and what would be accepted."""


class DataWarning(UserWarning):
    """A change made to the user's data while reading it: rows sorted, duplicates dropped, missing prices
    forward-filled, rows dropped by aligning the files."""


_said: set[str] = set()
"""The messages already warned of in this process."""


def announce(message: str) -> None:
    """Say a change made to the user's data: a warning in the log file each time, and a `DataWarning` on the
    terminal the first time in this process (the pipeline reads the same files in every phase; the warnings
    module's own "once" cannot be relied on, as its registry is cleared whenever a filter changes)."""
    log.warning(message)
    if message not in _said:
        _said.add(message)
        # Attributed to the first caller outside mtq_common (the line of the script that loaded the data).
        package = str(Path(__file__).parents[1]) + os.sep
        frame, level = inspect.currentframe(), 1
        while frame is not None and frame.f_code.co_filename.startswith(package):
            frame, level = frame.f_back, level + 1
        warnings.warn(message, DataWarning, stacklevel=level)


@dataclass(frozen=True)
class PriceFile:
    """One file as read by `read_price_file`."""

    path: Path
    series: pd.Series
    """float64 prices indexed by sorted, unique, naive timestamps (converted per ``data.csv.timezone``)."""
    written: pd.DatetimeIndex
    """Each bar's clock time as written in the file, its UTC offset dropped (aligned with ``series``)."""
    offsets: tuple[str, ...]
    """The distinct UTC offsets written in the file, as ``+01:00``; empty for times without an offset."""


def read_price_series(
    path: Path, max_ffill: int, strict_order: bool = False, csv: CsvConfig | None = None
) -> pd.Series:
    """One file's prices as a float64 Series indexed by sorted, unique, tz-naive timestamps."""
    return read_price_file(path, max_ffill, strict_order, csv).series


def read_price_file(path: Path, max_ffill: int, strict_order: bool = False, csv: CsvConfig | None = None) -> PriceFile:
    """Read one file by the module's rules (``csv``: how the text is written; None: the defaults).

    Raises:
        DataError: on any problem with the file, naming the row, the value and the setting that would fix it.
    """
    csv = csv or CsvConfig()
    _check_delimiter(path, csv)
    try:
        # Everything as text: bad values are then reported exactly as written.
        frame = pd.read_csv(path, dtype=str, sep=csv.delimiter, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty: expected a header line (e.g. Date,Close) and one row per bar.") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        detail = " ".join(str(err).split())
        raise DataError(
            f"{path} is not a readable CSV file ({detail}): expected text with columns separated by "
            f"{csv.delimiter!r} (data.csv.delimiter)."
        ) from None
    if len(frame) == 0:
        raise DataError(f"{path} has a header but no data rows: expected one row per bar.")

    time_col, time_note = _time_column(frame)
    price_col = _price_column(path, frame)
    times, written, offsets = _parse_timestamps(path, time_col, time_note, frame[time_col], csv)
    prices = _parse_prices(path, price_col, frame[price_col], csv)

    # The index holds each row's position in the file, so later messages can name file rows.
    table = pd.DataFrame({"time": times, "written": written, "price": prices})
    if strict_order:
        _check_order(path, table)
    table = _sort_and_deduplicate(path, table)
    table["price"] = _fill_gaps(path, price_col, table, max_ffill, csv)
    index = pd.DatetimeIndex(table["time"])
    return PriceFile(
        path=path,
        series=pd.Series(table["price"].to_numpy(), index=index, name=path.stem),
        written=pd.DatetimeIndex(table["written"]),
        offsets=offsets,
    )


def yaml_value(text: str) -> str:
    """``text`` as it would be written after a key in the YAML config (a tab needs double quotes)."""
    return '"\\t"' if text == "\t" else f"'{text}'"


def _check_delimiter(path: Path, csv: CsvConfig) -> None:
    """Refuse a header line without the configured delimiter that holds another usual one."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            header = next((line.strip("\r\n") for line in f if line.strip()), "")
    except OSError as err:
        raise DataError(f"{path} cannot be read ({err.strerror}).") from None
    if csv.delimiter in header:
        return
    found = [d for d in DELIMITERS if d != csv.delimiter and d in header]
    if found:
        raise DataError(
            f"{path}: the header line {header!r} has no {csv.delimiter!r} (data.csv.delimiter), so the file reads "
            f"as a single column; it looks like {found[0]!r}-separated: set data.csv.delimiter: {yaml_value(found[0])}"
            f" in the config."
        )


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


def _time_format(first: str, csv: CsvConfig) -> tuple[str | None, bool]:
    """The format of the time column and whether it is read day first.

    ``data.csv.date_format`` when set; else inferred from the first value, day first when ``data.csv.dayfirst``
    is set, except for dates that start with a four-digit year (pandas would read 2020-01-02 as 1 February)."""
    if csv.date_format:
        return csv.date_format, False
    dayfirst = csv.dayfirst and not re.match(r"\d{4}", first)
    return guess_datetime_format(first, dayfirst=dayfirst), dayfirst


def _parse_timestamps(path: Path, column: str, note: str, raw: pd.Series, csv: CsvConfig):
    """The time column as ``(times, written, offsets)``: naive datetime64[ns] times converted per
    ``data.csv.timezone``, the clock times as written (offsets dropped), and the distinct offsets written.
    DataError on the first empty or bad value."""
    text = raw.str.strip()
    if text.isna().any():
        first_bad = int(np.flatnonzero(text.isna().to_numpy())[0])
        raise DataError(
            f"{path}, column {column!r}{note}: {_row(first_bad)} has an empty timestamp ({ROWS_NOTE}); "
            f"expected {ACCEPTED_TIME}."
        )
    fmt, dayfirst = _time_format(text.iloc[0], csv)
    with warnings.catch_warnings():
        # pandas warns when it cannot infer one format; bad values become NaT and are reported below.
        warnings.simplefilter("ignore", UserWarning)
        # utc=True: values with an offset are converted to UTC, the others are taken as they are.
        parsed = pd.to_datetime(text, format=fmt, dayfirst=dayfirst, errors="coerce", utc=True)
    bad = parsed.isna().to_numpy()
    if bad.any():
        first_bad = int(np.flatnonzero(bad)[0])
        value = text.iloc[first_bad]
        raise DataError(
            f"{path}, column {column!r}{note}: cannot parse {value!r} at {_row(first_bad)} "
            f"as a date/time ({ROWS_NOTE}; {int(bad.sum())} bad value(s) in all)"
            f"{_time_hint(text.iloc[0], value, fmt, first_bad, csv)}; expected {ACCEPTED_TIME}."
        )

    parts = text.str.extract(UTC_OFFSET)
    aware = (parts["utc"].notna() | parts["sign"].notna()).to_numpy()
    if aware.any() and not aware.all():
        i = int(np.flatnonzero(aware != aware[0])[0])
        raise DataError(
            f"{path}, column {column!r}: {_row(i)} ({text.iloc[i]!r}) {_has_offset(aware[i])} but row 1 "
            f"({text.iloc[0]!r}) {_has_offset(aware[0])} ({ROWS_NOTE}); expected every time of a file written "
            "with a UTC offset (2020-01-31T14:30:00+01:00) or none with one."
        )
    # The written offset in minutes: 0 for Z/UTC/GMT and for times without an offset.
    minutes = parts["hours"].astype(float).fillna(0) * 60 + parts["minutes"].astype(float).fillna(0)
    signed = np.where(parts["sign"] == "-", -minutes, minutes)
    offset = pd.Series(pd.to_timedelta(signed, unit="min"), index=text.index)
    utc = parsed.dt.tz_localize(None)  # UTC for values with an offset, the value itself for the others
    written = utc + offset
    if csv.timezone is None:
        times = utc
    elif csv.timezone == AS_WRITTEN:
        times = written
    else:
        # Converted where an offset was written; the others are already times in the zone.
        times = utc.where(~aware, parsed.dt.tz_convert(csv.timezone).dt.tz_localize(None))
    offsets = tuple(sorted({_offset_label(o) for o in offset[aware].unique()}))
    return times.astype("datetime64[ns]"), written.astype("datetime64[ns]"), offsets


def _offset_label(offset: pd.Timedelta) -> str:
    minutes = int(offset.total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _has_offset(aware: bool) -> str:
    return "has a UTC offset" if aware else "has no UTC offset"


def _time_hint(first: str, value: str, fmt: str | None, position: int, csv: CsvConfig) -> str:
    """The likely cause of an unparseable time, for the error message."""
    if csv.date_format:
        return f"; it does not match data.csv.date_format {csv.date_format!r}"
    first_aware, value_aware = bool(UTC_OFFSET.search(first)), bool(UTC_OFFSET.search(value))
    if first_aware != value_aware:
        return (
            f"; it {_has_offset(value_aware)} but row 1 ({first!r}) {_has_offset(first_aware)}: write every time "
            "of a file with a UTC offset or none with one"
        )
    inferred = f"; the format was inferred from row 1 as {fmt!r}" if fmt and position > 0 else ""
    if not csv.dayfirst:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            as_dayfirst = pd.to_datetime(pd.Series([value]), dayfirst=True, errors="coerce").iloc[0]
        if not pd.isna(as_dayfirst):
            return f"{inferred}; it reads as a day-first date: set data.csv.dayfirst: true (or data.csv.date_format)"
    return f"{inferred}; data.csv.date_format sets the format explicitly (e.g. '%d.%m.%Y %H:%M')"


def _accepted_price(csv: CsvConfig) -> str:
    example = "101.25" if csv.decimal == "." else "101,25"
    return f"a plain positive number such as {example} (leave the cell empty for a missing bar)"


def _parse_prices(path: Path, column: str, raw: pd.Series, csv: CsvConfig) -> pd.Series:
    """Parse the price column to float64 (NaN where empty); DataError on non-numeric or non-positive values."""
    text = raw.str.strip()
    numbers = text
    if csv.decimal != ".":
        # A "." in a decimal-comma file is more likely a thousands separator than a decimal mark: refused.
        numbers = text.where(~text.str.contains(".", regex=False), "not a number").str.replace(csv.decimal, ".")
    values = pd.to_numeric(numbers, errors="coerce").astype(np.float64)
    # A value that was written but did not become a finite number (e.g. "1,234.5", "n/a", "inf").
    bad = (text.notna() & ~np.isfinite(values)).to_numpy()
    if bad.any():
        first_bad = int(np.flatnonzero(bad)[0])
        value = text.iloc[first_bad]
        hint = ""
        if csv.decimal == "." and re.fullmatch(r"\d+,\d+", value):
            hint = "; it looks like a decimal comma: set data.csv.decimal: ','"
        raise DataError(
            f"{path}, column {column!r}: non-numeric price {value!r} at {_row(first_bad)} "
            f"({ROWS_NOTE}; {int(bad.sum())} bad value(s) in all){hint}; expected {_accepted_price(csv)}."
        )
    non_positive = (values <= 0).to_numpy()
    if non_positive.any():
        first_bad = int(np.flatnonzero(non_positive)[0])
        raise DataError(
            f"{path}, column {column!r}: non-positive price {text.iloc[first_bad]!r} at {_row(first_bad)} "
            f"({ROWS_NOTE}; {int(non_positive.sum())} such value(s) in all); expected {_accepted_price(csv)}."
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
        backwards = int((table["time"].diff() < pd.Timedelta(0)).sum())
        announce(
            f"{path}: the timestamps are not in increasing order ({backwards} row(s) earlier than the row before "
            f"them); sorted the {len(table)} rows by time"
        )
        # Stable, so equal timestamps keep their file order and "last" below means last in the file.
        table = table.sort_values("time", kind="stable")

    dropped = table["time"].duplicated(keep="last")
    if dropped.any():
        counts = table.loc[dropped, "time"].value_counts(sort=False)
        announce(
            f"{path}: {len(counts)} duplicated timestamp(s), e.g. {counts.index[0]} appears "
            f"{int(counts.iloc[0]) + 1} times; kept the last row of each and dropped {int(dropped.sum())} row(s)"
        )
        table = table.loc[~dropped]
    return table


def _fill_gaps(path: Path, column: str, table: pd.DataFrame, max_ffill: int, csv: CsvConfig) -> pd.Series:
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
            f"nothing before it to fill from; expected {_accepted_price(csv)} in the first row."
        )
    too_long = np.flatnonzero(lengths > max_ffill)
    if too_long.size:
        k = too_long[0]
        start = starts[k]
        raise DataError(
            f"{path}, column {column!r}: a gap of {int(lengths[k])} missing prices starts at "
            f"{_row(int(rows[start]))} ({table['time'].iloc[start]}; {ROWS_NOTE}); at most {max_ffill} "
            f"consecutive missing bars are forward-filled (max_ffill); expected {_accepted_price(csv)}."
        )
    first = int(starts[0])
    announce(
        f"{path}, column {column!r}: forward-filled {int(missing.sum())} missing price(s) in {len(starts)} gap(s) "
        f"from the bar before each gap (the first at {_row(int(rows[first]))}, {table['time'].iloc[first]})"
    )
    return table["price"].ffill()
