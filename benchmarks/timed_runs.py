"""The `training`, `pipeline` and `sb3` sections of `benchmarks.throughput`: whole scripts run as
subprocesses and timed (see that module's docstring for what each reports). `args` is its `Args`."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

PIPELINE_TARGET_SECONDS = {"cpu": 240, "cuda": 60}
"""The default pipeline, evaluation included: within 4 minutes on the 2-core CPU (DESIGN section 13), within a
minute on one GPU (the speed issue's target on an H200)."""
REPO = Path(__file__).resolve().parents[1]
PHASES = ("phase1", "phase2", "phase3")
SCRIPTS = {"phase1": "phase1_ppo.py", "phase2": "phase2_meta.py", "phase3": "phase3_joint.py"}


def run_timed(cmd: list[str]) -> float:
    """Run `cmd` from the repository root (one torch thread per process); its wall seconds."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def launcher(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]


def phase_flags(
    phase: str, timesteps: int, out: Path, earlier: dict[str, Path], args, eval_episodes: int = 10
) -> list[str]:
    """A phase script's flags in a benchmark: its size and output, the earlier phases' outputs it trains over
    (`earlier[name]`), and the benchmark's device, seed, config, `--compile` and `--script-flags`."""
    flags = ["--timesteps", str(timesteps), "--output-dir", str(out), "--log-dir", str(out / "logs"), "--device",
             args.train_device, "--seed", str(args.seed), "--no-progress"]  # fmt: skip
    if phase == "phase2":
        flags += ["--specialists-dir", str(earlier["phase1"])]
    if phase == "phase3":
        flags += ["--phase1-dir", str(earlier["phase1"]), "--phase2-dir", str(earlier["phase2"]), "--eval-episodes",
                  str(eval_episodes)]  # fmt: skip
    if args.config:
        flags += ["--config", args.config]
    flags += ["--compile", args.compile]
    return flags + shlex.split(args.script_flags)


def bench_training(args, work: Path) -> list[dict]:
    """Each phase script, chained, with each rank count: training steps/s and wall time."""
    if tuple(args.phases) != PHASES[: len(args.phases)]:
        raise ValueError(f"--phases {' '.join(args.phases)}: each phase trains over the ones before it; "
                         f"accepted: phase1 / phase1 phase2 / phase1 phase2 phase3")  # fmt: skip
    results = []
    for phase, timesteps in zip(args.phases, args.training_timesteps, strict=False):
        for ranks in args.ranks:
            out = work / f"{phase}_r{ranks}"
            # later phases train over the first rank count's outputs of the earlier ones
            earlier = {name: work / f"{name}_r{args.ranks[0]}" for name in PHASES}
            wall = run_timed([*launcher(ranks), SCRIPTS[phase], *phase_flags(phase, timesteps, out, earlier, args)])
            metrics = json.loads((out / "metrics.json").read_text())
            result = {
                "benchmark": "training",
                "name": phase,
                "ranks": ranks,
                "timesteps": metrics["global_step"],
                "steps_per_second": metrics["timing"]["steps_per_second"],
                "loop_seconds": metrics["timing"]["seconds"],
                # where the loop's time went (mtq_common.training.plumbing.Stopwatch): the update per PPO minibatch
                "rollout_seconds": metrics["timing"]["rollout_seconds"],
                "update_seconds": metrics["timing"]["update_seconds"],
                "minibatches": metrics["timing"]["minibatches"],
                "ms_per_minibatch": 1e3 * metrics["timing"]["seconds_per_minibatch"],
                "wall_seconds": wall,
                "compile": args.compile,
                "device": args.train_device,
            }
            print(f"{phase:<8}{ranks:>6}{result['timesteps']:>12,}{result['steps_per_second']:>14,.0f}"
                  f"{result['loop_seconds']:>10.1f}{result['rollout_seconds']:>10.1f}{result['update_seconds']:>10.1f}"
                  f"{result['minibatches']:>8}{result['ms_per_minibatch']:>8.2f}{wall:>10.1f}")  # fmt: skip
            results.append(result)
    return results


def bench_pipeline(args, work: Path) -> dict:
    """`python pipeline.py --mode train` at `--pipeline-timesteps`: wall time, each phase's and the evaluation's."""
    out = work / "pipeline"
    t1, t2, t3 = (str(t) for t in args.pipeline_timesteps)
    cmd = [sys.executable, "pipeline.py", "--mode", "train", "--output-dir", str(out), "--log-dir", str(out / "logs"),
           "--device", args.train_device, "--seed", str(args.seed), "--phase1-timesteps", t1, "--phase2-timesteps",
           t2, "--phase3-timesteps", t3, "--no-progress"]  # fmt: skip
    if args.config:
        cmd += ["--config", args.config]
    wall = run_timed(cmd)
    manifest = json.loads((out / "pipeline.json").read_text())
    result = {
        "benchmark": "pipeline",
        "timesteps": list(args.pipeline_timesteps),
        "wall_seconds": wall,
        "phase_seconds": {name: phase["seconds"] for name, phase in manifest["phases"].items()},
        "eval_seconds": manifest["eval"]["seconds"],
        "device": args.train_device,
    }
    target = PIPELINE_TARGET_SECONDS["cuda" if args.train_device.startswith("cuda") else "cpu"]
    result["meets_target"] = wall <= target
    result["phase_parts"] = {
        name: phase_parts(seconds, json.loads((out / name / "metrics.json").read_text())["timing"])
        for name, seconds in result["phase_seconds"].items()
    }
    phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result["phase_seconds"].items())
    verdict = "meets" if result["meets_target"] else "misses"
    print(f"pipeline {t1}/{t2}/{t3} steps: {wall:.1f} s wall ({phases}, evaluation "
          f"{result['eval_seconds']:.1f} s); {verdict} the target of {target} s on {args.train_device}")  # fmt: skip
    for name, parts in result["phase_parts"].items():
        print(f"  {name}: " + ", ".join(f"{part} {seconds:.1f} s" for part, seconds in parts.items()))
    return result


def phase_parts(phase_seconds: float, timing: dict) -> dict[str, float]:
    """Where a phase's wall time in the pipeline went: its training loop's parts as the script timed them
    (`metrics.json` timing: rollout, update, validation, logging; compiling happens in the first rollout and
    update) and `outside_loop`, the rest (loading, the start's fits and backtests on the training split before
    the loop, the final validation report after it)."""
    parts = {part: timing[f"{part}_seconds"] for part in ("rollout", "update", "validation", "logging")
             if f"{part}_seconds" in timing}  # fmt: skip
    return {**parts, "outside_loop": phase_seconds - timing["seconds"]}


SB3_TARGET = 20.0
"""DESIGN 13: Phase 1 at least this many times faster than Stable-Baselines3 PPO, whole process."""


def bench_sb3(args, work: Path) -> dict | None:
    """Phase 1 against Stable-Baselines3 PPO with the seed's settings on `MTQ/Specialist-v0`, side by side in
    one run, whole processes: environment steps per second of each (Phase 1 trains every specialist, so
    its steps are `--timesteps` x specialists). None (with a line) when SB3 is not installed."""
    import importlib.util

    if importlib.util.find_spec("stable_baselines3") is None:
        print('sb3: stable-baselines3 is not installed (pip install "stable-baselines3>=2.3,<3"): skipped')
        return None
    steps = args.sb3_timesteps
    sb3_wall = run_timed([sys.executable, "-m", "benchmarks.sb3_ppo", "--timesteps", str(steps), "--seed",
                          str(args.seed)])  # fmt: skip
    out = work / "phase1_vs_sb3"
    phase1_wall = run_timed([sys.executable, "phase1_ppo.py", "--timesteps", str(steps), "--output-dir", str(out),
                             "--log-dir", str(out / "logs"), "--device", "cpu", "--seed", str(args.seed),
                             "--no-progress"])  # fmt: skip
    specialists = len(json.loads((out / "metrics.json").read_text())["specialists"])
    sb3_rate, phase1_rate = steps / sb3_wall, specialists * steps / phase1_wall
    result = {
        "benchmark": "sb3",
        "timesteps": steps,
        "sb3_wall_seconds": sb3_wall,
        "sb3_steps_per_second": sb3_rate,
        "phase1_wall_seconds": phase1_wall,
        "phase1_specialists": specialists,
        "phase1_steps_per_second": phase1_rate,
        "speedup": phase1_rate / sb3_rate,
        "meets_target": phase1_rate / sb3_rate >= SB3_TARGET,
    }
    print(f"sb3: {steps:,} steps in {sb3_wall:.1f} s ({sb3_rate:,.0f} steps/s, whole process); phase1: {steps:,} steps "
          f"x {specialists} specialists in {phase1_wall:.1f} s ({phase1_rate:,.0f} steps/s); {result['speedup']:.1f}x "
          f"({'meets' if result['meets_target'] else 'misses'} the DESIGN section 13 target of "
          f"{SB3_TARGET:g}x)")  # fmt: skip
    return result
