"""Test-wide settings: Triton kernels run on the CPU through its interpreter, and torch stays small."""

import os

# Triton reads TRITON_INTERPRET when a kernel is defined, so set it before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
