"""Hierarchy composition: meta action + specialists' positions -> proposed instrument weights.

Phase 2, Phase 3 and the evaluation all call `compose_weights`; the risk manager then maps its
proposal to executed weights.

    w_i = clamp(risk_appetite * K * allocation_{k(i)} * position_i * max_position, -max_position, max_position)

`position_i` in [-1, 1] is what specialist k(i) (the owner of instrument i) would trade in its own
environment, `allocation` is a point of the simplex over the K specialists and `risk_appetite` is
in [0, 1]. With an even allocation (1/K each) and full appetite every specialist trades exactly as
it did in Phase 1; the meta-controller scales specialists down (allocation below 1/K) or lets them
use their full position budget (above 1/K, up to the position cap), and the appetite scales the
whole book.
"""

from __future__ import annotations

import torch


def compose_weights(
    allocation: torch.Tensor,
    risk_appetite: torch.Tensor,
    positions: torch.Tensor,
    instrument_specialist: torch.Tensor,
    max_position: float,
) -> torch.Tensor:
    """Proposed weights [B, N] from `allocation` [B, K], `risk_appetite` [B] and `positions` [B, N].

    `instrument_specialist` [N] (long) is the index of each instrument's specialist in `allocation`.
    """
    k = allocation.shape[-1]
    per_instrument = allocation.index_select(-1, instrument_specialist) * k  # [B, N]
    w = risk_appetite.unsqueeze(-1) * per_instrument * positions * max_position
    return w.clamp(-max_position, max_position)


def instrument_specialist_index(sectors: list[str], specialists: list[str]) -> torch.Tensor:
    """For each instrument (by its sector), the index of its specialist in `specialists`."""
    missing = sorted({s for s in sectors if s not in specialists})
    if missing:
        raise ValueError(f"no specialist for sector(s) {missing}; specialists: {specialists}")
    return torch.tensor([specialists.index(s) for s in sectors], dtype=torch.long)
