"""Test-wide settings: Triton kernels run on the CPU through its interpreter; torch uses one thread."""

import os

# Triton reads TRITON_INTERPRET when a kernel is defined, so set it before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# Small tensors: one intra-op thread is faster and cannot collapse when the two cores are shared.
torch.set_num_threads(1)
