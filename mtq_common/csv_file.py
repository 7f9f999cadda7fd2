"""One CSV file of prices -> a clean price series (`read_price_series`), or a `DataError` whose message
is one paragraph naming the file, the column, the row, the bad value and what would be accepted.
`mtq_common.csv_data` aligns the files of a market and splits them by time. One file's rules:

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
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.tseries.api import guess_datetime_format

log = logging.getLogger("mtq")

TIME_COLUMNS = ("date", "datetime", "timestamp", "time")
ADJ_CLOSE_COLUMNS = ("adj close", "adj_close", "adjclose")
CLOSE_COLUMN = "close"

ROWS_NOTE = "rows are data rows counted from 1 after the header"
ACCEPTED_PRICE = "a plain positive number such as 101.25 (leave the cell empty for a missing bar)"
ACCEPTED_TIME = "a date or date-time such as 2020-01-31 or 2020-01-31 14:30:00, in one format for the whole column"


class DataError(ValueError):
    """Bad market data: the message names the file, the column and the row, and what would be accepted."""


def read_price_series(path: Path, max_ffill: int, strict_order: bool = False) -> pd.Series:
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
