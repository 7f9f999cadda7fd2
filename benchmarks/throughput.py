"""Throughput of the environments, the kernels, the training scripts and the pipeline (DESIGN section 13).

    python -m benchmarks.throughput [--sections env training] [--batch-sizes 64 256 1024 4096 16384]
                                    [--steps 200] [--devices cpu cuda] [--threads N] [--json PATH]
    python -m benchmarks.throughput --sections training --ranks 1 2     # Phase 1-3 steps/s, 1 and 2 ranks
    python -m benchmarks.throughput --sections pipeline                 # the default pipeline's wall time
    python -m benchmarks.throughput --sections sb3                      # Phase 1 against Stable-Baselines3 PPO
    python -m benchmarks.throughput --sections ops                      # each phase's op census (profiler)

What is measured, on every requested device (`cuda` only when `torch.cuda.is_available()`):

* **environment steps/s** = rows x steps / seconds for `SpecialistEnv` and `PortfolioEnv` (the risk
  manager included), in torch mode with `check_actions=False` and the actions pre-generated on the
  device (a small pool of batches, cycled): what a rollout pays per environment step, minus the policy.
  The compiled `PortfolioEnv` also runs with every row started at one of 4 adjacent bars (path `4-bars`):
  the same step with the tables it reads in the caches, so the gap to the random bars of a reset is the
  time a step waits on reading table rows (on a 2-core AMD EPYC at 4,096 rows most of the step);
* **kernel rows/s** of `kernels.portfolio_step` and `kernels.risk_step`: the dispatcher (the `path`
  column says whether it took Triton or the torch reference), the torch reference called directly
  and, on CUDA with Triton installed, the Triton launcher called directly;
* on CUDA, each kernel's **achieved GB/s** (the bytes it must read and write per call / time) next to
  the device's **copy bandwidth** measured with `torch.empty(...).copy_` of a 1 GiB buffer: the memory
  floor DESIGN section 13 compares the kernels against (`% copy`).

Every measurement runs `--warmup` untimed steps (Triton compiles, caches and the allocator settle),
then times `--steps` steps with `time.perf_counter`, with `torch.cuda.synchronize()` around the timed
loop on CUDA. These are benchmarks, not tests: other processes on the machine move the numbers.

The `training` section runs each phase script as a subprocess, chained (Phase 2 over the Phase 1 it
just trained, Phase 3 over both), with `--training-timesteps` per phase, once per `--ranks` count
(`torchrun --standalone --nproc_per_node R` above one rank), and reports the **training steps/s** the
script measured over its training loop (`metrics.json` timing: environment steps of all ranks over
the loop's wall time, in-loop validation included) and the subprocess's wall time (start-up and final
evaluation included). The `pipeline` section runs `python pipeline.py --mode train` with
`--pipeline-timesteps` (default: the seed's 500k / 300k / 1M) and reports its wall time and each
phase's, split into the training loop's parts and the time outside the loop (`timed_runs.phase_parts`).
Both print the device name and take `--train-device` and `--compile`. The `ops` section
(`benchmarks.op_census`) runs each phase script under the CPU profiler and reports where its time went.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

import kernels
from benchmarks import cli
from benchmarks.op_census import bench_ops
from benchmarks.timed_runs import PHASES, bench_pipeline, bench_sb3, bench_training
from kernels.portfolio_step import RewardParams, portfolio_step_reference
from kernels.risk import LIMIT_NAMES, risk_step_reference
from mtq_common.data.splits import load_splits
from mtq_common.data.tables import build_tables
from mtq_common.envs.gym_env import make_portfolio_vec, make_specialist_vec
from mtq_common.training.checkpoint import atomic_write_json
from mtq_common.training.distributed import resolve_device
from mtq_common.training.settings import load_config

ACTION_POOL = 16
"""Distinct pre-generated action batches cycled through the timed steps (memory stays small at any size)."""
COPY_BYTES = 1 << 30
"""Buffer size of the device copy-bandwidth measurement."""
ENV_TARGET = ("portfolio", 4096, {"cpu": 2_000_000, "cuda": 20_000_000})
"""The portfolio environment at 4096 rows, in environment steps/s: on the 2-core CPU (DESIGN section 13), on one
GPU (the speed issue's target on an H200)."""
Section = Literal["env", "training", "pipeline", "sb3", "ops"]


@dataclass
class Args:
    sections: tuple[Section, ...] = ("env",)
    """What to measure: env (environments and kernels), training (each phase script), pipeline (the default run),
    sb3 (Phase 1 against Stable-Baselines3 PPO, whole processes; needs stable-baselines3 installed), ops (each
    phase script under the CPU profiler: its aten calls and the dense kernels' share, in this process)."""
    batch_sizes: tuple[int, ...] = (64, 256, 1024, 4096, 16384)
    """Rows (environments, or kernel rows) per batch; one measurement per size."""
    steps: int = 200
    """Timed steps (environment steps or kernel calls) per measurement."""
    warmup: int = 20
    """Untimed steps before each measurement."""
    devices: tuple[str, ...] = ("cpu", "cuda")
    """Devices to measure; a CUDA device is skipped when torch sees no GPU."""
    config: str | None = None
    """YAML config of every section (None: the built-in defaults)."""
    bars: int | None = None
    """Bars of the synthetic training market the environments step through (None: the config's)."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    json: str | None = None
    """Also write the results as JSON to this path."""
    training_timesteps: tuple[int, int, int] = (131_072, 65_536, 131_072)
    """training: --timesteps of Phase 1, 2 and 3."""
    phases: tuple[Literal["phase1", "phase2", "phase3"], ...] = PHASES
    """training: the phases to run (each needs the ones before it: phase1, or phase1 phase2, or all three)."""
    ranks: tuple[int, ...] = (1,)
    """training: run each phase with each of these numbers of ranks (torchrun above 1)."""
    pipeline_timesteps: tuple[int, int, int] = (500_000, 300_000, 1_000_000)
    """pipeline: --phase1/2/3-timesteps (default: the seed's sizes, about 10 minutes on the 2-core CPU); ops: the
    sizes its dense kernels' seconds are scaled to."""
    ops_timesteps: tuple[int, int, int] = (16_384, 16_384, 40_960)
    """ops: --timesteps of Phase 1, 2 and 3 under the profiler (Phase 3: 5 iterations, one of them the specialists')."""
    sb3_timesteps: int = 65_536
    """sb3: environment steps of each side (Stable-Baselines3, and each Phase 1 specialist)."""
    train_device: str = "cpu"
    """training, pipeline and ops: the scripts' --device."""
    compile: str = "auto"
    """training and ops: the phase scripts' --compile (auto, on or off)."""
    seed: int = 1
    """training, pipeline and ops: the scripts' --seed."""
    script_flags: str = ""
    """training and ops: more flags for every phase script, written with "=": --script-flags="--num-envs 128"."""


# ---------------------------------------------------------------------------------------------
# Timing and device helpers
# ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued device work: CUDA launches are asynchronous, CPU work is not."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[int], object], steps: int, warmup: int, device: torch.device) -> float:
    """Mean wall time of `fn(i)` over `steps` calls, after `warmup` untimed calls."""
    for i in range(warmup):
        fn(i)
    synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        fn(i)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (platform's guess elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def copy_bandwidth(device: torch.device, nbytes: int = COPY_BYTES, repeats: int = 10) -> float:
    """Device copy bandwidth in GB/s: bytes read + written by `dst.copy_(src)` of an `nbytes` buffer."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = seconds_per_call(lambda _: dst.copy_(src), repeats, warmup=3, device=device)
    return 2 * nbytes / seconds / 1e9


# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------


ADJACENT_BARS = 4
"""The `4-bars` rows: every env row starts at one of this many adjacent bars (module docstring)."""


def bench_env(kind: str, rows: int, market, cfg, tables, device: torch.device, args: Args,
              compiled: bool = False, adjacent: bool = False) -> dict:  # fmt: skip
    """Environment steps/s of one batched env (torch mode, unchecked pre-generated actions); `compiled`: its
    step through torch.compile (`--compile`'s path); `adjacent`: every row started at one of `ADJACENT_BARS`
    adjacent bars instead of the reset's random ones (path `4-bars`)."""
    make = make_specialist_vec if kind == "specialist" else make_portfolio_vec
    extra = {"compiled": True} if compiled else {}
    env = make(
        rows,
        config=cfg,
        market=market,
        seed=0,
        torch_mode=True,
        device=device,
        check_actions=False,
        tables=tables,
        **extra,
    )
    generator = torch.Generator(device=device).manual_seed(0)
    pool = torch.rand((ACTION_POOL, *env.action_space.shape), generator=generator, device=device) * 2 - 1
    env.reset(seed=0)
    if adjacent:  # (the table rows every step reads then stay in the caches)
        env.start_at(tables.first_bar + torch.arange(rows, device=device) % ADJACENT_BARS)
    seconds = seconds_per_call(lambda i: env.step(pool[i % ACTION_POOL]), args.steps, args.warmup, device)
    impl = "compiled" if compiled else "env"
    path = f"{ADJACENT_BARS}-bars" if adjacent else "dispatch"
    return {"benchmark": "env", "name": kind, "impl": impl, "path": path, "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def risk_step_as_the_envs_call_it(proposed, cov, sector_onehot, limits, corr):
    """The dispatcher with the reference's signature, as a step calls it: the correlation from the tables, no
    finiteness check (a host sync)."""
    return kernels.risk_step(proposed, cov, sector_onehot, limits, check_finite=False, corr=corr)


def kernel_implementations(device: torch.device) -> dict[str, dict[str, Callable]]:
    """Per op: the dispatcher and the reference, plus the Triton launcher on CUDA when Triton imports."""
    impls = {
        "portfolio_step": {"dispatch": kernels.portfolio_step, "reference": portfolio_step_reference},
        "risk_step": {"dispatch": risk_step_as_the_envs_call_it, "reference": risk_step_reference},
    }
    if device.type == "cuda" and kernels.HAS_TRITON:
        from kernels.portfolio_step import portfolio_step_triton
        from kernels.risk import risk_step_triton

        impls["portfolio_step"]["triton"] = portfolio_step_triton
        impls["risk_step"]["triton"] = risk_step_triton
    return impls


def kernel_inputs(op: str, rows: int, portfolio_env, device: torch.device) -> tuple:
    """Plausible inputs of `op` for `rows` rows: market rows of the env's tables, random books and state."""
    tables, n = portfolio_env.engine.tables, portfolio_env.n
    generator = torch.Generator(device=device).manual_seed(0)

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(shape, generator=generator, device=device)

    bars = torch.randint(tables.first_bar, tables.num_bars, (rows,), generator=generator, device=device)
    max_position = portfolio_env.engine.max_position
    if op == "risk_step":  # (the covariance and its correlation, gathered from the tables as a step does)
        cov, corr = tables.cov.index_select(0, bars), tables.corr.index_select(0, bars)
        return uniform(rows, n, low=-1.0, high=1.0), cov, portfolio_env.sector_onehot, portfolio_env.limits, corr
    equity = uniform(rows, low=0.9, high=1.1)
    ema_b = uniform(rows, low=1e-5, high=1e-4)
    return (
        uniform(rows, n, low=-max_position, high=max_position),  # weights
        uniform(rows, n, low=-max_position, high=max_position),  # previous weights
        tables.returns.index_select(0, bars).contiguous(),
        portfolio_env.cost_rate,
        equity,
        equity * uniform(rows, low=1.0, high=1.1),  # peak >= equity
        uniform(rows, low=-1e-4, high=1e-4),  # ema_a
        ema_b,
        0.5 * ema_b,  # ema_down
        uniform(rows),  # var_usage
        RewardParams.from_config(portfolio_env.engine.cfg.reward, tables.bars_per_year),
    )


def kernel_bytes(op: str, rows: int, n: int, k: int, itemsize: int = 4) -> int:
    """Bytes a fused kernel must move per call: every input read once and every output written once."""
    if op == "portfolio_step":
        # weights, previous weights, returns [B, N]; cost rate [N]; 6 state inputs [B]; 9 outputs [B]
        return itemsize * (3 * rows * n + n + 6 * rows + 9 * rows)
    # proposal [B, N], covariance and correlation [B, N, N], sector one-hot [N, K]; weights [B, N], sectors [B, K],
    # 4 x [B] (VaR, correlation exposure, intervention, gross kept) and the binding limits [B, 4] as bytes
    return itemsize * (rows * n + 2 * rows * n * n + n * k + rows * n + rows * k + 4 * rows) + rows * len(LIMIT_NAMES)


def bench_kernel(op: str, impl: str, fn: Callable, inputs: tuple, device: torch.device, args: Args) -> dict:
    """Rows/s of one kernel implementation on prepared inputs."""
    seconds = seconds_per_call(lambda _: fn(*inputs), args.steps, args.warmup, device)
    if impl == "dispatch":
        path = "triton" if kernels.use_triton(inputs[0]) else "torch"
    else:
        path = "triton" if impl == "triton" else "torch"
    return {"benchmark": "kernel", "name": op, "impl": impl, "path": path, "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def bench_device(device: torch.device, market, cfg, args: Args) -> tuple[dict, list[dict]]:
    """Every measurement on one device: `(device info, result rows)`."""
    info = {"name": device_name(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["copy_gbps"] = copy_bandwidth(device)
    tables = build_tables(market, cfg, device)
    portfolio_env = make_portfolio_vec(1, config=cfg, market=market, device=device, tables=tables)
    n, k = portfolio_env.n, portfolio_env.sector_onehot.shape[1]
    impls = kernel_implementations(device)
    results = []
    for rows in args.batch_sizes:
        measured = [bench_env(kind, rows, market, cfg, tables, device, args) for kind in ("specialist", "portfolio")]
        measured += [bench_env(kind, rows, market, cfg, tables, device, args, compiled=True)
                     for kind in ("specialist", "portfolio")]  # fmt: skip
        measured.append(bench_env("portfolio", rows, market, cfg, tables, device, args, compiled=True, adjacent=True))
        for op, by_impl in impls.items():
            inputs = kernel_inputs(op, rows, portfolio_env, device)
            for impl, fn in by_impl.items():
                result = bench_kernel(op, impl, fn, inputs, device, args)
                if device.type == "cuda":
                    result["gbps"] = kernel_bytes(op, rows, n, k) / result["seconds"] / 1e9
                    result["copy_fraction"] = result["gbps"] / info["copy_gbps"]
                measured.append(result)
        for result in measured:
            result.update(device=str(device), rows=rows, rows_per_second=rows / result["seconds"])
            results.append(result)
            print_row(result)
    return info, results


def print_header() -> None:
    print(
        f"{'device':<8}{'bench':<8}{'name':<16}{'impl':<11}{'path':<10}{'rows':>8}"
        f"{'rows/s':>14}{'us/step':>12}{'GB/s':>9}{'% copy':>8}"
    )


def print_row(r: dict) -> None:
    gbps = f"{r['gbps']:9.1f}{100 * r['copy_fraction']:7.0f}%" if "gbps" in r else f"{'-':>9}{'-':>8}"
    print(
        f"{r['device']:<8}{r['benchmark']:<8}{r['name']:<16}{r['impl']:<11}{r['path']:<10}{r['rows']:>8}"
        f"{r['rows_per_second']:>14,.0f}{1e6 * r['seconds']:>12.1f}{gbps}"
    )


def bench_environments(args: Args) -> tuple[dict, list[str], list[dict]]:
    """The `env` section on every requested device: (device info, skipped devices, result rows)."""
    cfg = load_config(args.config)
    if args.bars is not None:
        cfg.data.synthetic.train_bars = args.bars
    market = load_splits(cfg)["train"]
    print(f"MTQ_KERNELS={os.environ.get('MTQ_KERNELS', 'auto')}")
    print(f"market: {market.num_bars} bars x {market.num_instruments} instruments ({market.source}, {market.split})")
    print(f"{args.steps} timed steps after {args.warmup} warm-up steps; env rows/s = environment steps/s")
    devices, skipped, results = {}, [], []
    for name in args.devices:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            skipped.append(name)
            continue
        print(f"\n{name}: {device_name(device)}")
        print_header()
        info, rows = bench_device(device, market, cfg, args)
        if "copy_gbps" in info:
            print(
                f"{name} copy bandwidth: {info['copy_gbps']:.1f} GB/s (torch.empty(...).copy_, {COPY_BYTES >> 20} MiB)"
            )
        devices[name] = info
        results += rows
    if skipped:
        print(f"\nskipped (no GPU visible to torch): {', '.join(skipped)}")

    kind, target_rows, targets = ENV_TARGET
    for r in results:
        if r["benchmark"] == "env" and r["name"] == kind and r["rows"] == target_rows and r["path"] == "dispatch":
            device_type = torch.device(r["device"]).type
            verdict = "meets" if r["rows_per_second"] >= targets[device_type] else "below"
            print(
                f"{r['device']}: {kind} env ({r['impl']}) at {target_rows} rows {r['rows_per_second']:,.0f} steps/s "
                f"({verdict} the target of {targets[device_type]:,} on {device_type})"
            )
    return devices, skipped, results


def check_args(args: Args) -> None:
    """Counts and sizes that would make a row meaningless (or divide by zero), refused before anything runs."""
    counts = {"--steps": [args.steps], "--batch-sizes": list(args.batch_sizes), "--ranks": list(args.ranks),
              "--training-timesteps": list(args.training_timesteps), "--ops-timesteps": list(args.ops_timesteps),
              "--pipeline-timesteps": list(args.pipeline_timesteps), "--sb3-timesteps": [args.sb3_timesteps],
              "--bars": [] if args.bars is None else [args.bars]}  # fmt: skip
    for flag, values in counts.items():
        if any(value < 1 for value in values):
            raise ValueError(f"{flag} {' '.join(map(str, values))}: accepted whole numbers >= 1")
    if args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup}: accepted a whole number >= 0")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: accepted a whole number >= 1")


def main(args: Args) -> dict:
    check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads in this process")
    # Other processes on the CPU slow every number (and stall multi-threaded small ops): say how busy it was.
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None:
        print(f"load average before the run: {load[0]:.2f} on {os.cpu_count()} CPUs")

    devices, skipped, results = bench_environments(args) if "env" in args.sections else ({}, [], [])
    if {"training", "pipeline", "ops"} & set(args.sections):
        train_device = resolve_device(args.train_device)
        devices["train"] = {"name": device_name(train_device), "device": str(train_device)}
        print(f"\ntraining scripts on {train_device}: {devices['train']['name']}")
    with tempfile.TemporaryDirectory(prefix="mtq_bench_") as tmp:
        if "training" in args.sections:
            print(f"{'phase':<8}{'ranks':>6}{'steps':>12}{'steps/s':>14}{'loop s':>10}{'rollout':>10}{'update':>10}"
                  f"{'mbs':>8}{'ms/mb':>8}{'wall s':>10}")  # fmt: skip
            results += bench_training(args, Path(tmp))
        if "pipeline" in args.sections:
            results.append(bench_pipeline(args, Path(tmp)))
        if "sb3" in args.sections:
            sb3 = bench_sb3(args, Path(tmp))
            results += [sb3] if sb3 is not None else []
        if "ops" in args.sections:
            results += bench_ops(args, Path(tmp) / "ops")

    out = {
        "args": asdict(args),
        "torch": torch.__version__,
        "load_average": load,
        "devices": devices,
        "skipped": skipped,
        "results": results,
    }
    if args.json:
        atomic_write_json(args.json, out, sort_keys=False)
    return out


if __name__ == "__main__":
    cli(main, Args, "throughput")
