"""Seed sweep: run a training command over configs x seeds and tabulate the metrics across seeds.

    python -m benchmarks.run --command "python phase1_ppo.py --timesteps 4096" --seeds 1 2 3 \\
        [--configs a.yaml b.yaml] [--workers 2] [--output-dir runs/bench] [--run | --collect] [--json results.json]

CleanRL's benchmark utility, adapted. Each run is the command plus `--seed S`, `--config C` (only when
configs are given), `--output-dir OUT/<config stem or default>/seed_S`, `--log-dir .../seed_S/logs` and
`--no-progress`. Without `--run` the expanded commands are printed and nothing runs; `--collect` tabulates
the runs an earlier `--run` left in the output dir. With `--run` they
run in a pool of `--workers` processes from the repository root with `OMP_NUM_THREADS=1`; a leading
`python` runs as this interpreter. Every run's `metrics.json` (or, for `pipeline.py`, its test report
`eval/report.json`) is flattened ("/"-joined keys, lists,
strings and anything under "timing" left out) and summarised per config: mean, std (ddof=1), min, max
and n. The rows matching `--metrics` (glob patterns) are printed, shallowest keys first; the full table,
the commands and each run's status go to `--json` (default OUT/results.json). The exit code is non-zero
when any run failed or wrote no metrics.json.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks import cli
from benchmarks.throughput import device_name
from mtq_common.evaluation.rules import best_rule
from mtq_common.evaluation.tearsheet import policy_metrics
from mtq_common.training.checkpoint import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GROUP = "default"
METRICS_FILES = ("metrics.json", "eval/report.json")
"""Where a run's metrics are read from, first found: a phase script's, or the pipeline's test report."""


@dataclass
class Args:
    command: str
    """Training command, e.g. "python phase1_ppo.py --timesteps 4096" (seed, config and dirs are appended)."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Seeds to run each config with."""
    configs: list[str] = field(default_factory=list)
    """YAML configs to sweep (each passed as --config); empty: the command's own default."""
    output_dir: str = "runs/bench"
    """Root of the runs' output dirs (relative paths are from the repository root)."""
    workers: int = 1
    """Runs executed at the same time."""
    run: bool = False
    """Execute the runs; without it the expanded commands are only printed."""
    collect: bool = False
    """Tabulate the runs already in --output-dir (the same --command, seeds and configs) without running them."""
    json: str | None = None
    """Where the full table goes as JSON (default: <output-dir>/results.json)."""
    metrics: list[str] = field(default_factory=lambda: ["*sharpe", "*max_drawdown", "*win_rate", "*total_return"])
    """Print the rows whose key matches one of these glob patterns (e.g. "specialists/*sharpe")."""
    max_rows: int = 40
    """Printed rows per config at most (the JSON holds them all)."""
    timeout: float | None = None
    """Seconds a run may take before it is killed and counted as failed (unset: no limit)."""
    stderr_lines: int = 20
    """Lines of a run's stderr kept for the report."""


@dataclass
class Run:
    command: list[str]
    """Full argv of the run."""
    seed: int
    """Its --seed."""
    config: str | None
    """Its --config (None: the command's default)."""
    output_dir: str
    """Its --output-dir, where metrics.json is read from."""

    @property
    def group(self) -> str:
        """Name of the config group the run is aggregated under."""
        return Path(self.config).stem if self.config else DEFAULT_GROUP


@dataclass
class Outcome:
    run: Run
    returncode: int | None = None
    """Exit status (None: killed by --timeout)."""
    status: str = "not run"
    """ok, failed, timeout or no metrics."""
    stderr_tail: str = ""
    seconds: float = 0.0
    metrics: dict[str, float] | None = None
    """Flattened metrics.json of a successful run."""
    report: dict | None = None
    """The same, as written (the test report of a pipeline run)."""


def expand(command: str, seeds: list[int], configs: list[str], output_dir: str) -> list[Run]:
    """One Run per (config, seed): the command split like a shell would, plus the per-run flags."""
    try:
        base = shlex.split(command)
    except ValueError as err:  # (an unclosed quote)
        raise ValueError(f"--command {command!r}: not a command line a shell would split ({err})") from None
    if not base:
        raise ValueError('--command is empty: accepted a command line, e.g. "python pipeline.py --mode train"')
    if not seeds:
        raise ValueError("--seeds is empty: accepted one or more distinct seeds, e.g. --seeds 1 2 3 4 5")
    stems = [Path(c).stem for c in configs]
    if len(set(stems)) != len(stems):
        raise ValueError(f"configs must have distinct file stems (they name the output dirs): {configs}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct: {seeds}")
    if any(not 0 <= seed < 2**32 for seed in seeds):  # (what every script accepts: refused here, not in each run)
        raise ValueError(f"--seeds {seeds}: accepted whole numbers 0 <= seed < 2**32")
    runs = []
    for config in configs or [None]:
        group = Path(config).stem if config else DEFAULT_GROUP
        for seed in seeds:
            out = str(Path(output_dir) / group / f"seed_{seed}")
            argv = [*base, "--seed", str(seed)]
            if config:
                argv += ["--config", config]
            argv += ["--output-dir", out, "--log-dir", str(Path(out) / "logs"), "--no-progress"]
            runs.append(Run(command=argv, seed=seed, config=config, output_dir=out))
    return runs


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict under "/"-joined keys; lists, strings, bools and "timing" are left out."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "timing":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def aggregate(runs: list[dict[str, float]]) -> dict[str, dict]:
    """Per key (in first-seen order): mean, std (ddof=1, 0 for one value), min, max and n over the runs with it."""
    keys = list(dict.fromkeys(key for flat in runs for key in flat))  # first-seen order: metrics.json's own
    table = {}
    for key in keys:
        values = np.array([flat[key] for flat in runs if key in flat], dtype=np.float64)
        table[key] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()),
            "max": float(values.max()),
            "n": len(values),
        }
    return table


def execute(run: Run, timeout: float | None, stderr_lines: int) -> Outcome:
    """Run one command from the repository root with OMP_NUM_THREADS=1 and read its metrics.json."""
    argv = list(run.command)
    # "python" on PATH may not be this venv's interpreter; the runs should use the one running us.
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    outcome = Outcome(run)
    try:
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        outcome.status, outcome.stderr_tail = "timeout", tail(stderr, stderr_lines)
    except OSError as e:  # the program itself could not be started
        outcome.status, outcome.stderr_tail = "failed", str(e)
    else:
        outcome.returncode, outcome.stderr_tail = done.returncode, tail(done.stderr, stderr_lines)
        found = [REPO / run.output_dir / name for name in METRICS_FILES if (REPO / run.output_dir / name).is_file()]
        if done.returncode != 0:
            outcome.status = "failed"
        elif not found:
            outcome.status = "no metrics"
        else:
            read_metrics(outcome, found[0])
    outcome.seconds = time.perf_counter() - start
    return outcome


def read_metrics(outcome: Outcome, path: Path) -> None:
    raw = json.loads(path.read_text())
    outcome.status, outcome.metrics, outcome.report = "ok", flatten(raw), raw


def collect(run: Run) -> Outcome:
    """A finished run's outcome from its output dir (`--collect`): its metrics, or "no metrics"."""
    outcome = Outcome(run, status="no metrics")
    found = [REPO / run.output_dir / name for name in METRICS_FILES if (REPO / run.output_dir / name).is_file()]
    if found:
        read_metrics(outcome, found[0])
    return outcome


def tail(text: str, lines: int) -> str:
    """The last `lines` lines of `text`."""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def selected_rows(table: dict[str, dict], patterns: list[str]) -> list[str]:
    """Keys of `table` matching one of the glob `patterns`, shallow keys (summaries) first."""
    keys = [key for key in table if any(fnmatch.fnmatchcase(key, p) for p in patterns)]
    return sorted(keys, key=lambda key: key.count("/"))  # stable: same depth keeps the table's order


def format_table(group: str, table: dict[str, dict], rows: list[str]) -> str:
    """A fixed-width text table of the chosen rows of one config group."""
    width = max([len(key) for key in rows] + [len(group)])
    lines = [f"{group:<{width}}{'mean':>10}{'std':>10}{'min':>10}{'max':>10}{'n':>4}"]
    for key in rows:
        s = table[key]
        lines.append(f"{key:<{width}}{s['mean']:>10.3f}{s['std']:>10.3f}{s['min']:>10.3f}{s['max']:>10.3f}{s['n']:>4}")
    return "\n".join(lines)


QUALITY_REFERENCES = ("best_rule", "vol_managed_equal_allocation", "equal_allocation", "phase2_system", "scaled_trend")
"""The paired differences `system - reference` of the trading-quality table (DESIGN 14), in column order."""


def machine() -> str:
    """The CPU (model name, logical cores) and torch's version: results differ between CPU types."""
    return f"{device_name(torch.device('cpu'))}, {os.cpu_count()} logical cores, torch {torch.__version__}"


def seed_row(seed: int, rep: dict) -> dict:
    """One seed's line of the trading-quality table from its test report."""
    policies, paired = policy_metrics(rep), rep.get("confidence", {}).get("vs_system", {})
    best = best_rule({name: m["sharpe"] for name, m in policies.items()})
    sharpe = {name: m["sharpe"] for name, m in policies.items()} | {"best_rule": policies[best]["sharpe"]}
    differences = {}
    for ref in QUALITY_REFERENCES:
        name = best if ref == "best_rule" else ref
        if name in paired:
            differences[ref] = {key: paired[name][key] for key in ("difference", "low", "high")}
    failed = [t["target"] for t in rep["relative_targets"] if not t["pass"]]
    return {"seed": seed, "sharpe": sharpe, "best_rule": best, "differences": differences,
            "phase3_best_iteration": rep.get("phase3_best_iteration"),
            "phase3_early_stop_iteration": rep.get("phase3_early_stop_iteration"),
            "phase3_joint_sizing": rep.get("phase3_joint_sizing"), "pass": not failed, "failed": failed,
            "checks": len(rep["relative_targets"]),
            "turnover_per_vol": policies["system"]["turnover_per_vol"],
            "momentum_turnover_per_vol": policies["momentum"]["turnover_per_vol"]}  # fmt: skip


def trading_quality(outcomes: list) -> tuple[str, dict] | None:
    """For pipeline runs (test reports): per seed the Sharpe ratios of the system, the Phase 2 system, the
    equal allocation, its volatility-managed form, the best rule traded alike and the scaled trend (the rule the
    specialists start at, where they do; not among DESIGN 14's rules); the paired differences
    `system - reference` with their 90% bootstrap intervals; the Phase 3 iteration `best.pt` holds;
    DESIGN 14's verdict; then mean and spread across seeds and the machine.

    A claim holds only if it holds for every seed: the table shows each seed's pass/fail, never a mean alone.
    (No deflated Sharpe ratio: this project keeps no log of every configuration tried, so the number of
    trials it would need is unknown.) Returns the printed text and a JSON-ready summary, or None when no run
    wrote a test report."""
    reports = [(o.run.seed, o.report) for o in outcomes if o.report and "relative_targets" in o.report]
    if not reports:
        return None
    rows = [seed_row(seed, rep) for seed, rep in reports]
    names = ["system", "phase2_system", "equal_allocation", "vol_managed_equal_allocation", "best_rule", "scaled_trend"]
    short = {
        "system": "system",
        "phase2_system": "phase 2",
        "equal_allocation": "eq.alloc",
        "vol_managed_equal_allocation": "vm eq.alloc",
        "best_rule": "best rule",
        "scaled_trend": "scaled tr.",
    }
    diff = {
        "best_rule": "- best rule",
        "vol_managed_equal_allocation": "- vm eq.alloc",
        "equal_allocation": "- eq.alloc",
        "phase2_system": "- phase 2",
        "scaled_trend": "- scaled tr.",
    }
    header = f"{'seed':<5}" + "".join(f"{short[n]:>12}" for n in names) + f"  {'(rule)':<25}"
    header += "".join(f"{diff[r]:>22}" for r in QUALITY_REFERENCES) + f"{'P3 it':>7}{'turn/vol':>10}  DESIGN 14"
    lines = [header]
    for r in rows:
        cells = "".join(f"{r['sharpe'].get(n, float('nan')):>12.3f}" for n in names) + f"  {r['best_rule']:<25}"
        for ref in QUALITY_REFERENCES:
            d = r["differences"].get(ref)
            cells += f"{d['difference']:+7.2f} [{d['low']:+.2f},{d['high']:+.2f}]" if d else f"{'':>22}"
        iteration, stop = r["phase3_best_iteration"], r["phase3_early_stop_iteration"]
        iteration = iteration if iteration is None or stop is None else f"{iteration}/{stop}"
        iteration = f"{iteration}+s" if r.get("phase3_joint_sizing") else iteration  # from the joint sizing's start
        verdict = "PASS" if r["pass"] else "FAIL (" + "; ".join(r["failed"]) + ")"
        turnover = f"{r['turnover_per_vol']:.2f}/{r['momentum_turnover_per_vol']:.2f}"
        lines.append(f"{r['seed']:<5}{cells}{'' if iteration is None else iteration:>7}{turnover:>10}  {verdict}")
    summary: dict = {"machine": machine(), "seeds": rows, "all_pass": all(r["pass"] for r in rows),
                     "checks": sum(r["checks"] for r in rows),
                     "checks_passed": sum(r["checks"] - len(r["failed"]) for r in rows),
                     "seeds_passing": sum(r["pass"] for r in rows)}  # fmt: skip
    for n in names:
        values = np.array([r["sharpe"][n] for r in rows if n in r["sharpe"]])
        if len(values):
            summary[n] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
            lines.append(f"{n + ' mean +- std':<40}{summary[n]['mean']:>8.3f} +- {summary[n]['std']:.3f}")
    lines.append(f"machine: {summary['machine']}")
    lines.append("(turn/vol: the system's turnover per unit of volatility / momentum's; P3 it: the Phase 3 iteration "
                 "best.pt holds, 0 = the Phase 2 system; +s: with the joint sizing fit on train; /N: stopped early at "
                 "iteration N)")  # fmt: skip
    # the tally over seeds, and which check failed where: what a reader of many seeds asks first
    failures = {}
    for r in rows:
        for target in r["failed"]:
            failures.setdefault(target, []).append(str(r["seed"]))
    lines.append(
        f"DESIGN 14 checks passed: {summary['checks_passed']} of {summary['checks']}; seeds passing every "
        f"check: {summary['seeds_passing']} of {len(rows)}"
        + "".join(f"; {target} fails on seed(s) {', '.join(seeds)}" for target, seeds in failures.items())
    )
    lines.append("every seed passes DESIGN 14" if summary["all_pass"] else "DESIGN 14 NOT met for every seed")
    return "\n".join(lines), summary


def finite_or_none(value):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def check_args(args: Args) -> list[Run]:
    """The runs of `args` (`expand`), with the pool's flags refused where they are out of range."""
    runs = expand(args.command, args.seeds, args.configs, args.output_dir)
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: accepted a whole number >= 1 (runs at the same time)")
    if args.timeout is not None and not args.timeout > 0:
        raise ValueError(f"--timeout {args.timeout}: accepted seconds > 0, or None (no limit)")
    return runs


def main(args: Args) -> int:
    runs = check_args(args)
    if not args.run and not args.collect:
        for run in runs:
            print(shlex.join(run.command))
        return 0

    # RUN: a thread per worker, each waiting on one subprocess at a time (--collect: read what is there)
    outcomes: dict[int, Outcome] = {}
    if args.collect:
        outcomes = {i: collect(run) for i, run in enumerate(runs)}
    else:
        print(f"running {len(runs)} runs with {args.workers} workers", flush=True)
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            futures = {pool.submit(execute, run, args.timeout, args.stderr_lines): i for i, run in enumerate(runs)}
            for future in as_completed(futures):
                outcome = outcomes[futures[future]] = future.result()
                print(f"[{len(outcomes)}/{len(runs)}] {outcome.status:<10} {outcome.run.group} "
                      f"seed={outcome.run.seed} ({outcome.seconds:.1f} s)", flush=True)  # fmt: skip
    ordered = [outcomes[i] for i in range(len(runs))]

    # REPORT: failures first, then one table per config group
    failures = [o for o in ordered if o.status != "ok"]
    for o in failures:
        print(f"\nFAILED ({o.status}, return code {o.returncode}): {shlex.join(o.run.command)}", file=sys.stderr)
        if o.stderr_tail:
            print(o.stderr_tail, file=sys.stderr)
    groups: dict[str, list[dict[str, float]]] = {}
    for o in ordered:
        groups.setdefault(o.run.group, [])
        if o.metrics is not None:
            groups[o.run.group].append(o.metrics)
    tables = {group: aggregate(flats) for group, flats in groups.items()}
    for group, table in tables.items():
        rows = selected_rows(table, args.metrics)
        print(f"\n{format_table(group, table, rows[: args.max_rows])}")
        if len(rows) > args.max_rows:
            print(f"({len(rows) - args.max_rows} more matching rows in the JSON; see --metrics and --max-rows)")

    quality = trading_quality(ordered)
    if quality is not None:
        print(f"\nTrading quality on the test split (DESIGN 14), per seed:\n{quality[0]}")

    result = {
        "trading_quality": None if quality is None else quality[1],
        "commands": [shlex.join(run.command) for run in runs],
        "runs": [
            {
                "command": shlex.join(o.run.command),
                "seed": o.run.seed,
                "config": o.run.config,
                "group": o.run.group,
                "output_dir": o.run.output_dir,
                "status": o.status,
                "returncode": o.returncode,
                "seconds": o.seconds,
                "stderr_tail": o.stderr_tail if o.status != "ok" else "",
            }
            for o in ordered
        ],
        "table": tables,
    }
    json_path = REPO / (args.json or Path(args.output_dir) / "results.json")
    atomic_write_json(json_path, finite_or_none(result), sort_keys=False)
    print(f"\n{len(ordered) - len(failures)}/{len(ordered)} runs ok; table written to {json_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    cli(lambda args: sys.exit(main(args)), Args, "run")  # (exit 1 when a run failed, 2 on bad flags)
