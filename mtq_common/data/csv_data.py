"""Real market data from CSV files: one file per instrument, aligned and split by time.

``load_csv_market(data_dir, symbols, sectors)`` returns ``{"train", "val", "test"}`` `MarketData` (see
`mtq_common.data.market`) with ``source="csv"``. Every problem with the input raises `DataError`, whose message
is one paragraph naming the file, the column, the row, the bad value where there is one, and what would be
accepted. The rules:

Files
    One file per instrument: ``data_dir/<SYMBOL>.csv`` (the name must match the symbol exactly), read with
    pandas. Every symbol must have a sector in ``sectors`` (checked before any file is read).

Rows, the time and price columns, order, duplicates, missing prices, delimiter, decimal mark, time zones
    One file's rules: see `mtq_common.data.csv_file` (``csv``: the config's ``data.csv`` options). Without
    ``data.csv.timezone``, a market mixing files written with and without UTC offsets is refused.

Alignment
    Instruments are aligned on the intersection of their timestamps (inner join). Each file that loses rows
    gets a `DataWarning` with the count and the period kept. Alignment that would drop more than half of any
    file's rows (usually one file starting years after the others) is refused, naming every file's period,
    unless ``allow_partial_overlap`` (the config's ``data.allow_partial_overlap``). Files that share no
    timestamp, or too few, only because their times carry different UTC offsets get a message pointing to
    ``data.csv.timezone``.

Splits
    The aligned bars are split by time, never shuffled: with ``splits = (a, b, c)`` and ``T`` aligned bars,
    train is the first ``round(a * T)`` bars, val runs up to ``round((a + b) * T)`` and test is the rest
    (rounding half up). Each split needs at least ``min_bars_per_split`` bars.

Holes
    A stretch with no bar in any file, longer than ``max(10 days, 4 x the median spacing)`` (a market closed
    for a week, as after 11 September 2001, passes), is refused naming the files and the dates: its return
    would be booked as one bar's.

Bar frequency (`infer_bar_frequency`, on the full aligned timestamps)
    From the median positive spacing ``s`` between consecutive bars, with ``D`` trading days a year: 365 when
    at least a tenth of the bars fall on a Saturday or Sunday (a market that trades every day), else 252:

    * ``20 h <= s < 4 days``: daily, ``(bars_per_year, bars_per_day) = (D, 1)``;
    * ``4 days <= s < 20 days``: weekly, ``(52, 0.2)``;
    * ``s >= 20 days``: monthly, ``(12, 1 / 21)``;
    * ``s < 20 h``: intraday, ``bars_per_day`` = median number of bars per calendar date (over dates that
      have bars) and ``bars_per_year = D * bars_per_day``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from mtq_common.data.csv_file import DataError, PriceFile, announce, read_price_file
from mtq_common.data.market import MarketData
from mtq_common.training.config import AS_WRITTEN, CsvConfig
from mtq_common.training.settings import check_csv_config

SPLIT_NAMES = ("train", "val", "test")


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
    csv: CsvConfig | None = None,
    allow_partial_overlap: bool = False,
) -> dict[str, MarketData]:
    """Load ``data_dir/<SYMBOL>.csv`` for each symbol, align them and split by time.

    Args:
        data_dir: directory holding one CSV per instrument.
        symbols: instruments to load; their order is the column order of ``prices``.
        sectors: symbol -> sector (asset class) for every symbol.
        splits: train/val/test fractions: three positive numbers summing to 1.
        min_bars_per_split: the fewest bars any split may have.
        max_ffill: the longest run of missing prices that is forward-filled.
        csv: how the files are written (delimiter, decimal mark, dates, time zone); None: the defaults.
        allow_partial_overlap: accept an alignment that drops more than half of some file's rows.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` `MarketData` with ``source="csv"``, consecutive in time.

    Raises:
        DataError: on any problem with the arguments or the files (see the module docstring for the rules).
    """
    symbols = list(symbols)
    splits = _check_arguments(symbols, sectors, splits, min_bars_per_split, max_ffill)
    files, timestamps, prices = _read_and_align(data_dir, symbols, max_ffill, False, csv, allow_partial_overlap)

    bounds = _split_bounds(len(timestamps), splits)
    sizes = [hi - lo for lo, hi in bounds]
    if min(sizes) < min_bars_per_split:
        raise DataError(
            f"too few rows: the {len(timestamps)} aligned rows split {_fmt_splits(splits)} give "
            f"{_fmt_sizes(sizes)} rows, but each split needs at least {min_bars_per_split} (min_bars_per_split); "
            f"at least {_min_total_bars(splits, min_bars_per_split)} aligned rows would be needed."
            f"{_overlap_note(files, len(timestamps))}"
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
    ``(D, 1)``, 4 to 20 days weekly ``(52, 0.2)``, 20 days or more monthly ``(12, 1/21)``. Below 20 hours the
    data is intraday: ``bars_per_day`` is the median number of bars per calendar date (over dates with bars)
    and ``bars_per_year = D * bars_per_day``. ``D``, the trading days in a year, is 365 where at least a tenth
    of the bars fall on a weekend (a market open every day: 2/7 of its bars do), else 252.

    Raises:
        ValueError: fewer than two distinct timestamps (no spacing to measure).
    """
    ts = np.sort(np.asarray(pd.to_datetime(np.asarray(timestamps).ravel()), dtype="datetime64[ns]"))
    gaps = np.diff(ts)
    if not (gaps > np.timedelta64(0, "ns")).any():
        raise ValueError(f"cannot infer the bar frequency from {ts.size} timestamp(s): need two distinct ones")

    spacing = pd.Timedelta(median_spacing(gaps))
    if spacing >= pd.Timedelta(days=20):
        return 12.0, 1.0 / 21.0
    if spacing >= pd.Timedelta(days=4):
        return 52.0, 0.2
    weekend = (pd.DatetimeIndex(ts).day_of_week >= 5).mean()
    days_per_year = 365.0 if weekend >= 0.1 else 252.0
    if spacing >= pd.Timedelta(hours=20):
        return days_per_year, 1.0
    # Intraday: count bars per calendar date; the median ignores partial first/last sessions.
    bars_per_date = pd.Series(ts).dt.normalize().value_counts()
    bars_per_day = float(np.median(bars_per_date.to_numpy()))
    return days_per_year * bars_per_day, bars_per_day


def median_spacing(gaps: np.ndarray) -> np.timedelta64:
    """The median of the positive `gaps` (timedelta64[ns]) between consecutive timestamps: the bar spacing."""
    return np.median(gaps[gaps > np.timedelta64(0, "ns")].astype(np.int64)).astype("timedelta64[ns]")


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
# The whole series, unsplit (--mode act)
# ----------------------------------------------------------------------------------------------------------


def load_csv_series(data_dir, symbols: list[str], sectors: dict[str, str], max_ffill: int = 3,
                    strict_order: bool = False, csv: CsvConfig | None = None,
                    allow_partial_overlap: bool = False) -> MarketData:  # fmt: skip
    """The whole aligned series of ``data_dir/<SYMBOL>.csv`` as one `MarketData` (``split="all"``), read by
    the same rules (and ``csv`` options) as `load_csv_market`. With ``strict_order`` unsorted or duplicated
    timestamps are an error instead of being repaired (acting on live data must not guess which bar is the
    latest)."""
    symbols = list(symbols)
    _check_arguments(symbols, sectors, (0.7, 0.15, 0.15), 1, max_ffill)
    _, timestamps, prices = _read_and_align(data_dir, symbols, max_ffill, strict_order, csv, allow_partial_overlap)
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


# ----------------------------------------------------------------------------------------------------------
# Alignment and splits
# ----------------------------------------------------------------------------------------------------------


def _read_and_align(data_dir, symbols, max_ffill, strict_order, csv, allow_partial_overlap):
    """Read every symbol's file and align them: ``(files, timestamps [T], prices [T, N])``."""
    csv = csv or CsvConfig()
    check_csv_config(csv, "the csv options")
    paths = _find_files(Path(data_dir), symbols)
    files = [read_price_file(path, max_ffill, strict_order, csv) for path in paths]
    _check_time_zones(files, csv)
    timestamps, prices = _align(files, csv, allow_partial_overlap)
    _check_holes(files, timestamps)
    return files, timestamps, prices


def _check_holes(files: list[PriceFile], timestamps: np.ndarray) -> None:
    """Refuse a stretch with no aligned bar longer than ``max(10 days, 4 x the median spacing)``: the price
    move across it would be booked as one bar's return. Names the files that have no row in it."""
    gaps = np.diff(timestamps)
    if gaps.size == 0:
        return
    spacing = median_spacing(gaps)
    limit = max(np.timedelta64(10, "D"), 4 * spacing)
    holes = np.flatnonzero(gaps > limit)
    if holes.size == 0:
        return
    t = holes[np.argmax(gaps[holes])]  # the longest
    start, end = timestamps[t], timestamps[t + 1]
    inside = [(f, f.series.index.to_numpy(dtype="datetime64[ns]")) for f in files]
    empty = [f for f, times in inside if not ((times > start) & (times < end)).any()]
    who = ("every file has" if len(empty) == len(files) else "the files share" if not empty else
           f"{_names(empty)} {'has' if len(empty) == 1 else 'have'}")  # fmt: skip
    days = (end - start) / np.timedelta64(1, "D")
    raise DataError(
        f"{who} no row between {_when(pd.Timestamp(start))} and {_when(pd.Timestamp(end))} ({days:g} days, where "
        f"bars are {_in_words(spacing)} apart; the longest of {holes.size} such hole(s)): its price move would be "
        f"booked as one bar's return. Expected no stretch without bars longer than {_in_words(limit)}: fill the "
        "missing rows, or cut the files to one side of the hole."
    )


def _in_words(span: np.timedelta64) -> str:
    """A time span for messages, in days, or in hours below a day."""
    days = span / np.timedelta64(1, "D")
    return f"{days:g} day(s)" if days >= 1 else f"{days * 24:g} hour(s)"


def _check_time_zones(files: list[PriceFile], csv: CsvConfig) -> None:
    """Without ``data.csv.timezone``, refuse a mix of files with and without UTC offsets: the naive times'
    zone is unknown, so any alignment with the others would be a guess."""
    aware = [f for f in files if f.offsets]
    naive = [f for f in files if not f.offsets]
    if csv.timezone is None and aware and naive:
        raise DataError(
            f"{_offsets(aware)} {'is' if len(aware) == 1 else 'are'} written with UTC offsets and {_names(naive)} "
            "without: their times cannot be compared as they are. Set "
            "data.csv.timezone to the zone the times without an offset are in (e.g. UTC or America/New_York; "
            f"the times with an offset are converted to it), or data.csv.timezone: {AS_WRITTEN} to compare the "
            "clock times as written."
        )


def _align(files: list[PriceFile], csv: CsvConfig, allow_partial_overlap: bool) -> tuple[np.ndarray, np.ndarray]:
    """Inner-join the instruments on time: (timestamps datetime64[ns] [T], prices float64 [T, N]).

    A `DataWarning` for every file that loses rows; a `DataError` when a file would lose more than half of
    its rows and ``allow_partial_overlap`` is not set."""
    common = files[0].series.index
    for f in files[1:]:
        common = common.intersection(f.series.index)
    common = common.sort_values()
    if len(common) == 0:
        raise DataError(
            "the files share no timestamp (instruments are aligned on the timestamps present in every file):"
            f"{_overlap_note(files, 0)}{_zone_hint(files, 0, csv)} Expected files covering a common period with "
            "the same bar times."
        )
    kept = len(common)
    period = f"{_when(common[0])} to {_when(common[-1])}"
    most_lost = [f for f in files if kept < len(f.series) / 2]
    if most_lost and not allow_partial_overlap:
        raise DataError(
            f"aligning the files on the timestamps they all share would drop more than half of the rows of "
            f"{_names(most_lost)}: the shared period runs {period} ({kept} rows{_limits(files)})."
            f"{_overlap_note(files, kept)}{_zone_hint(files, kept, csv)} Set data.allow_partial_overlap: true in the "
            "config to use the shared period anyway, or give files that cover a common period."
        )
    for f in files:
        dropped = len(f.series) - kept
        if dropped:
            announce(
                f"{f.path}: aligning the files on the timestamps they all share dropped {dropped} of its "
                f"{len(f.series)} rows ({dropped / len(f.series):.0%}; the file runs {_when(f.series.index[0])} "
                f"to {_when(f.series.index[-1])}); kept {kept} rows from {period}"
            )
    prices = np.column_stack([f.series.reindex(common).to_numpy(dtype=np.float64) for f in files])
    return common.to_numpy(dtype="datetime64[ns]"), prices


def _zone_hint(files: list[PriceFile], overlap: int, csv: CsvConfig) -> str:
    """Point to ``data.csv.timezone: as_written`` when the files' times differ only by their UTC offsets:
    their clock times as written share more timestamps than the converted times do (empty otherwise)."""
    aware = [f for f in files if f.offsets]
    if csv.timezone == AS_WRITTEN or len(aware) < 2 or len({f.offsets for f in aware}) < 2:
        return ""
    written = files[0].written
    for f in files[1:]:
        written = written.intersection(f.written)
    if len(written) <= overlap:
        return ""
    return (
        f" The files' times differ by their UTC offsets: {_offsets(aware)}; as written, without the offsets, "
        f"they share {len(written)} timestamps: the same clock times in different zones, such as daily bars "
        f"stamped at each exchange's local midnight. Set data.csv.timezone: {AS_WRITTEN} to align them on the "
        "clock times as written."
    )


def _overlap_note(files: list[PriceFile], overlap: int) -> str:
    """Per file: its rows and time range, and how many of them survive the alignment (empty if all do)."""
    if all(len(f.series) == overlap for f in files):
        return ""
    per_file = "; ".join(
        f"{f.path} has {len(f.series)} rows from {_when(f.series.index[0])} to {_when(f.series.index[-1])}, "
        f"{overlap} of them shared by all files"
        for f in files
    )
    return f" Overlap per file: {per_file}."


def _when(timestamp: pd.Timestamp) -> str:
    """A time for messages: the date alone at midnight (daily bars), else date and time."""
    return f"{timestamp:%Y-%m-%d}" if timestamp == timestamp.normalize() else str(timestamp)


def _limits(files: list[PriceFile]) -> str:
    """Which files bound the shared period: the one that starts last and the one that ends first."""
    starts = [f.series.index[0] for f in files]
    ends = [f.series.index[-1] for f in files]
    out = ""
    if max(starts) > min(starts):
        f = files[int(np.argmax(starts))]
        out += f"; {f.path.name} starts last, on {_when(max(starts))}"
    if min(ends) < max(ends):
        f = files[int(np.argmin(ends))]
        out += f"; {f.path.name} ends first, on {_when(min(ends))}"
    return out


def _names(files: list[PriceFile]) -> str:
    return ", ".join(f.path.name for f in files)


def _offsets(files: list[PriceFile]) -> str:
    """The files' names with the UTC offsets written in them, e.g. ``AAA.csv (+01:00), BBB.csv (-05:00)``."""
    return ", ".join(f"{f.path.name} ({' and '.join(f.offsets)})" for f in files)


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
