"""Test-wide settings (Triton kernels run on the CPU through its interpreter unless there is a GPU; torch uses one
thread) and the fixtures several test modules share. A module that needs another config defines its own `cfg` /
`market`, which overrides these."""

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so set it before any kernel module is imported; on a
# GPU machine the kernels run natively (tests/test_kernels.py moves their inputs to the GPU).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mtq_common.data.splits import load_splits  # noqa: E402
from mtq_common.data.tables import build_tables  # noqa: E402
from mtq_common.evaluation.rules import fit_trend_for  # noqa: E402
from tests.helpers import prepare, tight_config, write_config  # noqa: E402

# Small tensors: one intra-op thread is faster and cannot collapse when the two cores are shared.
torch.set_num_threads(1)

SLOWEST_FIRST = (
    "test_update.py", "test_speed_options.py", "test_phase3.py", "test_pipeline.py", "test_phase2.py",
    "test_distributed.py", "test_throughput.py", "test_phase1.py", "test_act.py",
)  # fmt: skip
"""The test files that take longest, slowest first (`pytest -n 2 --dist loadfile --durations=0` with an empty
Inductor cache, as CI has: 116, 108, 85, 83, 61, 43, 42, 22 and 14 s of the 636 s; every other file under 8 s)."""


def pytest_configure(config):
    # `--dist loadfile` hands out whole files in the order the queue holds them, and xdist orders that queue by
    # the number of tests in a file: the few long compile tests came last, and one worker ran them alone while
    # the other sat idle (23 s of a 342 s suite). Keep the order collected below instead: longest first.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Run the files of `SLOWEST_FIRST` first, in that order; the others follow as collected (a stable sort)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def tiny_phases(tmp_path_factory):
    """(folder, config, (phase1_dir, phase2_dir)): tiny Phase 1 and 2 outputs on the small test config,
    trained once for the Phase 3, torchrun and --compile tests. Tests read them and write elsewhere
    in the folder under their own names."""
    tmp = tmp_path_factory.mktemp("tiny_phases")
    config = write_config(tmp / "c.yaml")
    return tmp, config, prepare(tmp, config)


@pytest.fixture(scope="module")
def cfg():
    """The small synthetic config of the evaluation tests (`helpers.tight_config`), one per module."""
    return tight_config()


@pytest.fixture(scope="module")
def market(cfg):
    """The test split of `cfg`'s market."""
    return load_splits(cfg)["test"]


@pytest.fixture(scope="module")
def trend(cfg):
    """The trend filter's parameters, picked on the training split (as the phases and the pipeline do)."""
    return fit_trend_for(load_splits(cfg)["train"], cfg)


@pytest.fixture(scope="module")
def tables(market, cfg):
    """`market`'s tables (features, covariances, costs), built once per module."""
    return build_tables(market, cfg)
