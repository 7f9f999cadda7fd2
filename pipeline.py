"""The whole system: train Phase 1, 2 and 3, resume a broken run, and evaluate on the test split.

    python pipeline.py --mode train                      # the three phases, then the test evaluation
    python pipeline.py --mode resume                     # continue after an interruption (even SIGKILL)
    python pipeline.py --mode eval --eval-episodes 200   # evaluate the trained hierarchy again
    python pipeline.py --mode train --smoke              # a one-minute try with tiny budgets

The pipeline calls each phase script's `main(args)`: one code path per phase, no second copy of any
training loop. Outputs under `--output-dir` (OUT): `OUT/phase1..3` (each phase's checkpoints and
metrics.json), the manifest `OUT/pipeline.json` (phases completed with their step counts and timings,
the config and its hash, the seed, package versions; written atomically after each phase) and
`OUT/eval/` (report.json, report.md, equity.png, allocation.png). Logs and TensorBoard events go to
`--log-dir`/phase1..3 (`tensorboard --logdir logs/` shows all three).

Runs never mix: `--mode train` refuses (exit 2, before writing anything) to start over a folder that holds a
run (`run_files`: OUT/pipeline.json, a `.pt` file in OUT/phase1..3, or a TensorBoard event file in
LOG/phase1..3); continue it with `--mode resume`, pick another `--output-dir` / `--log-dir`, or pass
`--overwrite` to delete that run first (`RUN_OUTPUTS` of OUT and LOG/phase1..3; other files are left alone).
One process in a run at a time: OUT, LOG and their phase folders are held while it runs (`checkpoint.holding_run`),
so a second one (a resume while it trains, another run sharing its log folder, a phase script into one of its
phases) stops at once.

The evaluation uses the **test** split, which no phase has seen: the whole test period as one
backtest (every instrument, the executed weights) next to every baseline and the targets, plus
`--eval-episodes` episodes for the mean and spread of each metric (synthetic data: a fresh market
path from another seed; CSV data: windows of the test period).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml

import phase1_ppo
import phase2_meta
import phase3_joint
from mtq_common.agents.hierarchy import HierarchyPolicy, instrument_specialist_index, load_specialists
from mtq_common.agents.nets import MetaController
from mtq_common.agents.update import CompileChoice
from mtq_common.data.market import iso_time
from mtq_common.data.splits import financed, fold_bounds, full_market, load_splits, spot_symbols, warmup_bars
from mtq_common.data.synthetic import config_options, generate_market
from mtq_common.data.tables import build_tables
from mtq_common.data.volatility import fit_vol_levels
from mtq_common.envs.trading_env import instrument_obs_size
from mtq_common.evaluation.backtest import run_episodes, stitch_backtests, summarize_episodes
from mtq_common.evaluation.live_book import format_book, read_holdings, stale_days, target_book
from mtq_common.evaluation.portfolio_eval import (
    _json_ready,
    evaluate_portfolio,
    report_from_backtests,
    validation_timings,
)
from mtq_common.evaluation.report import write_report
from mtq_common.evaluation.report_text import format_episodes, format_report
from mtq_common.evaluation.rules import fit_trend_for
from mtq_common.policy import check_data, check_execution_config, load_hierarchy, trained_data
from mtq_common.training import checkpoint as ckpt
from mtq_common.training.config import ConfigError
from mtq_common.training.distributed import resolve_device
from mtq_common.training.helper import Helper, spare_core
from mtq_common.training.plumbing import check_flags, configure_threads, setup_logging
from mtq_common.training.settings import config_defaults, config_from_args, config_from_dict, parse_args

ALIASES = {
    "phase1_timesteps": "training.phase_1_timesteps",
    "phase2_timesteps": "training.phase_2_timesteps",
    "phase3_timesteps": "training.phase_3_timesteps",
}
PHASES = ("phase1", "phase2", "phase3")
FRESH_PATH_SEED = 10_007
"""Offset of the market seed for the evaluation episodes' fresh synthetic path (never used in training)."""
RUN_OUTPUTS = ("pipeline.json", *PHASES, "eval", "act")
"""What a `--mode train` run writes in OUT (and `--overwrite` deletes first)."""
SMOKE = {"phase1_timesteps": 16_384, "phase2_timesteps": 16_384, "phase3_timesteps": 16_384, "num_envs": 16,
         "eval_episodes": 5}  # fmt: skip
"""`--smoke`: the budgets of a one-minute try (flags given with it win)."""


@dataclass
class Args:
    mode: Literal["train", "resume", "eval", "walkforward", "act"] = "train"
    """train: all phases then the evaluation; resume: continue a broken run; eval: evaluate again;
    walkforward: train and test --folds folds on expanding windows, one stitched out-of-sample report;
    act: the trained hierarchy's target book for the bar after the data's last one (mtq_common.evaluation.live_book)."""
    config: str | None = None
    """YAML config (defaults for every flag below that names a config key)."""
    output_dir: str = "models/checkpoints"
    """OUT: phase1..3, pipeline.json and eval/ go here."""
    log_dir: str = "logs"
    """LOG: phase1..3 logs and TensorBoard events go here."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    seed: int = 1
    """Seed of every phase (weights, action noise, environments)."""
    data_dir: str | None = None
    """Folder of <SYMBOL>.csv files; unset: the built-in synthetic market."""
    instruments: list[str] = field(default_factory=list)
    """Instruments traded (default: config data.instruments)."""
    phase1_timesteps: int = 500_000
    """Phase 1 environment steps per specialist (config: training.phase_1_timesteps)."""
    phase2_timesteps: int = 300_000
    """Phase 2 environment steps (config: training.phase_2_timesteps)."""
    phase3_timesteps: int = 1_000_000
    """Phase 3 environment steps (config: training.phase_3_timesteps)."""
    phase2_replace_confidence: float = 0.9
    """Phase 2's best.pt leaves the rule it starts from only with the paired validation interval at this confidence
    above 0 (0: any higher Sharpe; phase2_meta.py --replace-confidence)."""
    phase3_replace_confidence: float = 0.9
    """Phase 3's best.pt leaves Phase 2 only with the paired validation interval at this confidence above 0 (0: any
    higher Sharpe; phase3_joint.py --replace-confidence)."""
    phase1_patience: int = 0
    """Phase 1 stops once this many validations in a row have moved no specialist in its best.pt (0: never, its
    whole budget; phase1_ppo.py --patience)."""
    phase3_patience: int = 3
    """Phase 3 stops once this many validations in a row have not beaten its best.pt (0: never, its whole budget;
    phase3_joint.py --patience)."""
    phase3_cost_multiple: float = 1.0
    """Phase 3's reward charges each bar's costs this many times (1: as paid, 2: a shadow cost as much again;
    phase3_joint.py --cost-multiple)."""
    phase3_joint_sizing: bool = True
    """Phase 3 fits a factor per instrument on the specialists' positions on train before PPO, kept only with a
    confident validation gain (phase3_joint.py --joint-sizing)."""
    phase3_weight_average: float = 0.9
    """Phase 3 validates and keeps the moving average of its iterates, this decay per iteration (0: the iterate
    itself; phase3_joint.py --weight-average)."""
    num_envs: int = 64
    """Environment rows of every phase (config: training.n_envs)."""
    eval_episodes: int = 100
    """Test evaluation episodes (mean and spread of each metric)."""
    folds: int = 4
    """Walk-forward folds (--mode walkforward only; see mtq_common.data.splits)."""
    capital: float | None = None
    """--mode act: the account's capital, for notionals, units rounded to whole contracts (config
    instruments.SYMBOL.contract_size, default 1) and the rounding residual (unset: weights only)."""
    as_of: str | None = None
    """--mode act on CSV data: the date the data must be current at (YYYY-MM-DD; default today, UTC). Not a cut: the
    book is for the bar after the data's last row, and a date before that row is refused."""
    max_staleness_days: float | None = 7.0
    """--mode act: refuse CSV data whose last bar is older than this many days before --as-of (None: no check)."""
    force: bool = False
    """--mode resume: resume even if the config or seed differs from the run's (the manifest's); --mode eval and act:
    evaluate or trade even if the config's costs or limits (eval: or the seed) differ from the run's."""
    progress: bool = True
    """Show progress bars (only on a terminal)."""
    torch_threads: int = 1
    """torch intra-op threads on the CPU (0: torch's default); small-batch PPO is fastest with 1."""
    compile: CompileChoice = "auto"
    """Every phase's `--compile`: torch.compile its PPO update and rollout bars: auto (on for a phase of 4,000
    minibatches or more, where a C++ compiler is found), on, or off (eager: the same algorithm, no compiler needed;
    slower even on a machine's first run, whose compile is not cached yet: docs/benchmarks.md, *Throughput*)."""
    helper: bool = True
    """Where a core is spare, run work that needs only its inputs in a helper process beside the main one (Phase
    2's start fits while Phase 1 trains, Phase 3's checks on train, the test evaluation's episodes): the same results
    to the bit (mtq_common.training.helper)."""
    holdings: str | None = None
    """--mode act: a file of the units held per instrument (CSV `symbol,units` or JSON {"SYMBOL": units}; needs
    --capital): the trades start from this book instead of the model's own simulated holdings."""
    overwrite: bool = False
    """--mode train: delete the run already in --output-dir / --log-dir first (without it, such a run is refused)."""
    phase1_script: str | None = None
    """A copy of phase1_ppo.py to run as Phase 1 (it keeps the script's `Args` and `main`; unset: phase1_ppo.py)."""
    phase2_script: str | None = None
    """A copy of phase2_meta.py to run as Phase 2, e.g. with its own `meta_reward` (unset: phase2_meta.py)."""
    phase3_script: str | None = None
    """A copy of phase3_joint.py to run as Phase 3 (unset: phase3_joint.py)."""
    smoke: bool = False
    """A one-minute try: reads as `--phase1-timesteps 16384 --phase2-timesteps 16384 --phase3-timesteps 16384
    --num-envs 16 --eval-episodes 5` placed before your flags, so any of those you give wins (command line only;
    from Python pass `**pipeline.SMOKE`)."""


BUILT_IN = {"phase1": phase1_ppo, "phase2": phase2_meta, "phase3": phase3_joint}
_loaded: dict[Path, object] = {}


def phase_module(args: Args, name: str):
    """The script that runs phase `name`: the built-in one, or the copy `--phaseN-script` names (loaded once per
    process; it must keep the script's `Args` and `main(args)`, which the pipeline calls as it calls the
    built-in one)."""
    given = getattr(args, f"{name}_script")
    if given is None:
        return BUILT_IN[name]
    path, flag = Path(given).resolve(), f"--{name}-script {given}"
    if path not in _loaded:
        if not path.is_file():
            raise ConfigError(f"{flag}: no such file (accepted: a copy of {BUILT_IN[name].__name__}.py)")
        spec = importlib.util.spec_from_file_location(f"{name}_script_{len(_loaded)}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # (its dataclasses look their module up while it runs)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the copy's own error (a typo, a missing import): one paragraph that names it
            del sys.modules[spec.name]
            raise ConfigError(f"{flag}: loading it failed: {type(exc).__name__}: {exc} (`python {given} --help` "
                              "shows the traceback)") from None  # fmt: skip
        missing = [attr for attr in ("Args", "main") if not hasattr(module, attr)]
        if missing:
            raise ConfigError(
                f"{flag}: the file has no {' and no '.join(missing)}; a copy of "
                f"{BUILT_IN[name].__name__}.py keeps both (the pipeline calls main(Args(...)))"
            )
        _loaded[path] = module
    return _loaded[path]


def phase_scripts(args: Args) -> dict[str, str]:
    """What runs each phase, as the manifest records it: the built-in script's name or the copy's path."""
    scripts = {name: f"{module.__name__}.py" for name, module in BUILT_IN.items()}
    for name in scripts:
        if getattr(args, f"{name}_script") is not None:
            scripts[name] = str(Path(getattr(args, f"{name}_script")).resolve())
    return scripts


def phase_args(args: Args, name: str, resume: bool):
    """The phase script's own Args for this pipeline run (the same flags a user would type): the config file's
    values for every field it backs (`training.learning_rate`, `training.n_epochs`, ...; as the script alone would
    read them), then the pipeline's own."""
    out, logs = Path(args.output_dir), Path(args.log_dir)
    common = dict(config=args.config, output_dir=str(out / name), log_dir=str(logs / name), device=args.device,
                  seed=args.seed, data_dir=args.data_dir, instruments=list(args.instruments),
                  num_envs=args.num_envs, resume=resume, force=args.force, progress=args.progress,
                  torch_threads=args.torch_threads, compile=args.compile)  # fmt: skip
    if name == "phase3":
        common["helper"] = args.helper
    script = phase_module(args, name)
    if name == "phase1":
        own = dict(timesteps=args.phase1_timesteps, patience=args.phase1_patience)
    elif name == "phase2":
        own = dict(timesteps=args.phase2_timesteps, specialists_dir=str(out / "phase1"),
                   replace_confidence=args.phase2_replace_confidence)  # fmt: skip
    else:
        own = dict(timesteps=args.phase3_timesteps, phase1_dir=str(out / "phase1"), phase2_dir=str(out / "phase2"),
                   eval_episodes=args.eval_episodes, patience=args.phase3_patience,
                   replace_confidence=args.phase3_replace_confidence, cost_multiple=args.phase3_cost_multiple,
                   joint_sizing=args.phase3_joint_sizing, weight_average=args.phase3_weight_average)  # fmt: skip
    from_file = config_defaults(script.Args, getattr(script, "ALIASES", {}), args.config)
    return script.Args(**{**from_file, **common, **own})


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("torch", "numpy", "gymnasium", "tyro", "pandas", "tensorboard", "triton"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def check_phase_flags(args: Args, resume: bool) -> None:
    """Every phase's flags as this run passes them (`phase_args`), checked before the first phase trains (a bad
    --phase3-* value must not wait for Phases 1 and 2 to finish): the error names the phase."""
    for name in PHASES:
        script, script_args = phase_module(args, name), phase_args(args, name, resume)
        try:
            check_flags(script_args)
            getattr(script, "check_args", lambda _: None)(script_args)
        except ConfigError as err:
            raise ConfigError(f"{name}: {err} (pipeline.py passes its --{name}-* flags as the script's own)") from None


MODE_FLAGS = {"folds": "walkforward", "capital": "act", "as_of": "act", "max_staleness_days": "act",
              "holdings": "act", "overwrite": "train"}  # fmt: skip
"""The flags one mode alone reads."""


def check_mode_flags(args: Args) -> None:
    """Refuse a flag of `MODE_FLAGS` set (to other than its default) in another mode: it would be ignored, and a
    user who gave it may think it acted (`--folds 8` with --mode train, `--capital` with --mode eval)."""
    defaults = {f.name: f.default for f in dataclasses.fields(Args)}
    for name, mode in MODE_FLAGS.items():
        if args.mode != mode and getattr(args, name) != defaults[name]:
            raise ConfigError(f"--{name.replace('_', '-')} applies to --mode {mode} only (given --mode {args.mode})")


def check_seed(manifest: dict | None, args: Args, path: Path, verb: str) -> None:
    """Refuse to `verb` a run (its `manifest`, read from `path`) with another --seed than it was trained with,
    unless --force."""
    if manifest is not None and manifest.get("seed", args.seed) != args.seed and not args.force:
        raise ConfigError(f"{path} was trained with --seed {manifest['seed']}, not {args.seed}: {verb} with the run's "
                          "seed (or --force)")  # fmt: skip


def train(args: Args, cfg, log, resume: bool) -> dict:
    """Run (or continue) the three phases; the manifest is rewritten atomically after each one."""
    check_phase_flags(args, resume)
    out = Path(args.output_dir)
    path = out / "pipeline.json"
    manifest = ckpt.read_manifest(path) if resume else None
    if resume and manifest is None:
        raise ckpt.CheckpointError(f"nothing to resume: {path} does not exist. Run `python pipeline.py --mode train`.")
    if manifest is not None:
        ckpt.check_config_hash(manifest, cfg.hash(), path, args.force, cfg.to_dict())  # names what differs
        ran = manifest.get("scripts", {})
        changed = [f"{n}: {ran[n]} -> {s}" for n, s in phase_scripts(args).items() if n in ran and ran[n] != s]
        if changed and not args.force:
            raise ConfigError(f"{path} was trained with other phase scripts ({'; '.join(changed)}): resume with the "
                              "same --phase1/2/3-script flags (or --force)")  # fmt: skip
        check_seed(manifest, args, path, "resume")  # (each phase draws from it)
    if manifest is None:
        load_splits(cfg)  # unreadable data is refused before the manifest (or anything else) is written
        if args.overwrite:
            remove_run(args, log)
        manifest = {"config": cfg.to_dict(), "config_hash": cfg.hash(), "seed": args.seed, "phases": {},
                    "scripts": phase_scripts(args)}  # fmt: skip
    manifest["versions"] = versions()
    ckpt.atomic_write_json(path, manifest)
    done = {name for name in PHASES if manifest["phases"].get(name, {}).get("completed")}
    fresh_phase2 = not (resume and (out / "phase2" / "latest.pt").is_file())
    built_in = args.phase1_script is None and args.phase2_script is None
    # Phase 2's start fits beside Phase 1 (`phase2_fits_ahead`), on the core its one torch thread leaves
    fit_ahead = "phase1" not in done and "phase2" not in done and fresh_phase2 and built_in and args.helper
    with Helper(fit_ahead and spare_core(resolve_device(args.device), 1)) as helper:
        if helper.beside:
            fits = helper.submit(phase2_fits_ahead, phase_args(args, "phase1", False),
                                 phase_args(args, "phase2", False), cfg.to_dict(), args.device)  # fmt: skip
        for name in PHASES:
            if name in done:
                log.info("%s already completed (%d steps): skipped", name, manifest["phases"][name]["global_step"])
                continue
            # inside a phase: continue from its latest checkpoint when an earlier attempt left one
            continue_phase = resume and (out / name / "latest.pt").is_file()
            log.info("%s: %s", name, "resuming from latest.pt" if continue_phase else "starting")
            start = time.time()
            extra = {}
            if name == "phase2" and helper.beside:
                extra["ahead"] = fits.result()
                helper.close()  # (Phase 3 starts a helper of its own)
            result = phase_module(args, name).main(phase_args(args, name, continue_phase), **extra)
            manifest["phases"][name] = {
                "completed": True,
                "global_step": result["global_step"],
                "seconds": time.time() - start,
                "validation_sharpe": validation_sharpe(result),
            }
            ckpt.atomic_write_json(path, manifest)
    return manifest


def phase2_fits_ahead(phase1_args, phase2_args, config: dict, device: str) -> dict:
    """Phase 2's `start_fits` over the specialists as Phase 1 builds them (`phase1_ppo.build_agents`), and their
    `spec`. Run in a helper while Phase 1 trains (plain-data arguments). Phase 2 uses the fits only if the
    specialists Phase 1 leaves trade exactly as these (`SpecialistAgents.trades_start_rule`: every start kept),
    and fits afresh otherwise."""
    cfg = config_from_dict(config, require_data_dir=False)
    where = resolve_device(device)
    splits = load_splits(cfg)
    train = splits["train"]
    names = phase1_args.specialists or cfg.active_specialists()
    size = instrument_obs_size(train.num_instruments, phase1_args.next_return_diagnostic)
    with torch.random.fork_rng(devices=[]):  # (their hidden layers' weights, which the start's positions ignore)
        agents = phase1_ppo.build_agents(phase1_args, cfg, train, names, size).to(where).requires_grad_(False)
    fits = phase2_meta.start_fits(phase2_args, cfg, agents, splits, build_tables(splits["val"], cfg, where),
                                  fit_trend_for(train, cfg), fit_vol_levels(train), where)  # fmt: skip
    return {"spec": agents.describe(), "fits": fits}


def validation_sharpe(result: dict) -> float:
    if "portfolio" in result:
        return result["portfolio"]["sharpe"]
    rows = [r for t in result["specialists"].values() for k, r in t.items() if k != "mean_sharpe"]
    return sum(r["sharpe"] for r in rows) / len(rows)


def run_files(args: Args) -> list[Path]:
    """The files that show a run in --output-dir or --log-dir (a new `--mode train` there is refused):
    OUT/pipeline.json, the `.pt` files of OUT/phase1..3 and the TensorBoard event files of LOG/phase1..3."""
    out, logs = Path(args.output_dir), Path(args.log_dir)
    found = [out / "pipeline.json"] if (out / "pipeline.json").is_file() else []
    for name in PHASES:
        found += sorted((out / name).glob("*.pt")) + sorted((logs / name).glob("events.out.tfevents.*"))
    return found


def refuse_mixing(args: Args) -> None:
    """`--mode train` over an earlier run: exit 2 before anything is written, naming the folders and the
    choices (without --overwrite)."""
    found = run_files(args)
    if not found or args.overwrite:
        return
    shown = ", ".join(str(p) for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    raise ConfigError(
        f"{args.output_dir} (or the log folder {args.log_dir}) already holds a run ({shown}): training into it "
        "would mix two runs' checkpoints, reports and TensorBoard events. Continue it with `--mode resume`, "
        "train into another --output-dir (and --log-dir), or pass --overwrite to delete that run first."
    )


def remove_run(args: Args, log) -> None:
    """`--overwrite`: delete the earlier run's outputs (`RUN_OUTPUTS` in OUT, phase1..3 in LOG)."""
    out, logs = Path(args.output_dir), Path(args.log_dir)
    for path in [out / name for name in RUN_OUTPUTS] + [logs / name for name in PHASES]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        log.warning("--overwrite: deleted %s", path)


def test_backtests(args: Args, cfg, device):
    """The trained hierarchy and every baseline on the test split: one continuous backtest of the whole
    split (DESIGN section 9). Returns `(report, backtests, test market)`."""
    out = Path(args.output_dir)
    specialists, meta = load_hierarchy(out, device)
    path = out / "pipeline.json"  # (the episodes draw from the seed: another gives another report than the run's)
    check_seed(ckpt.read_manifest(path), args, path, "evaluate")
    splits = load_splits(cfg)
    test = splits["test"]
    trained = trained_data(out)
    check_data(test, trained, out)  # the run's instruments, sectors and bar frequency
    check_execution_config(cfg, out, trained, args.force)  # and its costs and limits, or the report is another's
    if list(specialists.names) != [s for s in specialists.names if s in test.sectors]:
        raise ckpt.CheckpointError(f"{out / 'phase3' / 'best.pt'} holds specialists for other instruments")
    tables = build_tables(test, cfg, device)
    trend, levels = fit_trend_for(splits["train"], cfg), fit_vol_levels(splits["train"])  # rules fit on train
    timings = validation_timings(specialists, splits["val"], cfg, trend, levels, device)  # risk timing: on val
    phase1 = load_specialists(out / "phase1", test, device)[0]  # the Phase 2 system: what Phase 3 started from
    phase2 = (phase1, MetaController.from_checkpoint(out / "phase2", phase1, device))
    report, backtests = evaluate_portfolio(specialists, meta, test, cfg, trend, device, segments=1, tables=tables,
                                           phase="final", confidence=True, vol_levels=levels, timings=timings,
                                           phase2=phase2)  # fmt: skip
    phase3_metrics = out / "phase3" / "metrics.json"
    if phase3_metrics.is_file():  # which Phase 3 iteration best.pt holds (0: the Phase 2 system itself)
        phase3 = json.loads(phase3_metrics.read_text())
        report["phase3_best_iteration"] = phase3["best_iteration"]
        report["phase3_early_stop_iteration"] = phase3.get("early_stop_iteration")  # (None: ran every iteration)
        sizing = phase3.get("joint_sizing")  # (None: not fit; else whether it replaced the Phase 2 start)
        report["phase3_joint_sizing"] = None if sizing is None else sizing["kept"]
    return report, backtests, test


def evaluate(args: Args, cfg, log) -> dict:
    """The test-split evaluation: one full backtest, the episodes, the report files."""
    out = Path(args.output_dir)
    device = resolve_device(args.device)
    start = time.time()
    with Helper(args.helper and spare_core(device, 1)) as helper:  # the episodes beside the test backtest
        episodes = helper.submit(evaluation_episodes, str(out), cfg.to_dict(), args.eval_episodes, args.seed,
                                 str(device))  # fmt: skip
        report, backtests, test = test_backtests(args, cfg, device)
        episodes, where = episodes.result()
    summary = summarize_episodes(episodes)
    report["episodes_source"] = where
    paths = write_report(report, backtests, out / "eval", title="MTQuant test evaluation", episodes=summary)
    seconds = time.time() - start
    text = format_report(report)
    print(f"Test evaluation ({test.split} split, {report['data']['bars']} bars, never seen in training):\n{text}")
    n = len(episodes)
    what = f"{n} evaluation episodes on {where} (mean +- std)" if n > 1 else f"1 evaluation episode on {where}"
    print(f"{what}:\n{format_episodes(summary, n)}")
    print("report: " + ", ".join(str(p) for p in paths.values()))
    log.info("evaluation written to %s in %.1f s", out / "eval", seconds)
    return {"report": report, "episodes": summary, "seconds": seconds}


def evaluation_episodes(run_dir: str, config: dict, episodes: int, seed: int, device: str) -> tuple[list, str]:
    """The trained hierarchy of `run_dir` in `episodes` evaluation episodes and where they ran: on the built-in
    market, consecutive windows of a fresh path (a seed no split uses); on CSV data, random windows of the test
    split. (Arguments are plain data: `evaluate` may run it in a helper process.)"""
    cfg = config_from_dict(config, require_data_dir=False)
    specialists, meta = load_hierarchy(run_dir, device)
    test = load_splits(cfg)["test"]
    owner = instrument_specialist_index(test.sectors, specialists.names).to(device)
    tables = build_tables(test, cfg, device)

    def hierarchy(market):
        return lambda rows: HierarchyPolicy(specialists, meta, owner, cfg.environment.max_position_size, rows, device,
                                            market)  # fmt: skip

    if test.source != "synthetic":
        ran = run_episodes(test, cfg, hierarchy(test), episodes, seed=seed, device=device, tables=tables)
        if len(ran) < episodes:  # the split is no longer than an episode: every window would be the whole of it
            bars, length = tables.num_bars - 1 - tables.first_bar, cfg.environment.episode_length
            return ran, (f"one window, the whole test split ({bars} bars, an episode is {length}): no spread "
                         "(a shorter environment.episode_length gives windows)")  # fmt: skip
        return ran, "random windows of the test split"
    # fresh market paths: a seed no split uses, long enough for every episode without overlap
    length, path_seed = cfg.environment.episode_length, cfg.data.synthetic.seed + FRESH_PATH_SEED
    vols, bars = [cfg.instruments[s].annual_vol for s in test.symbols], tables.first_bar + 2 + episodes * length
    fresh = financed(generate_market(test.symbols, test.sectors, vols, bars, seed=path_seed, split="test",
                                     **config_options(cfg, test.symbols)), cfg)  # fmt: skip
    ran = run_episodes(fresh, cfg, hierarchy(fresh), episodes, length, seed=seed, device=device, consecutive=True)
    return ran, f"a fresh synthetic path (seed {path_seed}), consecutive windows"


def walk_forward(args: Args, cfg, log) -> dict:
    """--mode walkforward: each fold trains all three phases on its expanding window (resuming a fold that an
    earlier invocation started), is tested on its own test block, and the K test blocks are stitched into
    one out-of-sample report in OUT/walkforward, with one row per fold. Each fold's config (`data.folds`,
    `data.fold` set) is written to OUT/fold_k/config.yaml, so its phases can be rerun by hand."""
    if args.folds < 2:
        raise ConfigError(f"--folds {args.folds}: a walk-forward needs at least 2 folds (one is a plain split)")
    fold_bounds(full_market(cfg).num_bars, args.folds, cfg.data.splits[0], warmup_bars(cfg))  # refuse early
    out, logs, device = Path(args.output_dir), Path(args.log_dir), resolve_device(args.device)
    parts: dict[str, list] = {}
    rows = []
    for k in range(args.folds):
        fold_dir = out / f"fold_{k}"
        fold_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, folds=args.folds, fold=k))
        config_path, manifest_path = fold_dir / "config.yaml", fold_dir / "pipeline.json"
        resume = manifest_path.is_file()
        if resume:  # a fold trained with another config is refused before its config file is replaced
            manifest = ckpt.read_manifest(manifest_path)
            ckpt.check_config_hash(manifest, fold_cfg.hash(), manifest_path, args.force, fold_cfg.to_dict())
        ckpt.atomic_write_bytes(config_path, yaml.safe_dump(fold_cfg.to_dict(), sort_keys=False).encode())
        fold_args = dataclasses.replace(args, config=str(config_path), output_dir=str(fold_dir),
                                        log_dir=str(logs / f"fold_{k}"))  # fmt: skip
        fold_cfg = config_from_args(fold_args, ALIASES)
        log.info("walk-forward fold %d/%d: %s", k + 1, args.folds, "resuming" if resume else "training")
        # (main holds OUT and LOG; a fold's phase folders are held as main holds a run's)
        with ckpt.holding_run(fold_args.output_dir, fold_args.log_dir, "pipeline.py --mode walkforward", PHASES):
            train(fold_args, fold_cfg, log, resume=resume)
        report, backtests, test = test_backtests(fold_args, fold_cfg, device)
        train_split = load_splits(fold_cfg)["train"]
        sharpe = {"system": report["portfolio"]["sharpe"], "equal_allocation": report["equal_allocation"]["sharpe"]}
        sharpe.update({name: m["sharpe"] for name, m in report["baselines"].items()})
        rows.append({
            "fold": k,
            "train": [iso_time(train_split.timestamps[t], test.bars_per_day) for t in (0, -1)],
            "test": [report["data"]["start"], report["data"]["end"]],
            "bars": report["data"]["bars"],
            "sharpe": sharpe,
            "trend_filter": report["trend_filter"],
            "vol_managed": report["vol_managed"],
        })  # fmt: skip
        for name, bt in backtests.items():
            parts.setdefault(name, []).append(bt)
    stitched = {name: stitch_backtests(bts) for name, bts in parts.items()}
    layout = (f"the {args.folds} folds' test blocks, each one continuous backtest from flat, stitched in time order "
              "(each fold trained on all bars before its validation block)")  # fmt: skip
    data = {"source": test.source, "split": f"walk-forward ({args.folds} folds)", "end": rows[-1]["test"][1],
            "layout": layout, "spot_instruments": spot_symbols(cfg, list(test.symbols))}  # fmt: skip
    names = [n for n in load_hierarchy(out / "fold_0", device)[0].names]
    report = _json_ready(report_from_backtests(stitched, names, cfg.reward.risk_free_rate, "final", data, True))
    report["folds"] = rows
    paths = write_report(report, stitched, out / "walkforward", title="MTQuant walk-forward evaluation")
    print(f"Walk-forward evaluation ({args.folds} folds, {report['data']['bars']} out-of-sample bars):")
    print(format_report(report))
    print(format_folds(rows))
    print("report: " + ", ".join(str(p) for p in paths.values()))
    return {"report": report}


def format_folds(rows: list[dict]) -> str:
    """One line per walk-forward fold: its windows and each policy's Sharpe ratio on its test block."""
    names = list(rows[0]["sharpe"])
    lines = [f"{'fold':<5}{'trained on':<25}{'tested on':<25}" + "".join(f"{n[:14]:>15}" for n in names)]
    for r in rows:
        lines.append(f"{r['fold']:<5}{' .. '.join(r['train']):<25}{' .. '.join(r['test']):<25}"
                     + "".join(f"{r['sharpe'][n]:>+15.2f}" for n in names))  # fmt: skip
    return "\n".join(lines)


def act(args: Args, cfg, log) -> dict:
    """--mode act: refuse data that does not match the trained run (or is stale, or too short), then write
    and print the target book of the bar after the data's last one (`mtq_common.evaluation.live_book`); with
    --capital, in units rounded to whole contracts, traded from the held book (--holdings, or the model's own
    simulated one)."""
    out, device = Path(args.output_dir), resolve_device(args.device)
    if args.capital is not None and not (math.isfinite(args.capital) and args.capital > 0):
        raise ConfigError(f"--capital {args.capital}: accepted a positive amount")
    staleness = args.max_staleness_days
    if staleness is not None and not (math.isfinite(staleness) and staleness >= 0):
        raise ConfigError(f"--max-staleness-days {staleness}: accepted a number of days >= 0, or None (no check)")
    if args.holdings is not None and args.capital is None:
        raise ConfigError(f"--holdings {args.holdings}: units held need --capital (the account's value) to become "
                          "weights; pass both")  # fmt: skip
    holdings = None if args.holdings is None else read_holdings(args.holdings)
    specialists, meta = load_hierarchy(out, device)
    trained = trained_data(out)
    if cfg.data.source == "csv":
        market = full_market(cfg, strict_order=True)  # every row to the last, refused where out of order
    else:
        market = load_splits(cfg)["test"]  # the built-in market: act at the test split's last bar
    check_data(market, trained, out)
    check_execution_config(cfg, out, trained, args.force)  # the run's costs and limits, or the book is another
    if market.source != "csv" and args.as_of is not None:  # (it was ignored: the built-in market has no "today")
        raise ConfigError(f"--as-of {args.as_of}: applies to CSV data (--data-dir); the built-in market's book is "
                          "for the bar after its test split's last bar, whatever the date")  # fmt: skip
    if market.source == "csv" and (args.as_of is not None or args.max_staleness_days is not None):
        try:
            as_of = np.datetime64(args.as_of or datetime.datetime.now(datetime.timezone.utc).date().isoformat(), "s")
        except ValueError:
            raise ConfigError(f"--as-of {args.as_of!r}: accepted a date, YYYY-MM-DD") from None
        last = iso_time(market.timestamps[-1], market.bars_per_day)
        if args.as_of is not None and np.datetime64(as_of, "D") < np.datetime64(market.timestamps[-1], "D"):
            raise ConfigError(  # (a book for the last bar, after the date asked for, would be taken for that date's)
                f"--as-of {args.as_of}: before the data's last bar, {last}. --as-of is the date the data must be "
                f"current at, not a cut: the book is always for the bar after the last row of {cfg.data.data_dir}. "
                "To act as of an earlier bar, drop the later rows from the files."
            )
        age = stale_days(market, as_of)
        if args.max_staleness_days is not None and age > args.max_staleness_days:
            raise ConfigError(
                f"the data is stale: its last bar is {last}, "
                f"{age:.1f} days before {str(as_of)[:10]} (--as-of), more than --max-staleness-days "
                f"{args.max_staleness_days:g}. Update the files in {cfg.data.data_dir}, or pass --as-of DATE or "
                "--max-staleness-days None to act on them anyway."
            )
    book = target_book(specialists, meta, market, cfg, args.capital, device, holdings=holdings,
                       holdings_source=f"--holdings {args.holdings}")  # fmt: skip
    path = out / "act" / f"book-{book['last_bar'].replace(':', '')}.json"
    ckpt.atomic_write_json(path, book, sort_keys=False)
    print(f"Target book for the bar after {book['last_bar']} ({market.num_bars} bars of {market.source} data):")
    print(format_book(book))
    print(f"written to {path}")
    log.info("target book written to %s", path)
    return {"book": book, "path": str(path)}


def main(args: Args) -> dict:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "pipeline.py runs in one process; to train on several processes or GPUs, run the phase scripts "
            "under torchrun (torchrun --nproc_per_node N phase1_ppo.py ...), then `pipeline.py --mode eval`"
        )
    check_flags(args)  # (the seed, the rows, the episodes: before any file)
    cfg = config_from_args(args, ALIASES)
    configure_threads(args.torch_threads)
    resolve_device(args.device)  # a clear error before any work
    check_mode_flags(args)
    # one process in a run at a time: its folders and each phase's (a phase script by hand into phase1 while
    # Phase 2 trains would write over the checkpoints Phase 3 loads)
    with ckpt.holding_run(args.output_dir, args.log_dir, f"pipeline.py --mode {args.mode}", PHASES):
        return run_mode(args, cfg)


def run_mode(args: Args, cfg) -> dict:
    """`main` after its checks, with the run folder held: the mode's work."""
    if args.mode == "train":
        refuse_mixing(args)  # before the log file: a log folder inside OUT must stay untouched too
    log = setup_logging(Path(args.log_dir) / "pipeline.log", "pipeline")
    out = Path(args.output_dir)
    start = time.time()
    if args.mode == "act":
        return act(args, cfg, log)
    if args.mode == "walkforward":
        result = walk_forward(args, cfg, log)
        print(f"pipeline walkforward: {time.time() - start:.1f} s")
        return result
    manifest = None
    if args.mode in ("train", "resume"):
        manifest = train(args, cfg, log, resume=args.mode == "resume")
    evaluation = evaluate(args, cfg, log)
    manifest = manifest or ckpt.read_manifest(out / "pipeline.json") or {}
    manifest["eval"] = {"seconds": evaluation["seconds"], "episodes": args.eval_episodes, "path": str(out / "eval")}
    manifest["wall_seconds_last_invocation"] = time.time() - start
    ckpt.atomic_write_json(out / "pipeline.json", manifest)
    print(f"pipeline {args.mode}: {time.time() - start:.1f} s")
    return {"manifest": manifest, **evaluation}


def smoke_argv(argv: list[str]) -> list[str]:
    """The command line with `--smoke` read as the `SMOKE` budgets' flags placed first (a later flag wins)."""
    if "--smoke" not in argv:
        return argv
    return [item for key, value in SMOKE.items() for item in (f"--{key.replace('_', '-')}", str(value))] + argv


if __name__ == "__main__":
    cli_args = None
    try:
        cli_args, _ = parse_args(Args, ALIASES, smoke_argv(sys.argv[1:]))
        main(cli_args)
    except (ConfigError, ckpt.CheckpointError, ValueError) as err:
        print(f"pipeline.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (checkpoints and reports are written whole)
        training = cli_args is not None and cli_args.mode in ("train", "resume")
        hint = ": `--mode resume` with the same flags continues from the phases' last checkpoints" if training else ""
        print(f"pipeline.py: interrupted{hint}", file=sys.stderr)
        sys.exit(130)
