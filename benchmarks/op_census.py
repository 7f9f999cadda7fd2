"""The `ops` section of `benchmarks.throughput`: where a phase script's CPU time goes, op by op.

Each phase script runs once with the `training` section's flags (`--ops-timesteps`; Phase 3 with 2
evaluation episodes), chained (Phase 2 over the Phase 1 it just trained, Phase 3 over both) but in this
process, under `torch.profiler` (CPU ops). Reported per phase:

* the script's wall time under the profiler and its PPO minibatches;
* the aten calls it dispatched (nested calls included), in all and per minibatch (the whole run's calls
  over its minibatches: the rollout, the validation and the start-up are spread over them);
* the time of the **dense kernels** (`DENSE`: the matmuls, the activation and its backward), the time inside
  outermost ops (every thread; the autograd engine's steps included), and the main thread's time outside
  any op (Python between the calls, and the profiler's own work);
* the dense kernels' seconds scaled to `--pipeline-timesteps` by the environment steps.

Why: a speed change must leave the trained results bit-identical (the same weights, the same report),
and that pins the dense kernels: the same kernels on the same shapes are the part of the time that no
rewrite of the scripts removes on one core, whatever happens to the hundreds of small ops around them.
Their scaled seconds are about that floor for the default pipeline (the test evaluation not included); the
scaling grows the profiled runs' start-up, final evaluation and validation (at every run's end; every 10
iterations at the default sizes) with the steps too, so it overstates those small parts.
Profiling adds about a microsecond to every op, so the small ops' share is somewhat overstated; the
dense kernels' seconds are not (each call takes tens to hundreds of microseconds).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import time
from pathlib import Path

from benchmarks.timed_runs import PHASES, SCRIPTS, phase_flags

MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")
ACTIVATIONS = ("aten::sigmoid", "aten::sigmoid_backward", "aten::tanh", "aten::tanh_backward")
DENSE = MATMULS + ACTIVATIONS
"""The arithmetic of the networks: their matmuls (forward and backward) and their activation (`nets.tanh`, a
sigmoid; `tanh` for scripts that call torch's own)."""


def census(profiler, wall: float) -> dict:
    """A finished `torch.profiler.profile`'s totals: aten calls, the dense kernels' seconds, the seconds inside
    outermost ops (all threads) and the main thread's seconds outside them.

    Read from the raw events (`key_averages()` builds Python objects for every event: minutes for the
    millions of a Phase 3 run). A dense kernel never runs inside another, so their durations add up."""
    events = profiler.profiler.kineto_results.events()
    # by thread and start, an op before the ops inside it (they may start in the same nanosecond)
    rows = sorted((e.start_thread_id(), e.start_ns(), -e.duration_ns(), e.name()) for e in events)
    calls, dense, by_name, outer, end = 0, 0, {}, {}, {}  # outer, end: per thread
    for tid, start, minus_duration, name in rows:
        duration = -minus_duration
        calls += name.startswith("aten::")
        if name in DENSE:
            dense += duration
            by_name[name] = by_name.get(name, 0) + duration
        if start >= end.get(tid, -1):  # outermost on its thread: not inside the previous outermost op
            end[tid] = start + duration
            outer[tid] = outer.get(tid, 0) + duration
    return {
        "aten_calls": calls,
        "dense_seconds": dense / 1e9,
        "dense_seconds_by_kernel": {name: ns / 1e9 for name, ns in sorted(by_name.items())},
        "op_seconds": sum(outer.values()) / 1e9,  # every thread (Phase 3 runs one backward pass on a second)
        "outside_op_seconds": wall - max(outer.values(), default=0) / 1e9,  # the main thread's
    }


def bench_ops(args, work: Path) -> list[dict]:
    """Each phase script under the CPU profiler, chained: its op census (module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    from mtq_common.training.settings import parse_args

    print(f"{'phase':<8}{'steps':>10}{'wall s':>9}{'mbs':>7}{'aten calls':>12}{'/ mb':>7}{'dense s':>9}"
          f"{'ops s':>8}{'outside':>9}   dense s at the pipeline's steps")  # fmt: skip
    results = []
    for phase, timesteps, full in zip(PHASES, args.ops_timesteps, args.pipeline_timesteps, strict=True):
        module = importlib.import_module(SCRIPTS[phase].removesuffix(".py"))
        flags = phase_flags(phase, timesteps, work / phase, {name: work / name for name in PHASES}, args, 2)
        script_args, _ = parse_args(module.Args, module.ALIASES, flags)
        with profile(activities=[ProfilerActivity.CPU]) as prof, contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            module.main(script_args)  # (its tables to stdout are not what this section reports)
            wall = time.perf_counter() - start
        metrics = json.loads((work / phase / "metrics.json").read_text())
        r = {"benchmark": "ops", "name": phase, "timesteps": metrics["global_step"], "wall_seconds": wall,
             "minibatches": metrics["timing"]["minibatches"], **census(prof, wall)}  # fmt: skip
        r["aten_calls_per_minibatch"] = r["aten_calls"] / max(r["minibatches"], 1)
        r["pipeline_timesteps"] = full
        r["dense_seconds_at_pipeline_size"] = r["dense_seconds"] * full / r["timesteps"]
        print(f"{phase:<8}{r['timesteps']:>10,}{wall:>9.1f}{r['minibatches']:>7}{r['aten_calls']:>12,}"
              f"{r['aten_calls_per_minibatch']:>7.0f}{r['dense_seconds']:>9.2f}{r['op_seconds']:>8.2f}"
              f"{r['outside_op_seconds']:>9.2f}   {r['dense_seconds_at_pipeline_size']:.1f} at {full:,}")  # fmt: skip
        results.append(r)
    floor = sum(r["dense_seconds_at_pipeline_size"] for r in results)
    print(f"dense kernels at the pipeline's steps: about {floor:.0f} s on one core, the floor of the three phases' "
          f"training with the same kernels (bit-identical results), the test evaluation aside")  # fmt: skip
    return results
