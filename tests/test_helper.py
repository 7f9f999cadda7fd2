"""mtq_common.training.helper: a task returns the same in a helper process as in place, errors come back, and
the helper does not outlive its main process. (Phase 3's checks beside training: tests/test_phase3.py; the
evaluation's episodes: tests/test_pipeline.py.)"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtq_common.training.helper import Helper, spare_core

REPO = Path(__file__).resolve().parent.parent


def noisy_sum(seed: int) -> tuple[bytes, int]:
    """Float work whose last bits depend on the kernels and the thread count, and the helper's thread count."""
    x = torch.randn(257, 129, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return (torch.tanh(x @ x.T).sum(-1).exp().cumsum(0)).numpy().tobytes(), torch.get_num_threads()


def refuse(value: int) -> None:
    raise ValueError(f"refused {value}")


def test_a_task_gives_the_same_bits_in_the_helper_as_in_place():
    with Helper(False) as here, Helper(True) as beside:
        assert here.pool is None and beside.pool is not None
        assert beside.submit(noisy_sum, 3).result(timeout=120) == here.submit(noisy_sum, 3).result()
        with pytest.raises(ValueError, match="refused 7"):
            beside.submit(refuse, 7).result(timeout=120)
        with pytest.raises(ValueError, match="refused 8"):
            here.submit(refuse, 8).result()


def test_a_helper_is_used_only_with_a_spare_cpu_core_and_one_rank():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert spare_core(torch.device("cpu"), 1) == (cores > torch.get_num_threads())
    assert not spare_core(torch.device("cpu"), 2)
    assert not spare_core(torch.device("cuda"), 1)


KILLED = """
import os, sys, time
sys.path.insert(0, {repo!r})
from mtq_common.training.helper import Helper
if __name__ == "__main__":
    helper = Helper(True)
    print(helper.submit(os.getpid).result(timeout=120), flush=True)
    time.sleep(600)
"""


@pytest.mark.skipif(not hasattr(os, "getppid") or sys.platform == "win32", reason="POSIX parent ids")
def test_the_helper_leaves_when_its_main_process_is_killed(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(repo=str(REPO)))
    main = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(main.stdout.readline())
    main.kill()
    main.wait()
    deadline = time.time() + 30
    while time.time() < deadline and os.path.exists(f"/proc/{child}"):
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read().split()[2]
