"""Phase 3's check of a candidate on the training split (`selection.holds_on_train`), run beside training.

A candidate is an iterate that won on validation; before it replaces `best.pt` its backtest on the whole training
split must hold against the start's. That backtest takes about half as long as the ten iterations of training
between two validations of a default job (3.5 s), and it needs nothing but the candidate's weights. So
`TrainChecks.submit` sends it to a helper process where a core is spare (`training.helper`), training goes on, and
Phase 3 reads the verdict when its next decision needs it (the next validation, an early stop, the end). The helper
builds the same split and tables from the same config and runs the same backtest at the same thread count: the same
verdict, to the bit, as the check in place."""

from __future__ import annotations

import io
from concurrent.futures import Future

import torch

from mtq_common.agents.nets import MetaController, SpecialistAgents
from mtq_common.data.splits import load_splits
from mtq_common.data.tables import build_tables
from mtq_common.evaluation.allocation_fit import start_backtests
from mtq_common.evaluation.selection import holds_on_train
from mtq_common.training.helper import Helper
from mtq_common.training.settings import config_from_dict

_HELD: dict = {}
"""In the helper process: the config, the training split and its tables (`_start`)."""


def _start(config: dict) -> None:  # (the helper's initializer; its arguments go through a pipe: keep them small)
    cfg = config_from_dict(config, require_data_dir=False)
    train = load_splits(cfg)["train"]
    _HELD.update(cfg=cfg, train=train, tables=build_tables(train, cfg, "cpu"))


def _backtest_in_helper(weights: bytes):
    return backtest(torch.load(io.BytesIO(weights), weights_only=True), **_HELD)


def backtest(payload: dict, cfg, train, tables):
    """The backtest of the hierarchy in `payload` (Phase 3's `model_payload`) on `train`, as
    `allocation_fit.start_backtests` runs the start's there (its "system")."""
    with torch.random.fork_rng(devices=[]):  # (their initial weights, overwritten, must not move the caller's draws)
        specialists = SpecialistAgents.from_spec(payload["specialist_spec"])
        meta = MetaController.from_spec(payload["meta_spec"])
    specialists.load_state_dict(payload["specialists"])
    meta.load_state_dict(payload["meta"])
    device = tables.prices.device
    specialists, meta = specialists.to(device), meta.to(device)
    return start_backtests(specialists, meta, train, cfg, device, momentum=False, tables=tables)["system"]


class TrainChecks:
    """Candidates' checks on `train` (its `tables`): each backtest in a helper process when `beside` (started
    now, so it builds its split while the caller goes on), else in place when submitted. `close()` when done."""

    def __init__(self, cfg, train, tables, beside: bool):
        self.cfg, self.train, self.tables = cfg, train, tables
        self.helper = Helper(beside, _start, (cfg.to_dict(),))

    def submit(self, payload: dict) -> Future:
        """The backtest of `payload` (a `model_payload`) on train, a future for `verdict`."""
        if not self.helper.beside:
            return self.helper.submit(backtest, payload, self.cfg, self.train, self.tables)
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return self.helper.submit(_backtest_in_helper, buffer.getvalue())

    def verdict(self, submitted: Future, start: dict) -> dict:
        """`holds_on_train`'s dict for a submitted candidate against the start's backtests on train `start`
        (`allocation_fit.start_backtests`, with momentum's); waits for the candidate's backtest."""
        ran = {"system": submitted.result(), "momentum": start["momentum"]}
        return holds_on_train(ran, start, self.train.bars_per_year, self.cfg.reward.risk_free_rate)

    def close(self) -> None:
        self.helper.close()
