"""Small shared pieces of the test suite: a tiny config file and a TensorBoard reader."""

from __future__ import annotations

from pathlib import Path

import yaml

TINY = {
    "environment": {"episode_length": 200},
    "data": {"synthetic": {"train_bars": 1500, "val_bars": 700, "test_bars": 700}},
}


def write_config(path: Path, overrides: dict | None = None) -> Path:
    """A YAML config with small synthetic splits (fast to build) plus `overrides` (merged per section)."""
    config = {section: dict(values) for section, values in TINY.items()}
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            merged = dict(config[section])
            for key, value in values.items():
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
            config[section] = merged
        else:
            config[section] = values
    path.write_text(yaml.safe_dump(config))
    return path


def tight_config():
    """Small synthetic splits (600 bars) and limits tight enough that the risk manager has work to do."""
    from mtq_common.config import Config

    cfg = Config()
    for key in ("train_bars", "val_bars", "test_bars"):
        setattr(cfg.data.synthetic, key, 600)
    cfg.environment.max_portfolio_var = 0.004
    cfg.environment.max_sector_allocation = 0.35
    cfg.environment.max_correlation_exposure = 0.5
    return cfg


def tensorboard_tags(log_dir: Path) -> set[str]:
    """Scalar tags in the event files of `log_dir`, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in Path(log_dir).glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags
