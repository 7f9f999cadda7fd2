"""A diverged policy stops the run with a clear error instead of trading a NaN book.

The training scripts step their environments without per-step checks (`check_actions=False`: a host
sync per step would stall a GPU rollout). `DivergenceGuard` keeps the check on the device instead: each
step adds one `isfinite` reduction and records the first step and row whose proposal was not finite;
`raise_if_diverged`, called once per iteration after the rollout (where the scripts sync anyway), raises
a `ValueError` naming the phase, the step and the row, before any update uses the poisoned batch.
"""

from __future__ import annotations

import torch


class DivergenceGuard:
    """Device-side record of the first non-finite proposal of a rollout (see the module docstring)."""

    def __init__(self, phase: str, device):
        self.phase = phase
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.first_row = torch.zeros((), dtype=torch.long, device=device)

    def watch(self, proposal: torch.Tensor, global_step: int) -> None:
        """Record `global_step` and the first bad row if `proposal` [rows, ...] has a non-finite entry."""
        bad = ~torch.isfinite(proposal.reshape(proposal.shape[0], -1)).all(-1)
        first = bad.any() & (self.first_step < 0)
        self.first_step = torch.where(first, global_step, self.first_step)
        self.first_row = torch.where(first, torch.argmax(bad.to(torch.int8)), self.first_row)

    def raise_if_diverged(self) -> None:
        """Raise if any watched proposal was non-finite (one host sync)."""
        step = int(self.first_step)
        if step >= 0:
            raise ValueError(
                f"{self.phase}: the policy proposed a non-finite book at step {step} (row {int(self.first_row)}): "
                "training diverged. Lower the learning rate, check the data, or resume from an earlier checkpoint."
            )
