"""Command-line flags over the YAML config: every script's one helper, `parse_args(Args, ...)`.

It reads `--config` from the command line, loads the file (`mtq_common.training.config`), uses its values as
the defaults of the script's tyro `Args` (so `--help` shows them), lets explicit flags override them,
and writes the result back into the `Config` the environments receive (`config_from_args`). One
precedence rule everywhere: built-in default < YAML file < CLI flag.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from mtq_common.training.config import DEFAULT_CONFIG_PATH, SECTIONS, Config, load_config, validate

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


def parse_args(args_cls: type, aliases: dict[str, str] | None = None, argv: list[str] | None = None):
    """Parse a script's tyro `Args` with the YAML file's values as defaults; return `(args, cfg)`.

    `args_cls` must have a `config: str | None` field. Each other field named like a config key
    (or listed in `aliases` as `field -> "section.key"`) takes the file's value as its default,
    and its final value (file or explicit flag) is written back into `cfg` by `config_from_args`.
    """
    import tyro

    aliases = {**_ALIASES, **(aliases or {})}
    argv = list(sys.argv[1:] if argv is None else argv)
    path = _config_path_from_argv(argv)
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = str(DEFAULT_CONFIG_PATH)
    cfg = load_config(path, require_data_dir=False)  # `data.source: csv` may take its folder from --data-dir
    defaults = {}
    for f in dataclasses.fields(args_cls):
        key = _config_key(f.name, aliases)
        if key is not None:
            defaults[f.name] = _get(cfg, key)
    defaults["config"] = path
    args = tyro.cli(args_cls, args=argv, default=args_cls(**defaults))
    return args, config_from_args(args, aliases)


def config_from_args(args: Any, aliases: dict[str, str] | None = None) -> Config:
    """The `Config` a script runs with: `args.config` (or the built-in defaults) overridden by `args`.

    Every field of `args` that backs a config key (see `parse_args`) wins over the file, so calling
    a script's `main(args)` from Python gives the same run as the command line.
    """
    aliases = {**_ALIASES, **(aliases or {})}
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
