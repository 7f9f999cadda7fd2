"""Test-wide settings: Triton kernels run on the CPU through its interpreter; torch uses one thread."""

import os

# Triton reads TRITON_INTERPRET when a kernel is defined, so set it before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import prepare, write_config  # noqa: E402

# Small tensors: one intra-op thread is faster and cannot collapse when the two cores are shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_phases(tmp_path_factory):
    """(folder, config, (phase1_dir, phase2_dir)): tiny Phase 1 and 2 outputs on the small test config,
    trained once for the Phase 3, torchrun and --compile tests. Tests read them and write elsewhere
    in the folder under their own names."""
    tmp = tmp_path_factory.mktemp("tiny_phases")
    config = write_config(tmp / "c.yaml")
    return tmp, config, prepare(tmp, config)
