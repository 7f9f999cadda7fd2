"""Data-parallel training: the helpers on two gloo processes, and each phase script under torchrun."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtq_common.agents.nets import RunningNorm
from mtq_common.training import distributed
from mtq_common.training.checkpoint import CheckpointError, load_checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--num-envs", "8", "--num-steps", "32", "--minibatch-size", "64", "--n-epochs", "2",
        "--eval-segments", "16", "--no-progress"]  # fmt: skip


def torchrun(script: str, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script,
           *args]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


# -- the helpers ------------------------------------------------------------------------------------


def test_a_plain_run_is_a_world_of_one(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    world, device = distributed.setup("cpu")
    assert (world.rank, world.size, world.is_main, world.enabled) == (0, 1, True, False)
    assert device == torch.device("cpu") and not dist.is_initialized()
    assert world.seed(5) == 5  # rank 0 keeps the seed: a plain run is unchanged
    assert distributed.World(rank=1, size=2).seed(5) == 5 + distributed.RANK_SEED_STRIDE
    assert distributed.iterations(10_000, 1_000, world) == 10
    assert distributed.iterations(10_000, 1_000, distributed.World(0, 2)) == 5  # --timesteps is the total
    assert distributed.iterations(10, 1_000, world) == 1


def test_in_a_world_of_one_the_helpers_change_nothing():
    world = distributed.World()
    x = torch.randn(2, 50, 3)
    direct, pooled = RunningNorm((2, 3)), RunningNorm((2, 3))
    direct.update(x)
    distributed.update_running_norm(pooled, x, world)
    for key, value in direct.state_dict().items():
        assert torch.equal(value, pooled.state_dict()[key]), key
    grad = torch.randn(4)
    before = grad.clone()
    distributed.average_([grad], world)
    assert torch.equal(grad, before)
    state = distributed.rank_states({"env": 1}, world)
    assert state == {"env": 1, "world_size": 1, "other_ranks": []}
    assert distributed.local_state(state, world, "x.pt") is state
    assert distributed.weight_agreement("abc", world)["weights_identical"]


def test_a_checkpoint_of_two_ranks_is_refused_by_one():
    with pytest.raises(CheckpointError, match=r"x\.pt was written by a run on 2 rank.*torchrun --nproc_per_node 2"):
        distributed.local_state({"world_size": 2, "other_ranks": [{}]}, distributed.World(), "x.pt")
    # (an older checkpoint without the field counts as one rank)
    with pytest.raises(CheckpointError, match="1 rank"):
        distributed.local_state({}, distributed.World(0, 2), "x.pt")


def _two_rank_worker(rank: int, store_path: str, result_path: str) -> None:
    """Runs on each of two gloo processes; rank 0 writes what it checked to `result_path`."""
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    world = distributed.World(rank=rank, size=2)
    checks = {}
    # one flat all-reduce of tensors of different shapes: the mean over ranks
    a, b = torch.full((2, 3), float(rank)), torch.full((4,), 10.0 * (rank + 1))
    distributed.average_([a, b], world)
    checks["average"] = bool(torch.all(a == 0.5) and torch.all(b == 15.0))
    # pooled normaliser == one normaliser fed both ranks' batches
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 40, 3, generator=generator) * (1 + r) + r for r in range(2)]
    pooled, reference = RunningNorm((2, 3)), RunningNorm((2, 3))
    for _ in range(2):
        distributed.update_running_norm(pooled, batches[rank], world)
        reference.update(torch.cat(batches, dim=1))
    checks["norm"] = bool(
        torch.allclose(pooled.mean, reference.mean, atol=1e-6) and torch.allclose(pooled.var, reference.var, atol=1e-5)
    )

    # rank 0's error reaches every rank (nobody waits forever)
    def fail() -> dict:
        raise CheckpointError("latest.pt is corrupted")

    try:
        distributed.load_on_main(fail, world)
        checks["error"] = False
    except CheckpointError as err:
        checks["error"] = "corrupted" in str(err)
    # every rank's state round-trips through rank 0's checkpoint
    saved = distributed.rank_states({"env": torch.tensor([rank])}, world)
    saved = distributed.load_on_main(lambda: saved, world)
    checks["rank_state"] = int(distributed.local_state(saved, world, "x.pt")["env"]) == rank
    # differing weights are reported
    checks["disagree"] = not distributed.weight_agreement(f"w{rank}", world)["weights_identical"]
    checks["agree"] = distributed.weight_agreement("w", world)["weights_identical"]
    gathered = [None, None]
    dist.all_gather_object(gathered, checks)
    if rank == 0:
        Path(result_path).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def test_the_helpers_on_two_gloo_processes(tmp_path):
    result = tmp_path / "result.json"
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"), str(result)), nprocs=2, join=True)
    for rank, checks in enumerate(json.loads(result.read_text())):
        assert all(checks.values()), (rank, checks)


# -- the phase scripts under torchrun ---------------------------------------------------------------


@pytest.fixture(scope="module")
def phase_inputs(tiny_phases):
    return tiny_phases


@pytest.fixture(scope="module")
def phase1_two_ranks(phase_inputs):
    tmp, config, _ = phase_inputs
    out = tmp / "p1_ddp"
    done = torchrun("phase1_ppo.py", "--config", str(config), "--timesteps", "2048", "--eval-interval", "2",
                    "--output-dir", str(out), "--log-dir", str(tmp / "l1_ddp"), *TINY)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_phase1_on_two_ranks_keeps_identical_weights(phase1_two_ranks):
    out, done = phase1_two_ranks
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ranks"]["world_size"] == 2
    assert metrics["ranks"]["weights_identical"], metrics["ranks"]
    # --timesteps is the total: 2048 steps = 4 iterations of 2 ranks x 8 rows x 32 steps
    assert metrics["global_step"] == 2048
    assert done.stdout.count("Phase 1 validation") == 1  # rank 0 alone reports
    state = load_checkpoint(out / "latest.pt", "phase1")
    assert state["world_size"] == 2 and len(state["other_ranks"]) == 1
    # each rank stepped its own environments (its own seed)
    ours, theirs = state["env"]["engine"], state["other_ranks"][0]["env"]["engine"]
    assert not torch.equal(ours["generator"], theirs["generator"])
    assert not torch.equal(state["rng"]["torch"], state["other_ranks"][0]["rng"]["torch"])


def test_phase1_on_two_ranks_resumes_exactly(phase_inputs, phase1_two_ranks):
    tmp, config, _ = phase_inputs
    unbroken, _ = phase1_two_ranks
    out = tmp / "p1_ddp_resumed"
    common = ["--config", str(config), "--timesteps", "2048", "--eval-interval", "2", "--output-dir", str(out),
              "--log-dir", str(tmp / "l1_ddp_resumed"), *TINY]  # fmt: skip
    first = torchrun("phase1_ppo.py", *common, "--stop-after", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (out / "metrics.json").exists()
    second = torchrun("phase1_ppo.py", *common, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = json.loads((out / "metrics.json").read_text())["ranks"]["fingerprints"]
    assert resumed == json.loads((unbroken / "metrics.json").read_text())["ranks"]["fingerprints"]
    # the same checkpoint on one process: refused, naming the fix
    single = subprocess.run([sys.executable, "phase1_ppo.py", *common, "--resume"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert single.returncode == 2
    assert "written by a run on 2 rank(s)" in single.stderr and "torchrun --nproc_per_node 2" in single.stderr


def test_a_resume_error_on_rank_0_stops_every_rank(tmp_path):
    done = torchrun("phase1_ppo.py", "--timesteps", "512", "--output-dir", str(tmp_path / "empty"), "--log-dir",
                    str(tmp_path / "logs"), "--resume", *TINY)  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.count("phase1_ppo.py: error: checkpoint not found") == 2  # both ranks, no hang


@pytest.mark.parametrize("script", ["phase2_meta.py", "phase3_joint.py"])
def test_phases_2_and_3_on_two_ranks_keep_identical_weights(phase_inputs, script):
    tmp, config, (p1, p2) = phase_inputs
    out = tmp / f"{script}_ddp"
    inputs = (["--specialists-dir", str(p1)] if script == "phase2_meta.py" else
              ["--phase1-dir", str(p1), "--phase2-dir", str(p2), "--eval-episodes", "2",
               "--specialist-update-freq", "2"])  # fmt: skip
    done = torchrun(script, "--config", str(config), "--timesteps", "1024", "--eval-interval", "1", "--output-dir",
                    str(out), "--log-dir", str(tmp / f"{script}_logs"), *inputs, *TINY)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ranks"]["world_size"] == 2 and metrics["ranks"]["weights_identical"], metrics["ranks"]
    assert metrics["global_step"] == 1024
    logs = tmp / f"{script}_logs"  # rank 0 alone logs: one start line, one TensorBoard file
    assert (logs / "training.log").read_text().count("rank(s) x") == 1
    assert len(list(logs.glob("events.out.tfevents.*"))) == 1
