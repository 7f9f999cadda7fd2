"""The reward of a book's Sharpe ratio over a whole split: Moody and Saffell's differential Sharpe ratio with
its moments held at a reference book's, instead of moving with the last hundred bars.

The environment's portfolio reward (DESIGN 4, `kernels.portfolio_step`) is the differential Sharpe ratio of
moving estimates `A` and `B` (rate 0.01: about the last hundred bars) of `r = gross - cost - risk-free hurdle`.
Two things in it pull away from what a book is judged on, the Sharpe ratio of its whole test split:
* a local Sharpe ratio cannot see risk timing: scaling the book down in a volatile stretch leaves the Sharpe
  ratio of that stretch unchanged, so it earns nothing, although it raises the Sharpe ratio of the whole split;
* the hurdle makes a larger book score better (its excess over the hurdle grows faster than its risk).
Measured in Phase 3 (seed 1's Phases 1-2 on the built-in market, 1M steps on the training split): the final
meta-controller over the starting specialists held an appetite of 0.96 on average against the start's 0.76, and
its Sharpe ratio fell from 4.77 to 3.86 on the training split itself (4.87 -> 4.32 on validation).

Held at a reference book's per-bar moments of the excess return `x = net - cash` (mean `A`, second moment `B`,
over a whole split), the same formula

    D(x) = (B * x - 0.5 * A * x^2) / (B - A^2)^1.5

is the first-order change in that book's Sharpe ratio from one bar's return: a sum of it over the bars of a
policy is the gain in the whole split's Sharpe ratio to first order. Its expectation is flat in the book's scale
at the reference (a larger or smaller book earns nothing by its size) and rises where a book moves its risk to
bars whose return per unit of risk is higher: what a meta-controller that times risk is for. Phases 2 and 3 train
their meta-controller on it (`--sharpe-reward`, each from its own starting point's book): in Phase 2 it took the
iterates from no confident gain over the fitted start to +0.14 to +0.26 over it on test (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SharpeIncrement:
    """`D(x)` of the module docstring for a reference book's per-bar excess-return moments."""

    mean: float  # A: the reference book's mean excess return per bar
    second: float  # B: its mean squared excess return per bar
    cash: float  # the account's risk-free yield per bar (`net` includes it; the excess return does not)

    @classmethod
    def of(cls, net_return: np.ndarray, cash: float) -> SharpeIncrement:
        """The increment for the book whose per-bar net returns (account, with the cash yield) are `net_return`."""
        x = np.asarray(net_return, dtype=np.float64) - cash
        if not np.isfinite(x).all() or float(x.var()) <= 0.0:
            raise ValueError("the reference book's returns must be finite and vary (a flat book has no Sharpe ratio)")
        return cls(float(x.mean()), float((x * x).mean()), float(cash))

    def __call__(self, net_return: torch.Tensor) -> torch.Tensor:
        """D [B] of the bar's net returns `net_return` [B]."""
        x = net_return - self.cash
        return (self.second * x - 0.5 * self.mean * x * x) / (self.second - self.mean**2) ** 1.5

    def as_dict(self) -> dict:
        return {"mean": self.mean, "second": self.second, "cash": self.cash}
