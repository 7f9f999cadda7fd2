"""How a run's settings are read and checked: the YAML file (`load_config`, `config_from_dict`), every value's
range (`validate`, `check_csv_config`), and the command-line flags over the file (`parse_args`,
`config_from_args`), every script's one helper.

`parse_args(Args, ...)` reads `--config` from the command line, loads the file, uses its values as the defaults
of the script's tyro `Args` (so `--help` shows them), lets explicit flags override them, and writes the result
back into the `Config` the environments receive (`config_from_args`). One precedence rule everywhere: built-in
default < YAML file < CLI flag. A file is read once per process (`read_yaml`, keyed by its path and its
modification time): a phase start, or the pipeline's phases in one process, parse it from that one read.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import tyro
import yaml

from mtq_common.training.config import (
    AS_WRITTEN,
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    CsvConfig,
    DataConfig,
    EnvironmentConfig,
    InstrumentSpec,
    RewardConfig,
    RiskConfig,
    SyntheticConfig,
    TrainingConfig,
)
from mtq_common.training.distributed import DEVICE_NAME

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
    raw = _renamed_keys(raw, where)
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


RENAMED = {("training", "batch_size"): "minibatch_size"}
"""Keys read under their old name with a deprecation line: `(section, old key) -> new key`."""


def _renamed_keys(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """`raw` with every old key of `RENAMED` under its new name (a line on stderr says so; both is an error)."""
    for (section, old), new in RENAMED.items():
        part = raw.get(section)
        if isinstance(part, dict) and old in part:
            if new in part:
                raise ConfigError(f"{where}: {section}.{old} and {section}.{new} are the same setting; keep {new}")
            deprecated(f"{where}: {section}.{old} is deprecated, read as {section}.{new}; rename it")
            raw = {**raw, section: {(new if key == old else key): value for key, value in part.items()}}
    return raw


def deprecated(message: str) -> None:
    """A deprecation line for the user: a `FutureWarning` (shown by default, once per place)."""
    warnings.warn(message, FutureWarning, stacklevel=3)


def load_config(path: str | Path | None = None, require_data_dir: bool = True) -> Config:
    """Read a YAML config file (None: the built-in defaults) and validate it.

    `require_data_dir=False`: a file with `data.source: csv` may leave `data.data_dir` to the command line
    (`--data-dir`); `config_from_args` validates the final config with it.
    """
    if path is None:
        return validate(Config(), require_data_dir)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass --config PATH to an existing YAML file)")
    stat = path.stat()
    raw = copy.deepcopy(read_yaml(str(path.resolve()), stat.st_mtime_ns, stat.st_size))  # the caller's own copy
    return config_from_dict(raw, where=str(path), require_data_dir=require_data_dir)


@functools.lru_cache(maxsize=8)
def read_yaml(path: str, mtime_ns: int, size: int) -> Any:
    """The parsed YAML file at `path`, read once per process for each version of it (its modification time
    and size are part of the key, so an edited file is read again)."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file in UTF-8 ({exc}); expected a YAML config") from None


def finite_at_least(x: float, low: float, above: bool = False) -> bool:
    """Whether `x` is a finite number >= `low` (> `low` with `above`): `x >= 0` alone lets inf and NaN through."""
    return math.isfinite(x) and (x > low if above else x >= low)


def _check(cond: bool, where: str, key: str, value: Any, accepted: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {key} = {value!r} is out of range; accepted: {accepted}")


def validate(cfg: Config, require_data_dir: bool = True) -> Config:
    """Check every value's range; raise `ConfigError` naming the first bad key.

    `require_data_dir=False` accepts `data.source: csv` without `data.data_dir` (still to come from `--data-dir`).
    """
    w = cfg.source_path
    t, e, r, k, d = cfg.training, cfg.environment, cfg.reward, cfg.risk, cfg.data
    for key in ("learning_rate", "phase_3_learning_rate"):
        _check(0 < getattr(t, key) < 1, w, f"training.{key}", getattr(t, key), "0 < value < 1")
    for key in ("minibatch_size", "n_epochs", "n_envs", "meta_update_freq", "specialist_update_freq"):
        _check(getattr(t, key) >= 1, w, f"training.{key}", getattr(t, key), "a whole number >= 1")
    for key in ("phase_1_timesteps", "phase_2_timesteps", "phase_3_timesteps"):
        _check(getattr(t, key) >= 0, w, f"training.{key}", getattr(t, key), "a whole number >= 0")
    _check(0 < t.gamma <= 1, w, "training.gamma", t.gamma, "0 < value <= 1")
    _check(0 <= t.gae_lambda <= 1, w, "training.gae_lambda", t.gae_lambda, "0 <= value <= 1")
    _check(0 < t.clip_range < 1, w, "training.clip_range", t.clip_range, "0 < value < 1")
    _check(bool(DEVICE_NAME.fullmatch(t.device)), w, "training.device", t.device, "auto, cpu, cuda or cuda:N")
    _check(e.episode_length >= 2, w, "environment.episode_length", e.episode_length, "a whole number >= 2")
    _check(e.warmup_steps >= 0, w, "environment.warmup_steps", e.warmup_steps, "a whole number >= 0")
    cap = e.initial_capital
    _check(finite_at_least(cap, 0, above=True), w, "environment.initial_capital", cap, "a finite number > 0")
    _check(0 <= e.transaction_cost < 1, w, "environment.transaction_cost", e.transaction_cost, "0 <= value < 1")
    limits = ("max_position_size", "stop_loss_pct", "max_portfolio_var", "max_correlation_exposure")
    for key in (*limits, "max_sector_allocation"):
        value = getattr(e, key)
        _check(0 < value <= 1, w, f"environment.{key}", value, "a limit in (0, 1]")
    for key in ("risk_penalty_weight", "transaction_cost_weight", "diversification_bonus_weight"):
        value = getattr(r, key)
        _check(finite_at_least(value, 0), w, f"reward.{key}", value, "a finite weight >= 0")
    value = r.downside_volatility_weight
    _check(finite_at_least(value, 0), w, "reward.downside_volatility_weight", value, "a finite weight >= 0")
    _check(math.isfinite(r.sharpe_target), w, "reward.sharpe_target", r.sharpe_target, "a finite number")
    _check(0 < r.max_drawdown_target <= 1, w, "reward.max_drawdown_target", r.max_drawdown_target, "(0, 1]")
    _check(-0.5 < r.risk_free_rate < 0.5, w, "reward.risk_free_rate", r.risk_free_rate, "-0.5 < value < 0.5")
    _check(0.5 < k.var_confidence < 1, w, "risk.var_confidence", k.var_confidence, "0.5 < value < 1")
    _check(k.correlation_window >= 2, w, "risk.correlation_window", k.correlation_window, "a whole number >= 2")
    for symbol, spec in cfg.instruments.items():
        vol, multiplier, at = spec.annual_vol, spec.cost_multiplier, f"instruments.{symbol}"
        _check(finite_at_least(vol, 0, above=True), w, f"{at}.annual_vol", vol, "a finite number > 0")
        _check(finite_at_least(multiplier, 0), w, f"{at}.cost_multiplier", multiplier, "a finite number >= 0")
        if spec.cost is not None:
            ok = math.isfinite(spec.cost) and 0 <= spec.cost < 1
            _check(ok, w, f"instruments.{symbol}.cost", spec.cost, "a cost per unit of turnover, 0 <= value < 1")
        _check(finite_at_least(spec.signal, 0), w, f"instruments.{symbol}.signal", spec.signal, "a finite number >= 0")
        _check(0 <= spec.driver <= 1, w, f"instruments.{symbol}.driver", spec.driver, "0 <= value <= 1")
        size = spec.contract_size
        _check(finite_at_least(size, 0, above=True), w, f"{at}.contract_size", size, "a finite number > 0")
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
    life = s.drift_half_life
    _check(finite_at_least(life, 0, above=True), w, "data.synthetic.drift_half_life", life, "a finite number > 0")
    _check(finite_at_least(s.drift_scale, 0), w, "data.synthetic.drift_scale", s.drift_scale, "a finite number >= 0")
    _check(isinstance(d.allow_partial_overlap, bool), w, "data.allow_partial_overlap", d.allow_partial_overlap,
           "true or false")  # fmt: skip
    _check(len(cfg.specialists) >= 1, w, "specialists", cfg.specialists, "at least one specialist name")
    _check(len(set(cfg.specialists)) == len(cfg.specialists), w, "specialists", cfg.specialists, "no repeated name")
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
    if not isinstance(name, str):
        return False
    try:
        pd.Timestamp("2000-01-01", tz=name)
    except (KeyError, ValueError, TypeError):  # zoneinfo's ZoneInfoNotFoundError is a KeyError
        return False
    return True


# --- command-line flags over the file ----------------------------------------------------------------

# Args fields whose name differs from their config key.
_ALIASES = {"num_envs": "training.n_envs", "instruments": "data.instruments", "data_dir": "data.data_dir"}


def _config_key(field_name: str, aliases: dict[str, str]) -> str | None:
    """The `section.key` of the config that backs an Args field, or None."""
    if field_name in aliases:
        return aliases[field_name]
    for section, cls in SECTIONS.items():
        if field_name in {f.name for f in dataclasses.fields(cls)}:
            return f"{section}.{field_name}"
    return None


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(cfg: Config, dotted: str, value: Any) -> None:
    *head, last = dotted.split(".")
    obj: Any = cfg
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _config_path_from_argv(argv: list[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def config_defaults(args_cls: type, aliases: dict[str, str] | None, path: str | None) -> dict[str, Any]:
    """`{field: value}` of the config file at `path` for every field of `args_cls` named like a config key (or
    listed in `aliases`): a script's defaults under that file. `pipeline.py` builds each phase's `Args` on them, so
    a YAML file sets the phases' hyperparameters there as it does for a script run alone."""
    aliases = {**_ALIASES, **(aliases or {})}
    cfg = load_config(path, require_data_dir=False)  # `data.source: csv` may take its folder from --data-dir
    defaults = {}
    for f in dataclasses.fields(args_cls):
        key = _config_key(f.name, aliases)
        if key is not None:
            defaults[f.name] = _get(cfg, key)
    return defaults


def parse_args(args_cls: type, aliases: dict[str, str] | None = None, argv: list[str] | None = None):
    """Parse a script's tyro `Args` with the YAML file's values as defaults; return `(args, cfg)`.

    `args_cls` must have a `config: str | None` field. Each other field named like a config key
    (or listed in `aliases` as `field -> "section.key"`) takes the file's value as its default,
    and its final value (file or explicit flag) is written back into `cfg` by `config_from_args`.
    """
    aliases = {**_ALIASES, **(aliases or {})}
    argv = list(sys.argv[1:] if argv is None else argv)
    path = _config_path_from_argv(argv)
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = str(DEFAULT_CONFIG_PATH)
    defaults = {**config_defaults(args_cls, aliases, path), "config": path}
    args = tyro.cli(args_cls, args=argv, default=args_cls(**defaults))
    return args, config_from_args(args, aliases)


def config_from_args(args: Any, aliases: dict[str, str] | None = None) -> Config:
    """The `Config` a script runs with: `args.config` (or the built-in defaults) overridden by `args`.

    Every field of `args` that backs a config key (see `parse_args`) wins over the file, so calling
    a script's `main(args)` from Python gives the same run as the command line.
    """
    aliases = {**_ALIASES, **(aliases or {})}
    if getattr(args, "batch_size", None) is not None:  # the deprecated flag: SB3's name for the minibatch
        deprecated("--batch-size is deprecated: it is --minibatch-size (rows per gradient step)")
        args.minibatch_size, args.batch_size = args.batch_size, None
    path = getattr(args, "config", None)
    cfg = load_config(path, require_data_dir=False)  # validated below, with --data-dir applied
    for f in dataclasses.fields(args):
        key = _config_key(f.name, aliases)
        value = getattr(args, f.name)
        if key is not None and value is not None and value != []:  # unset list flags keep the file's value
            _set(cfg, key, list(value) if isinstance(value, tuple) else value)
    if getattr(args, "data_dir", None):
        cfg.data.source = "csv"
    cfg.source_path = f"{path or '<defaults>'} + command line"
    return validate(cfg)
