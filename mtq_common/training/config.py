"""Typed configuration: `config/agents.yaml` supplies defaults, explicit CLI flags override them.

The file has the seed's sections (`training`, `environment`, `reward`) plus `risk`, `instruments`,
`specialists` and `data`. Every section is a dataclass below; `load_config` reads a YAML file into
them and `validate` checks every value. Unknown keys, wrong types and out-of-range values raise
`ConfigError` with a message that names the file and the key.

Every script reads its flags through `mtq_common.training.settings.parse_args`, which takes the file's values as
the defaults of the script's tyro `Args` and writes the final values back into the `Config`. One
precedence rule everywhere: built-in default < YAML file < CLI flag.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "config" / "agents.yaml"


class ConfigError(ValueError):
    """A bad configuration value: the message names the file, the key, the value and what is accepted."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingConfig:
    """PPO hyperparameters and run sizes (the seed's `training` section)."""

    learning_rate: float = 0.0003
    batch_size: int = 256
    """PPO minibatch size (as in the seed)."""
    n_epochs: int = 10
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    phase_1_timesteps: int = 500_000
    phase_2_timesteps: int = 300_000
    phase_3_timesteps: int = 1_000_000
    meta_update_freq: int = 1
    specialist_update_freq: int = 5
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`."""
    n_envs: int = 64
    """Environment rows per policy (each specialist, or the portfolio) stepped in one batch."""


@dataclass
class EnvironmentConfig:
    """Trading mechanics and the hard portfolio limits (the seed's `environment` section)."""

    episode_length: int = 1000
    warmup_steps: int = 50
    """Bars at the start of an episode's history used to warm up the reward's moving moments."""
    initial_capital: float = 100_000.0
    transaction_cost: float = 0.003
    """Cost per unit of turnover (|w - w_prev| summed over instruments)."""
    max_position_size: float = 0.1
    stop_loss_pct: float = 0.02
    max_portfolio_var: float = 0.02
    max_correlation_exposure: float = 0.7
    max_sector_allocation: float = 0.4


@dataclass
class RewardConfig:
    """Reward shaping weights (the seed's `reward` section); each one has an effect."""

    risk_penalty_weight: float = 1.0
    transaction_cost_weight: float = 1.0
    diversification_bonus_weight: float = 0.5
    sharpe_target: float = 2.0
    max_drawdown_target: float = 0.15
    risk_free_rate: float = 0.02
    downside_volatility_weight: float = 1.0


@dataclass
class RiskConfig:
    """Risk model settings."""

    var_confidence: float = 0.95
    correlation_window: int = 100
    """Span (bars) of the exponentially weighted covariance."""


@dataclass
class InstrumentSpec:
    """One tradable symbol: its sector (= asset class = specialist) and synthetic-market parameters."""

    sector: str
    annual_vol: float = 0.15
    """Annualised volatility of the synthetic path (ignored for CSV data)."""
    cost: float | None = None
    """Cost per unit of turnover of this instrument (default: `environment.transaction_cost` x `cost_multiplier`)."""
    cost_multiplier: float = 1.0
    """Scales `transaction_cost` for this instrument (ignored when `cost` is set)."""
    signal: float = 1.0
    """Multiplies the synthetic latent drift of this instrument (0: a pure-noise instrument)."""
    contract_size: float = 1.0
    """Units of the instrument in one contract (`pipeline.py --mode act` rounds units to whole contracts)."""


@dataclass
class SyntheticConfig:
    """Synthetic market generator settings (see `mtq_common.data.synthetic`)."""

    seed: int = 7
    """Market seed; train, validation and test paths come from three different streams of it."""
    train_bars: int = 20_000
    val_bars: int = 5_000
    test_bars: int = 5_000
    drift_half_life: float = 60.0
    """Half-life in bars of the latent AR(1) drift."""
    drift_scale: float = 3.0
    """Stationary std of the latent drift, in units of the instrument's volatility (annualised)."""


AS_WRITTEN = "as_written"
"""`data.csv.timezone` value: keep every time's clock time as written in the file and drop its UTC offset."""


@dataclass
class CsvConfig:
    """How the CSV files are written (see `mtq_common.data.csv_file`)."""

    delimiter: str = ","
    """The character between columns: `;` for many European exports, `"\\t"` for tab-separated files."""
    decimal: str = "."
    """The decimal mark of the prices: `.` (101.25) or `,` (101,25)."""
    dayfirst: bool = False
    """Read 01/02/2020 as 1 February (dates that start with a four-digit year are always year-month-day)."""
    date_format: str | None = None
    """The strftime format of the time column, e.g. `%d.%m.%Y %H:%M` (unset: inferred from the first row)."""
    timezone: str | None = None
    """Zone that times with a UTC offset are converted to before aligning, e.g. `UTC` or `America/New_York`;
    times without an offset are taken as times in it. `as_written`: keep the clock times written in the files
    and drop their offsets (daily bars stamped at each exchange's local midnight). Unset: offsets converted to
    UTC, and files with and without offsets are not mixed."""


@dataclass
class DataConfig:
    """Where the market comes from and how it is split."""

    source: str = "synthetic"
    """`synthetic` (built-in generator) or `csv` (`data_dir/<SYMBOL>.csv`)."""
    data_dir: str | None = None
    instruments: list[str] = field(
        default_factory=lambda: ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD", "WTIUSD", "SPX500", "NAS100", "US30"]
    )
    """Instruments traded, in column order."""
    splits: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    """Train / validation / test fractions for CSV data (split by time)."""
    folds: int = 0
    """Walk-forward folds (`pipeline.py --mode walkforward` sets it; 0: the plain splits above)."""
    fold: int = 0
    """Which walk-forward fold this run trains and tests (0 to folds - 1; see `mtq_common.data.splits`)."""
    allow_partial_overlap: bool = False
    """Accept CSV files whose common period (they are aligned on the timestamps they all share) keeps less
    than half of some file's rows; refused by default, since it usually means one file starts much later."""
    csv: CsvConfig = field(default_factory=CsvConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


def default_instruments() -> dict[str, InstrumentSpec]:
    """The built-in registry: symbol -> sector and annual volatility (DESIGN section 3)."""
    table = {
        "EURUSD": ("forex", 0.07),
        "GBPUSD": ("forex", 0.08),
        "USDJPY": ("forex", 0.08),
        "XAUUSD": ("commodities", 0.15),
        "WTIUSD": ("commodities", 0.35),
        "SPX500": ("equity", 0.17),
        "NAS100": ("equity", 0.22),
        "US30": ("equity", 0.16),
    }
    return {sym: InstrumentSpec(sector=sec, annual_vol=vol) for sym, (sec, vol) in table.items()}


@dataclass
class Config:
    """The whole configuration."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    risk: RiskConfig = field(default_factory=RiskConfig)
    instruments: dict[str, InstrumentSpec] = field(default_factory=default_instruments)
    """Registry of known symbols; the YAML section adds to (or overrides) the built-in one."""
    specialists: list[str] = field(default_factory=lambda: ["forex", "commodities", "equity"])
    """Specialists in order; each trades the instruments whose sector has its name."""
    data: DataConfig = field(default_factory=DataConfig)
    source_path: str = "<defaults>"
    """Where the values came from (for error messages); not a YAML key."""

    # -- derived views ------------------------------------------------------------------------
    def sector_of(self, symbol: str) -> str:
        return self.instruments[symbol].sector

    def active_specialists(self) -> list[str]:
        """Specialists that own at least one traded instrument (others are skipped)."""
        sectors = {self.sector_of(s) for s in self.data.instruments}
        return [name for name in self.specialists if name in sectors]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source_path")
        return out

    def hash(self) -> str:
        """Stable short hash of every value that changes what is trained (resume refuses a mismatch)."""
        payload = self.to_dict()
        payload["training"] = {k: v for k, v in payload["training"].items() if k != "device"}
        for spec in payload["instruments"].values():
            spec.pop("contract_size")  # how a book is rounded to contracts, not what is trained
        # Keys added after runs were started: at their defaults the hash is unchanged, so those runs still resume.
        if payload["data"]["csv"] == dataclasses.asdict(CsvConfig()):
            payload["data"].pop("csv")
        if not payload["data"]["allow_partial_overlap"]:
            payload["data"].pop("allow_partial_overlap")
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------

SECTIONS = {
    "training": TrainingConfig,
    "environment": EnvironmentConfig,
    "reward": RewardConfig,
    "risk": RiskConfig,
}


NESTED = {"SyntheticConfig": SyntheticConfig, "CsvConfig": CsvConfig}
"""Sections inside `data`, by their annotation."""


def _coerce(value: Any, annotation: str, where: str, key: str) -> Any:
    """Check a YAML scalar against a field's annotation; ints are accepted for floats."""
    kind = annotation.replace(" ", "")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: {key} must be a whole number, got {value!r}")
        return value
    if kind == "float|None":
        return None if value is None else _coerce(value, "float", where, key)
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return value
    if kind == "str|None":
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string or null, got {value!r}")
        return value
    if kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of strings, got {value!r}")
        return list(value)
    if kind == "list[float]":
        if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{where}: {key} must be a list of numbers, got {value!r}")
        return [float(v) for v in value]
    raise AssertionError(f"unhandled annotation {annotation} for {key}")


def _fill(cls: type, raw: Any, where: str, prefix: str, base: Any = None) -> Any:
    """Build dataclass `cls` from a YAML mapping, starting from `base` (or the defaults)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: section '{prefix}' must be a mapping, got {type(raw).__name__}")
    obj = base if base is not None else cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in known or key == "source_path":
            raise ConfigError(
                f"{where}: unknown key '{prefix}.{key}'; known keys of '{prefix}': {', '.join(sorted(known))}"
            )
        annotation = known[key].type
        if annotation in NESTED:
            value = _fill(NESTED[annotation], value, where, f"{prefix}.{key}")
        else:
            value = _coerce(value, annotation, where, f"{prefix}.{key}")
        setattr(obj, key, value)
    return obj


def config_from_dict(raw: dict[str, Any], where: str = "<dict>", require_data_dir: bool = True) -> Config:
    """Build and validate a `Config` from a mapping shaped like the YAML file (`validate` for `require_data_dir`)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections")
    known = [f.name for f in dataclasses.fields(Config) if f.name != "source_path"]
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}: unknown section '{key}'; known sections: {', '.join(known)}")
    cfg = Config(source_path=where)
    for name, cls in SECTIONS.items():
        setattr(cfg, name, _fill(cls, raw.get(name), where, name))
    cfg.data = _fill(DataConfig, raw.get("data"), where, "data")
    instruments = raw.get("instruments") or {}
    if not isinstance(instruments, dict):
        raise ConfigError(f"{where}: 'instruments' must map SYMBOL -> {{sector: ..., annual_vol: ...}}")
    for symbol, spec in instruments.items():
        if not isinstance(spec, dict) or "sector" not in spec:
            raise ConfigError(
                f"{where}: instruments.{symbol} needs at least a sector, e.g. '{symbol}: {{sector: equity}}'"
            )
        base = InstrumentSpec(sector=str(spec["sector"]))
        cfg.instruments[str(symbol)] = _fill(InstrumentSpec, spec, where, f"instruments.{symbol}", base)
    if "specialists" in raw:
        cfg.specialists = _coerce(raw["specialists"], "list[str]", where, "specialists")
    validate(cfg, require_data_dir)
    return cfg


def load_config(path: str | Path | None = None, require_data_dir: bool = True) -> Config:
    """Read a YAML config file (None: the built-in defaults) and validate it.

    `require_data_dir=False`: a file with `data.source: csv` may leave `data.data_dir` to the command line
    (`--data-dir`); `mtq_common.training.settings` validates the final config with it.
    """
    if path is None:
        return validate(Config(), require_data_dir)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass --config PATH to an existing YAML file)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return config_from_dict(raw, where=str(path), require_data_dir=require_data_dir)


def _check(cond: bool, where: str, key: str, value: Any, accepted: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {key} = {value!r} is out of range; accepted: {accepted}")


def validate(cfg: Config, require_data_dir: bool = True) -> Config:
    """Check every value's range; raise `ConfigError` naming the first bad key.

    `require_data_dir=False` accepts `data.source: csv` without `data.data_dir` (still to come from `--data-dir`).
    """
    w = cfg.source_path
    t, e, r, k, d = cfg.training, cfg.environment, cfg.reward, cfg.risk, cfg.data
    _check(0 < t.learning_rate < 1, w, "training.learning_rate", t.learning_rate, "0 < value < 1")
    for key in ("batch_size", "n_epochs", "n_envs", "meta_update_freq", "specialist_update_freq"):
        _check(getattr(t, key) >= 1, w, f"training.{key}", getattr(t, key), "a whole number >= 1")
    for key in ("phase_1_timesteps", "phase_2_timesteps", "phase_3_timesteps"):
        _check(getattr(t, key) >= 0, w, f"training.{key}", getattr(t, key), "a whole number >= 0")
    _check(0 < t.gamma <= 1, w, "training.gamma", t.gamma, "0 < value <= 1")
    _check(0 <= t.gae_lambda <= 1, w, "training.gae_lambda", t.gae_lambda, "0 <= value <= 1")
    _check(0 < t.clip_range < 1, w, "training.clip_range", t.clip_range, "0 < value < 1")
    _check(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
        w,
        "training.device",
        t.device,
        "auto, cpu, cuda or cuda:N",
    )
    _check(e.episode_length >= 2, w, "environment.episode_length", e.episode_length, "a whole number >= 2")
    _check(e.warmup_steps >= 0, w, "environment.warmup_steps", e.warmup_steps, "a whole number >= 0")
    _check(e.initial_capital > 0, w, "environment.initial_capital", e.initial_capital, "a positive number")
    _check(0 <= e.transaction_cost < 1, w, "environment.transaction_cost", e.transaction_cost, "0 <= value < 1")
    for key in (
        "max_position_size",
        "stop_loss_pct",
        "max_portfolio_var",
        "max_correlation_exposure",
        "max_sector_allocation",
    ):
        value = getattr(e, key)
        _check(0 < value <= 1, w, f"environment.{key}", value, "a limit in (0, 1]")
    for key in (
        "risk_penalty_weight",
        "transaction_cost_weight",
        "diversification_bonus_weight",
        "downside_volatility_weight",
    ):
        value = getattr(r, key)
        _check(value >= 0 and math.isfinite(value), w, f"reward.{key}", value, "a finite weight >= 0")
    _check(math.isfinite(r.sharpe_target), w, "reward.sharpe_target", r.sharpe_target, "a finite number")
    _check(0 < r.max_drawdown_target <= 1, w, "reward.max_drawdown_target", r.max_drawdown_target, "(0, 1]")
    _check(-0.5 < r.risk_free_rate < 0.5, w, "reward.risk_free_rate", r.risk_free_rate, "-0.5 < value < 0.5")
    _check(0.5 < k.var_confidence < 1, w, "risk.var_confidence", k.var_confidence, "0.5 < value < 1")
    _check(k.correlation_window >= 2, w, "risk.correlation_window", k.correlation_window, "a whole number >= 2")
    for symbol, spec in cfg.instruments.items():
        _check(spec.annual_vol > 0, w, f"instruments.{symbol}.annual_vol", spec.annual_vol, "a positive number")
        _check(spec.cost_multiplier >= 0, w, f"instruments.{symbol}.cost_multiplier", spec.cost_multiplier, ">= 0")
        if spec.cost is not None:
            ok = math.isfinite(spec.cost) and 0 <= spec.cost < 1
            _check(ok, w, f"instruments.{symbol}.cost", spec.cost, "a cost per unit of turnover, 0 <= value < 1")
        _check(spec.signal >= 0, w, f"instruments.{symbol}.signal", spec.signal, ">= 0")
        size = spec.contract_size
        _check(math.isfinite(size) and size > 0, w, f"instruments.{symbol}.contract_size", size, "a positive number")
    _check(d.source in ("synthetic", "csv"), w, "data.source", d.source, "synthetic or csv")
    if require_data_dir and d.source == "csv" and not d.data_dir:
        raise ConfigError(
            f"{w}: data.source is csv but data.data_dir is not set: set data.data_dir to the folder of "
            "<SYMBOL>.csv files, or pass --data-dir FOLDER"
        )
    check_csv_config(d.csv, w)
    _check(len(d.instruments) >= 1, w, "data.instruments", d.instruments, "at least one symbol")
    _check(len(set(d.instruments)) == len(d.instruments), w, "data.instruments", d.instruments, "no repeated symbol")
    for symbol in d.instruments:
        if symbol not in cfg.instruments:
            raise ConfigError(
                f"{w}: data.instruments: unknown symbol {symbol!r}; known: {', '.join(sorted(cfg.instruments))}. "
                f"Add it under 'instruments:' with its sector, e.g. '{symbol}: {{sector: equity}}'"
            )
    _check(
        len(d.splits) == 3 and all(s > 0 for s in d.splits) and abs(sum(d.splits) - 1) < 1e-6,
        w,
        "data.splits",
        d.splits,
        "three positive fractions summing to 1, e.g. [0.7, 0.15, 0.15]",
    )
    _check(d.folds == 0 or d.folds >= 2, w, "data.folds", d.folds, "0 (no walk-forward) or at least 2 folds")
    _check(d.folds == 0 or 0 <= d.fold < d.folds, w, "data.fold", d.fold, f"0 to {d.folds - 1}")
    s = d.synthetic
    _check(s.seed >= 0, w, "data.synthetic.seed", s.seed, "a whole number >= 0")
    for key in ("train_bars", "val_bars", "test_bars"):
        _check(getattr(s, key) >= 200, w, f"data.synthetic.{key}", getattr(s, key), "a whole number >= 200")
    _check(s.drift_half_life > 0, w, "data.synthetic.drift_half_life", s.drift_half_life, "a positive number")
    _check(s.drift_scale >= 0, w, "data.synthetic.drift_scale", s.drift_scale, ">= 0")
    _check(isinstance(d.allow_partial_overlap, bool), w, "data.allow_partial_overlap", d.allow_partial_overlap,
           "true or false")  # fmt: skip
    _check(len(cfg.specialists) >= 1, w, "specialists", cfg.specialists, "at least one specialist name")
    for symbol in d.instruments:
        sector = cfg.instruments[symbol].sector
        if sector not in cfg.specialists:
            raise ConfigError(
                f"{w}: instruments.{symbol}.sector = {sector!r} has no specialist; "
                f"specialists: {', '.join(cfg.specialists)} (add {sector!r} to 'specialists:')"
            )
    return cfg


def check_csv_config(csv: CsvConfig, where: str) -> None:
    """Check the `data.csv` options (also called by the CSV loaders); raise `ConfigError` naming the bad key."""
    if not (isinstance(csv.delimiter, str) and len(csv.delimiter) == 1 and csv.delimiter not in '"\r\n'):
        raise ConfigError(
            f"{where}: data.csv.delimiter = {csv.delimiter!r} is not accepted; accepted: one character such as "
            "',', ';', '|' or \"\\t\" (a tab, in double quotes in YAML)"
        )
    if csv.decimal not in (".", ","):
        raise ConfigError(f"{where}: data.csv.decimal = {csv.decimal!r} is not accepted; accepted: '.' or ','")
    if csv.decimal == csv.delimiter:
        raise ConfigError(
            f"{where}: data.csv.decimal and data.csv.delimiter are both {csv.delimiter!r}: a file whose prices are "
            "written 101,25 separates its columns with another character, e.g. data.csv.delimiter: ';'"
        )
    if not isinstance(csv.dayfirst, bool):
        raise ConfigError(f"{where}: data.csv.dayfirst = {csv.dayfirst!r} is not accepted; accepted: true or false")
    if csv.date_format is not None:
        if not _is_date_format(csv.date_format):
            raise ConfigError(
                f"{where}: data.csv.date_format = {csv.date_format!r} is not a date format; accepted: a strftime "
                "format with a %-directive for each part, e.g. '%d/%m/%Y' or '%Y-%m-%d %H:%M:%S', or null (inferred)"
            )
        if csv.dayfirst:
            raise ConfigError(
                f"{where}: data.csv.dayfirst and data.csv.date_format are both set: the format already says where "
                "the day is; set one of them"
            )
    if csv.timezone is not None and csv.timezone != AS_WRITTEN and not _is_time_zone(csv.timezone):
        raise ConfigError(
            f"{where}: data.csv.timezone = {csv.timezone!r} is not a time zone; accepted: a zone name such as UTC, "
            f"Europe/London or America/New_York, {AS_WRITTEN} (keep the clock times as written), or null"
        )


def _is_date_format(fmt: Any) -> bool:
    """A strftime format that reads back what it writes (an unknown %-directive does not)."""
    import datetime

    if not isinstance(fmt, str) or "%" not in fmt:
        return False
    sample = datetime.datetime(2001, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc)
    try:
        datetime.datetime.strptime(sample.strftime(fmt), fmt)
    except ValueError:
        return False
    return True


def _is_time_zone(name: Any) -> bool:
    """A zone name that pandas converts times to (the IANA database: UTC, Europe/London, ...)."""
    import pandas as pd

    if not isinstance(name, str):
        return False
    try:
        pd.Timestamp("2000-01-01", tz=name)
    except (KeyError, ValueError, TypeError):  # zoneinfo's ZoneInfoNotFoundError is a KeyError
        return False
    return True
