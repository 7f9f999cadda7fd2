"""Walk-forward windows: expanding training windows, consecutive test blocks, no overlap, clear refusals."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pipeline
from mtq_common.data.splits import MIN_BLOCK, fold_bounds, fold_splits, warmup_bars
from mtq_common.data.tables import build_tables
from mtq_common.training.checkpoint import CheckpointError
from mtq_common.training.config import Config, ConfigError
from mtq_common.training.settings import load_config
from tests.helpers import write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("bars", "folds", "fraction"), [(5785, 4, 0.7), (2300, 2, 0.5), (30000, 7, 0.6)])
def test_folds_never_overlap_their_train_validation_and_test_bars(bars, folds, fraction):
    bounds = fold_bounds(bars, folds, fraction, warmup=100)
    assert len(bounds) == folds
    for k, b in enumerate(bounds):
        train, val, test = (set(range(*r)) for r in (b.train, b.val, b.test))
        assert not (train & val) and not (train & test) and not (val & test)
        assert max(train) < min(val) and max(val) < min(test)  # the past trains, the future tests
        assert b.train[0] == 0 and b.test[1] <= bars
        if k:
            assert b.train[1] > bounds[k - 1].train[1]  # an expanding window
            assert b.test[0] == bounds[k - 1].test[1]  # consecutive test blocks: one out-of-sample series
            assert b.val == bounds[k - 1].test  # a fold validates on the block its predecessor tested on


def test_fold_splits_carry_warmup_history_and_trade_only_their_block():
    cfg = Config()
    cfg.data.synthetic = dataclasses.replace(cfg.data.synthetic, train_bars=1500, val_bars=400, test_bars=400)
    cfg.data.folds, cfg.data.fold = 3, 1
    splits = fold_splits(cfg)
    w = warmup_bars(cfg)
    bounds = fold_bounds(2300, 3, cfg.data.splits[0], w)[1]
    assert splits["train"].num_bars == bounds.train[1]
    for name in ("val", "test"):
        market, (start, stop) = splits[name], getattr(bounds, name)
        assert market.num_bars == stop - start + w
        assert build_tables(market, cfg).first_bar == w  # trading starts at the block's first bar
    # the validation block's first tradable bar is the bar after the training window's last
    assert splits["val"].timestamps[w] > splits["train"].timestamps[-1]
    np.testing.assert_array_equal(splits["val"].prices[:w], splits["train"].prices[-w:])  # history, not traded


def test_too_many_folds_and_one_fold_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        fold_bounds(600, 6, 0.7, 100)
    assert MIN_BLOCK * 7 > 600 * 0.3
    args = pipeline.Args(mode="walkforward", folds=1, output_dir=str(tmp_path / "out"), log_dir=str(tmp_path / "l"))
    with pytest.raises(ConfigError, match="at least 2 folds"):
        pipeline.main(args)
    args = dataclasses.replace(args, folds=200)
    with pytest.raises(ValueError, match="Use at most"):
        pipeline.main(args)
    assert not (tmp_path / "out").exists()


def test_a_bad_walkforward_command_exits_2_with_one_paragraph(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "pipeline.py", "--mode", "walkforward", "--folds", "1", "--output-dir", str(out)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "at least 2 folds" in result.stderr
    assert not out.exists()


def test_resuming_a_fold_with_another_config_is_refused_before_its_config_file_is_replaced(tmp_path):
    """OUT/fold_k/config.yaml is what the fold was trained with (its phases can be rerun from it by hand): a
    walk-forward resumed with another config is refused, and the file stays the trained one."""
    config, out = write_config(tmp_path / "c.yaml"), tmp_path / "out"
    cfg = load_config(str(config))
    trained = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, folds=2, fold=0))
    fold = out / "fold_0"
    fold.mkdir(parents=True)
    manifest = {"config": trained.to_dict(), "config_hash": trained.hash(), "seed": 1, "phases": {}}
    (fold / "pipeline.json").write_text(json.dumps(manifest))
    (fold / "config.yaml").write_text("the config fold 0 was trained with\n")
    args = pipeline.Args(mode="walkforward", folds=3, config=str(config), output_dir=str(out),
                         log_dir=str(tmp_path / "l"))  # fmt: skip
    with pytest.raises(CheckpointError, match="data.folds: 2 in the run, 3 now"):
        pipeline.main(args)
    assert (fold / "config.yaml").read_text() == "the config fold 0 was trained with\n"
