"""benchmarks.throughput: the environment rows, the training and the ops sections on tiny sizes (no timing
asserted); benchmarks/gpu_checks.sh where there is no GPU."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import op_census, throughput, timed_runs
from tests.helpers import write_config


def test_env_and_training_sections_report_what_ran(tmp_path):
    args = throughput.Args(
        sections=("env", "training"),
        batch_sizes=(8,),
        steps=2,
        warmup=1,
        devices=("cpu", "cuda"),
        config=str(write_config(tmp_path / "c.yaml")),
        training_timesteps=(512, 256, 256),
        script_flags="--num-envs 8 --num-steps 32 --minibatch-size 64 --n-epochs 1",
        json=str(tmp_path / "t.json"),
    )
    out = throughput.main(args)
    env_rows = [r for r in out["results"] if r["benchmark"] in ("env", "kernel")]
    assert {r["name"] for r in env_rows} == {"specialist", "portfolio", "portfolio_step", "risk_step"}
    assert {r["impl"] for r in env_rows if r["name"] == "portfolio"} == {"env", "compiled"}  # --compile's step too
    # and the compiled step with its rows on adjacent bars (the tables' reads in the caches)
    assert [r["impl"] for r in env_rows if r["path"] == "4-bars"] == ["compiled"]
    training = [r for r in out["results"] if r["benchmark"] == "training"]
    assert [r["name"] for r in training] == ["phase1", "phase2", "phase3"]
    # the scripts' own step counts: 2 iterations of 8 rows x 32 steps (Phase 1), 1 iteration after
    assert [r["timesteps"] for r in training] == [512, 256, 256]
    assert all(r["steps_per_second"] > 0 and r["wall_seconds"] >= r["loop_seconds"] for r in training)
    # minibatches counted by the scripts: iterations x epochs x (rows per iteration / batch size)
    assert [r["minibatches"] for r in training] == [8, 4, 4]
    assert all(r["ms_per_minibatch"] > 0 and r["rollout_seconds"] + r["update_seconds"] <= r["loop_seconds"]
               for r in training)  # fmt: skip
    assert out["devices"]["train"]["name"] and (tmp_path / "t.json").is_file()


def test_ops_section_counts_each_phase_and_its_dense_kernels(tmp_path):
    args = throughput.Args(
        sections=("ops",),
        config=str(write_config(tmp_path / "c.yaml")),
        ops_timesteps=(512, 256, 256),
        pipeline_timesteps=(5120, 256, 2560),
        script_flags="--num-envs 8 --num-steps 32 --minibatch-size 64 --n-epochs 1",
    )
    ops = [r for r in throughput.main(args)["results"] if r["benchmark"] == "ops"]
    assert [r["name"] for r in ops] == ["phase1", "phase2", "phase3"]
    assert [r["minibatches"] for r in ops] == [8, 4, 4]  # the scripts' own counts, as in the training section
    for r in ops:
        assert r["aten_calls"] > 100 * r["minibatches"]  # a PPO minibatch alone dispatches hundreds
        assert set(r["dense_seconds_by_kernel"]) <= set(op_census.DENSE)
        assert {"aten::sigmoid", "aten::sigmoid_backward"} <= set(r["dense_seconds_by_kernel"])  # nets.tanh
        assert 0 < r["dense_seconds"] < r["op_seconds"]
        assert r["op_seconds"] + r["outside_op_seconds"] >= r["wall_seconds"] * 0.999  # every thread's ops counted
    # scaled by environment steps: 10x, 1x, 10x
    assert [r["dense_seconds_at_pipeline_size"] / r["dense_seconds"] for r in ops] == pytest.approx([10, 1, 10])


def test_census_counts_nested_ops_once():
    x, w = torch.randn(64, 32), torch.randn(16, 32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(5):
            torch.tanh(torch.nn.functional.linear(x, w))  # aten::linear calls aten::t and aten::mm inside it
        wall = time.perf_counter() - start
    result = op_census.census(prof, wall)
    assert result["aten_calls"] >= 20  # linear, t, mm, tanh (and views) five times
    assert set(result["dense_seconds_by_kernel"]) == {"aten::mm", "aten::tanh"}
    assert 0 < result["dense_seconds"] <= result["op_seconds"] <= wall
    assert result["outside_op_seconds"] == pytest.approx(wall - result["op_seconds"])


def test_a_phases_wall_time_splits_into_its_loop_parts_and_the_rest():
    timing = {"seconds": 30.0, "rollout_seconds": 6.0, "update_seconds": 20.0, "validation_seconds": 3.5,
              "logging_seconds": 0.5, "minibatches": 100, "seconds_per_minibatch": 0.2}  # fmt: skip
    parts = timed_runs.phase_parts(42.0, timing)
    assert parts == {"rollout": 6.0, "update": 20.0, "validation": 3.5, "logging": 0.5, "outside_loop": 12.0}
    assert sum(parts.values()) == pytest.approx(42.0)  # the parts add up to the phase's wall time


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the stop where torch sees no GPU")
def test_gpu_checks_stop_with_a_clear_error_where_torch_sees_no_gpu(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", "benchmarks/gpu_checks.sh", str(tmp_path / "out")], cwd=repo,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1
    assert "torch sees no CUDA GPU" in done.stderr
    # nothing ran past the device check: the summary holds the header and the reason, no step
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.txt"]
    assert "kernel_tests" not in (tmp_path / "out" / "summary.txt").read_text()
