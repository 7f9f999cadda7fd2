"""`--compile` and `--amp`: compile is "auto" (on only for long runs), runs on the CPU and matches eager; amp is
off by default and refused off CUDA."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import phase1_ppo
import phase2_meta
import phase3_joint
from mtq_common.agents.update import COMPILE_MIN_MINIBATCHES, use_compile
from mtq_common.training.plumbing import autocast, check_amp

REPO = Path(__file__).resolve().parent.parent
TINY = {"timesteps": 2048, "num_envs": 8, "num_steps": 32, "minibatch_size": 64, "n_epochs": 2, "eval_segments": 16}


@pytest.mark.parametrize("module", [phase1_ppo, phase2_meta, phase3_joint])
def test_compile_is_auto_and_amp_off_by_default(module):
    assert module.Args().compile == "auto" and module.Args().amp is False


def test_auto_compiles_long_runs_only():
    assert not use_compile("auto", COMPILE_MIN_MINIBATCHES - 1) and use_compile("auto", COMPILE_MIN_MINIBATCHES)
    assert use_compile("on", 1) and not use_compile("off", 10**9)
    with pytest.raises(ValueError, match="--compile 'yes': accepted auto, on or off"):
        use_compile("yes", 1)
    # the default pipeline's phases compile (500k / 300k / 1M steps, 64 rows x 128 steps, 10 epochs of 256-row
    # minibatches: 61, 36 and 122 iterations of 320 minibatches); the smoke run's (16,384 steps, 16 rows) do not
    assert all(use_compile("auto", iterations * 320) for iterations in (61, 36, 122))
    assert not use_compile("auto", 8 * 10 * 8)


def test_auto_trains_eager_where_nothing_compiles(monkeypatch, caplog):
    monkeypatch.setattr("shutil.which", lambda name: None)  # a machine without a C++ compiler
    log = logging.getLogger("mtq.test")
    with caplog.at_level(logging.WARNING, logger="mtq.test"):
        assert not use_compile("auto", 10**6, torch.device("cpu"), log)
    assert "no C++ compiler" in caplog.text and "trains eager" in caplog.text
    with pytest.raises(ValueError, match="--compile on: no C\\+\\+ compiler .*--compile off"):
        use_compile("on", 1, torch.device("cpu"))
    assert not use_compile("off", 10**6, torch.device("cpu"))


def test_compile_runs_on_the_cpu_and_matches_eager(tmp_path):
    eager = tmp_path / "eager"
    phase1_ppo.main(phase1_ppo.Args(output_dir=str(eager), log_dir=str(tmp_path / "l_eager"), device="cpu",
                                    progress=False, **TINY))  # fmt: skip
    # a subprocess: Dynamo's caches stay out of the test process
    compiled = tmp_path / "compiled"
    cmd = [sys.executable, "phase1_ppo.py", "--compile", "on", "--device", "cpu", "--no-progress", "--output-dir",
           str(compiled), "--log-dir", str(tmp_path / "l_compiled")]  # fmt: skip
    cmd += [arg for key, value in TINY.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a = torch.load(eager / "latest.pt", weights_only=True)
    b = torch.load(compiled / "latest.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()  # the module is not wrapped: checkpoints keep their keys
    # fused kernels round differently; after 8 updates the weights agree closely, and the compiled rollout bar
    # (the specialists' samples and the env's step) left the env where the eager one did
    eager_state, compiled_state = (dict(float_tensors({k: x[k] for k in ("model", "env")})) for x in (a, b))
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_amp_is_refused_off_cuda(tmp_path):
    with pytest.raises(ValueError, match="--amp: bf16 autocast .* for CUDA devices; this run is on cpu"):
        check_amp(True, torch.device("cpu"))
    check_amp(False, torch.device("cpu"))
    with pytest.raises(ValueError, match="--amp"):
        phase1_ppo.main(phase1_ppo.Args(output_dir=str(tmp_path / "o"), log_dir=str(tmp_path / "l"), device="cpu",
                                        progress=False, amp=True, **TINY))  # fmt: skip
    assert not (tmp_path / "o").exists()  # refused before anything is written
    x = torch.ones(2, 2)
    with autocast(False, torch.device("cpu")):
        assert (x @ x).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast needs CUDA")
def test_amp_on_cuda_runs_the_update_in_bf16(tmp_path):
    x = torch.ones(2, 2, device="cuda")
    with autocast(True, torch.device("cuda")):
        assert (x @ x).dtype == torch.bfloat16
    result = phase1_ppo.main(phase1_ppo.Args(output_dir=str(tmp_path / "o"), log_dir=str(tmp_path / "l"),
                                             device="cuda", progress=False, amp=True, **TINY))  # fmt: skip
    assert result["global_step"] == TINY["timesteps"]


def float_tensors(state, prefix: str = ""):
    """Every floating-point tensor of a checkpoint's nested state, by its path."""
    if isinstance(state, dict):
        for key, value in state.items():
            yield from float_tensors(value, f"{prefix}{key}.")
    elif isinstance(state, torch.Tensor) and state.is_floating_point():
        yield prefix, state


@pytest.mark.parametrize("script", ["phase2_meta.py", "phase3_joint.py"])
def test_compile_runs_phases_2_and_3_and_matches_eager(tiny_phases, tmp_path, script):
    # Phase 3 takes three gradients from one compiled forward pass (retain_graph): this once failed. Both phases
    # compile a whole rollout bar (the decisions, the env and its twin, the tracker): the compiled run must trade
    # what the eager one trades, so the envs' and the twin's states and the weights agree closely at the end.
    _, config, (p1, p2) = tiny_phases
    phase3 = ["--phase1-dir", str(p1), "--phase2-dir", str(p2), "--eval-episodes", "2", "--specialist-update-freq", "1",
              "--no-helper"]  # fmt: skip
    inputs = ["--specialists-dir", str(p1)] if script == "phase2_meta.py" else phase3
    states = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        cmd = [sys.executable, script, "--compile", mode, "--config", str(config), "--timesteps", "512", "--num-envs",
               "8", "--num-steps", "32", "--minibatch-size", "64", "--n-epochs", "1", "--eval-segments", "16",
               "--device", "cpu", "--no-progress", "--output-dir", str(out), "--log-dir",
               str(tmp_path / f"logs_{mode}"), *inputs]  # fmt: skip
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (out / "metrics.json").is_file()
        latest = torch.load(out / "latest.pt", weights_only=True)
        models = ["model"] if script == "phase2_meta.py" else ["specialists", "meta"]
        states[mode] = dict(float_tensors({key: latest[key] for key in [*models, "env", "twin", "tracker"]}))
    assert states["on"].keys() == states["off"].keys()
    for key, eager in states["off"].items():  # fused kernels round differently: close, not equal
        torch.testing.assert_close(states["on"][key], eager, rtol=1e-4, atol=1e-5, msg=key)
