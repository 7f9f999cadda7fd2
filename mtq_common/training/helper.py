"""A helper process: work that needs only its inputs runs beside training, on a core that would idle.

The phases run one torch thread (`plumbing.configure_threads`), so on a two-core machine one core waits while they
train. Phase 2's start fits (while Phase 1 trains), Phase 3's check of a candidate on the training split (a backtest
of the whole split) and the evaluation's episodes need nothing but their inputs, so they can run there meanwhile.
The helper is one spawned process (a forked one would inherit torch's thread pools, which are not fork-safe) that
sets the main process's thread count and runs the same code on the same inputs, so it returns the same bits the
main process would (`tests/test_phase3.py` checks a whole Phase 3 both ways, `tests/test_phase2.py` Phase 2's fits,
`tests/test_helper.py` a task). Where no core is spare, `submit` runs the task in place, at once, and its result
waits in an already finished future.

Inputs and results cross the process boundary pickled, as `concurrent.futures` sends them: plain data only
(numbers, arrays, dicts, a backtest's arrays and the bytes of a `torch.save`, whose weights are read back with
`weights_only=True`).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import torch


def spare_core(device: torch.device, ranks: int) -> bool:
    """Whether a helper process gets a core of its own: a single CPU process whose torch threads leave one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return torch.device(device).type == "cpu" and ranks == 1 and cores > torch.get_num_threads()


def _start(parent: int, threads: int, initializer: Callable | None, initargs: tuple) -> None:
    # a main process killed outright (kill -9) leaves its helper waiting on a queue nobody feeds: it leaves too
    threading.Thread(target=_leave_with, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)  # (the main process's count: the same kernels, the same bits)
    if initializer is not None:
        initializer(*initargs)


def _leave_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


class Helper:
    """One helper process (`enabled`), or none: tasks then run in place. `initializer(*initargs)` runs first
    in the helper (not in place: a caller without a helper holds what it builds). Use as a context manager, or
    `close()` it."""

    def __init__(self, enabled: bool, initializer: Callable | None = None, initargs: tuple = ()):
        self.pool = None
        if enabled:
            start = (os.getpid(), torch.get_num_threads(), initializer, initargs)
            self.pool = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), _start, start)
            self.pool.submit(int)  # (the pool starts its process at the first task: start it now)

    @property
    def beside(self) -> bool:
        """Whether tasks run in a helper process (else in place, at `submit`)."""
        return self.pool is not None

    def submit(self, fn: Callable, *args: Any) -> Future:
        """`fn(*args)` in the helper (`fn` a module-level function), or here and now without one."""
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        done: Future = Future()
        try:
            done.set_result(fn(*args))
        except Exception as err:  # (raised again by `result()`, as from the helper)
            done.set_exception(err)
        return done

    def close(self) -> None:
        """Stop the helper process (tasks not started are dropped)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> Helper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
