"""Run-time settings the scripts share: device choice, logging to a file, torch's threads, `--amp` (the compiled
update, `--compile`, is `update.py`). The training loop's plumbing is in `run.py`, gradient clipping in
`coordination.py`."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA when present; an unavailable CUDA request is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    return device


def setup_logging(path: str | Path, name: str, to_file: bool = True) -> logging.Logger:
    """A logger writing to `path` (appending: a resumed run continues its log) and to stderr.

    `to_file=False` (ranks other than 0 under torchrun) keeps only the stderr warnings.
    """
    path = Path(path)
    logger = logging.getLogger(f"mtq.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):  # a second main() in one process (tests, pipeline) re-targets
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    stream.setLevel(logging.WARNING)
    logger.addHandler(stream)
    if not to_file:
        return logger
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(fmt)
    logger.addHandler(file_handler)
    # Warnings of the data loaders (logger "mtq") land in the same file.
    data_logger = logging.getLogger("mtq")
    data_logger.setLevel(logging.INFO)
    for handler in list(data_logger.handlers):
        if isinstance(handler, logging.FileHandler):
            data_logger.removeHandler(handler)
            handler.close()
    data_logger.addHandler(logging.FileHandler(path))
    return logger


@torch.no_grad()
def configure_threads(threads: int) -> None:
    """Set torch's intra-op threads (0 keeps torch's default).

    PPO on the CPU runs many small tensor ops: one thread avoids the synchronisation overhead and,
    above all, the collapse when another process holds a core (measured here: a Phase 1 run of 16k
    steps took 5.4 s with 1 thread and 398 s with 2 threads on a busy 2-core machine).
    """
    if threads > 0:
        torch.set_num_threads(threads)


def check_amp(amp: bool, device: torch.device) -> None:
    """`--amp` is bf16 autocast on CUDA; elsewhere it is refused rather than silently ignored."""
    if amp and device.type != "cuda":
        raise ValueError(f"--amp: bf16 autocast of the update is for CUDA devices; this run is on {device}")


def autocast(amp: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """The update's loss computation under bf16 autocast when `--amp` is on (a no-op otherwise)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
