"""The run plumbing the three phase scripts share, kept out of the algorithm's way: the first lines of a
run (`start_run`: config, ranks, log file, torch's threads, the `--amp` check), the iteration count, seeding,
the command line (`cli`: exit code 2 with one paragraph on bad input), the rotating `latest.pt` (this module
is its one owner: `Run.save_latest` writes it, `resume` reads it back, step files pruned by the run's own
steps) and, in `Run`, the TensorBoard writer and its hyperparameter table, the progress bar, where the loop's
time goes (`Stopwatch`), `--stop-after` and the run's timing. CleanRL writes these inline in its one script;
here three scripts would repeat them word for word, so each is one named call in `main()`. The compiled
update (`--compile`) is `agents/update.py`, gradient clipping `agents/coordination.py`."""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from mtq_common.training import checkpoint as ckpt
from mtq_common.training import distributed
from mtq_common.training.config import ConfigError
from mtq_common.training.settings import config_from_args, finite_at_least, parse_args


def setup_logging(path: str | Path, name: str, to_file: bool = True) -> logging.Logger:
    """A logger writing to `path` (appending: a resumed run continues its log) and to stderr.

    `to_file=False` (ranks other than 0 under torchrun) keeps only the stderr warnings.
    """
    path = Path(path)
    logger = logging.getLogger(f"mtq.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):  # a second main() in one process (tests, pipeline) re-targets
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    stream.setLevel(logging.WARNING)
    logger.addHandler(stream)
    if not to_file:
        return logger
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(fmt)
    logger.addHandler(file_handler)
    # Warnings of the data loaders (logger "mtq") land in the same file.
    data_logger = logging.getLogger("mtq")
    data_logger.setLevel(logging.INFO)
    for handler in list(data_logger.handlers):
        if isinstance(handler, logging.FileHandler):
            data_logger.removeHandler(handler)
            handler.close()
    data_logger.addHandler(logging.FileHandler(path))
    return logger


@torch.no_grad()
def configure_threads(threads: int) -> None:
    """Set torch's intra-op threads (0 keeps torch's default).

    PPO on the CPU runs many small tensor ops: one thread avoids the synchronisation overhead and,
    above all, the collapse when another process holds a core (measured here: a Phase 1 run of 16k
    steps took 5.4 s with 1 thread and 398 s with 2 threads on a busy 2-core machine).
    """
    if threads > 0:
        torch.set_num_threads(threads)


def check_amp(amp: bool, device: torch.device) -> None:
    """`--amp` is bf16 autocast on CUDA; elsewhere it is refused rather than silently ignored."""
    if amp and device.type != "cuda":
        raise ValueError(f"--amp: bf16 autocast of the update is for CUDA devices; this run is on {device}")


def autocast(amp: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """The update's loss computation under bf16 autocast when `--amp` is on (a no-op otherwise)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


# --- latest.pt: this module is its one owner (written by `Run.save_latest`, read by `resume`) -----------


def step_path(output_dir: str | Path, step: int) -> Path:
    """The rotating checkpoint of global step `step`."""
    return Path(output_dir) / f"step_{step:010d}.pt"


def save_rotating(output_dir: str | Path, payload: dict, step: int, keep: int, own_steps: list[int]) -> list[int]:
    """Write `step_<N>.pt` and `latest.pt`, then delete this run's step files beyond its newest `keep`.

    Pruning is by the run's own steps: `own_steps` are the steps of the step files this run wrote and still
    keeps (the list the previous call returned; on `--resume`, the `step_files` of the resumed `latest.pt`).
    A step file the run did not write (another run's, left in the folder, whatever its step) is never
    counted and never deleted. Returns the steps kept, which both files also record as `step_files`."""
    steps = sorted({*own_steps, step})
    cut = max(0, len(steps) - keep)
    kept, dropped = steps[cut:], steps[:cut]
    payload = {**payload, "step_files": kept}
    ckpt.save_checkpoint(step_path(output_dir, step), payload)
    ckpt.save_checkpoint(Path(output_dir) / "latest.pt", payload)
    for old in dropped:
        step_path(output_dir, old).unlink(missing_ok=True)
    return kept


RESUME_HINT = ("To start this phase afresh, move the file away and run without --resume (`pipeline.py --mode resume` "
               "then restarts the phase).")  # fmt: skip

RUN_FLAGS = frozenset({"config", "output_dir", "log_dir", "device", "resume", "force", "stop_after", "progress",
                       "torch_threads", "compile", "amp", "helper", "keep_checkpoints", "batch_size", "eval_episodes",
                       "data_dir", "specialists_dir", "phase1_dir", "phase2_dir"})  # fmt: skip
"""A phase script's flags that say how or where a run goes, not what it trains: a resume may change them. (The
config file's and the data's contents are checked by the config hash, the input folders' by their weights'
fingerprints; `--batch-size` is the old name of `--minibatch-size`; `--eval-episodes` only adds a final report.)"""


def trained_flags(args) -> dict:
    """The flags of `args` that change what a run trains (all but `RUN_FLAGS`), as `latest.pt` records them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(args).items() if k not in RUN_FLAGS}


def check_flags_unchanged(state: dict, flags: dict, path, force: bool) -> None:
    """Refuse to resume `state` (a `latest.pt`) with flags that change what is trained, naming each (`--force`
    resumes anyway). Checkpoints from before the flags were recorded are not checked."""
    ran = state.get("flags")
    if ran is None or force:
        return
    changed = [f"--{k.replace('_', '-')} {ran.get(k)!r} in the run, {v!r} now" for k, v in flags.items()
               if k in ran and ran[k] != v]  # fmt: skip
    if changed:
        fix = "resuming would mix two experiments. Use the run's flags, or pass --force to resume anyway."
        raise ckpt.CheckpointError(f"{path} was trained with other flags: {'; '.join(changed)}: {fix}")


def load_latest(path, phase: str, config_hash: str, force: bool, world: distributed.World,
                config: dict | None = None, flags: dict | None = None) -> tuple[dict, dict]:  # fmt: skip
    """`--resume`: rank 0 reads the `phase` checkpoint at `path` and checks its config hash (naming the keys
    that differ from `config`, the current config's dict) and its `trained_flags` against `flags`; every rank
    gets `(state, this rank's part of it)` (see `local_state`). Errors are raised on every rank."""

    def load() -> dict:
        state = ckpt.load_checkpoint(path, phase, hint=RESUME_HINT)
        ckpt.check_config_hash(state, config_hash, path, force, config)
        if flags is not None:
            check_flags_unchanged(state, flags, path, force)
        return state

    state = distributed.load_on_main(load, world)
    return state, distributed.local_state(state, world, path)


def save_latest(out_dir, payload: dict, local: dict, world: distributed.World, step: int, keep: int,
                own_steps: list[int]) -> list[int]:  # fmt: skip
    """The rotating `latest.pt` / `step_<N>.pt`, written by rank 0: `payload` (what every rank holds
    alike: weights, optimizer, counters) plus every rank's `local` state (environments, RNG, signals),
    gathered by `rank_states`. Step files are pruned by the run's own steps (`own_steps`, see
    `save_rotating`); returns the steps kept (other ranks: `own_steps`, they write nothing).
    Collective: every rank must call it."""
    states = distributed.rank_states(local, world)
    if world.is_main:
        return save_rotating(out_dir, {**payload, **states}, step, keep, own_steps)
    return own_steps


# --- a phase script's run -------------------------------------------------------------------------------


SHARED_FLAGS = {
    "seed": (lambda x: 0 <= x < 2**32, "a whole number 0 <= seed < 2**32"),
    "num_steps": (lambda x: x >= 1, "a whole number >= 1 (bars per rollout)"),
    "hidden_size": (lambda x: x >= 1, "a whole number >= 1"),
    "eval_interval": (lambda x: x >= 1, "a whole number >= 1 (iterations between validations)"),
    "eval_segments": (lambda x: x >= 1, "a whole number >= 1"),
    "eval_episodes": (lambda x: x >= 1, "a whole number >= 1"),
    "ent_coef": (lambda x: finite_at_least(x, 0), "a finite number >= 0"),
    "vf_coef": (lambda x: finite_at_least(x, 0), "a finite number >= 0"),
    "max_grad_norm": (lambda x: finite_at_least(x, 0, above=True), "a finite number > 0"),
    "target_kl": (lambda x: x is None or finite_at_least(x, 0, above=True), "None (off) or a finite number > 0"),
    "keep_checkpoints": (lambda x: x >= 0, "a whole number >= 0 (step files kept; 0: latest.pt alone)"),
    "stop_after": (lambda x: x is None or x >= 1, "None (run to the end) or a whole number >= 1 (iterations)"),
    "torch_threads": (lambda x: x >= 0, "a whole number >= 0 (0: torch's default)"),
}
"""The flags the scripts share (a script checks those it has), each with what is accepted. Flags that back a config
key (`--num-envs`: `training.n_envs`, ...) are checked with the config (`settings.validate`)."""


def check_flags(args) -> None:
    """Refuse a bad value of any of `SHARED_FLAGS` that `args` has, naming the flag and what is accepted (before
    any work or file: a NaN coefficient would otherwise read as a diverged run, an interval of 0 fail mid-run), and
    an output or log folder that cannot be written (`check_writable`)."""
    for name, (ok, accepted) in SHARED_FLAGS.items():
        if hasattr(args, name) and not ok(getattr(args, name)):
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)!r}: accepted {accepted}")
    if distributed.launch_rank() == 0:  # (rank 0 writes every file; other ranks' probes would race its own)
        for name in ("output_dir", "log_dir"):
            if getattr(args, name, None) is not None:
                check_writable(Path(getattr(args, name)), f"--{name.replace('_', '-')}")


def check_writable(folder: Path, flag: str) -> None:
    """Refuse a folder that cannot be made or written, before any work: a run would otherwise train, then fail at
    its first checkpoint. The probe is a temporary file in the folder or its nearest existing parent, gone at once;
    it makes no folder (runs started side by side share parents that one would remove under the other)."""
    fix = "pass a folder you can write"
    existing = next(path for path in [folder, *folder.parents] if path.exists())
    if not existing.is_dir():
        raise ConfigError(f"{flag} {folder}: {existing} is a file, not a folder; {fix}")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise ConfigError(f"{flag} {folder}: cannot write in {existing} ({err.strerror}); {fix}") from None


def start_run(args, aliases: dict, name: str):
    """A phase script's first lines: its flags' checks (`check_flags`), its config (YAML file, then flags; see
    `config_from_args`), the torch.distributed world and device, the log file (rank 0), torch's threads and the
    `--amp` check. Returns `(cfg, world, device, log)`."""
    check_flags(args)
    cfg = config_from_args(args, aliases)
    world, device = distributed.setup(args.device)
    log = setup_logging(Path(args.log_dir) / "training.log", name, to_file=world.is_main)
    configure_threads(args.torch_threads)
    check_amp(args.amp, device)
    return cfg, world, device, log


def iterations(args, rows_per_iteration: int, world: distributed.World) -> int:
    """PPO iterations for `--timesteps` at `rows_per_iteration` environment steps per iteration on each
    rank; a minibatch larger than the rollout is refused."""
    if args.minibatch_size > rows_per_iteration:
        raise ConfigError(f"--minibatch-size {args.minibatch_size} exceeds the rollout ({args.num_envs} x "
                          f"{args.num_steps})")  # fmt: skip
    return distributed.iterations(args.timesteps, rows_per_iteration, world)


def seed_everything(seed: int) -> int:
    """Python's, NumPy's legacy global and torch's generators from `seed` (returned)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the legacy global state is what third-party code draws from)
    torch.manual_seed(seed)
    return seed


def resume(args, phase: str, cfg, world: distributed.World) -> tuple[dict, dict]:
    """`--resume`: `latest.pt` in `--output-dir`, checked against the run's config and flags (`--force` accepts
    others; the error names every key and flag that differs); returns `(state, this rank's part of it)` (see
    `load_latest`)."""
    out = Path(args.output_dir)
    state, mine = load_latest(out / "latest.pt", phase, cfg.hash(), args.force, world, cfg.to_dict(),
                              trained_flags(args))  # fmt: skip
    if "step_files" not in state:  # written before checkpoints named their step files: those on disk up to its step
        steps = [int(p.stem.removeprefix("step_")) for p in out.glob("step_*.pt") if p.stem[5:].isdigit()]
        state["step_files"] = sorted(s for s in steps if s <= state["global_step"])
    return state, mine


def restore(state: dict, mine: dict, log, shared: dict, own: dict) -> tuple[int, int, dict]:
    """Load a resumed checkpoint into the run: each of `shared` (models, optimiser, schedules: alike on
    every rank) from `state`, each of `own` (this rank's environments and trackers) from `mine`, then this
    rank's random generators, last, so that nothing drawn while rebuilding moves them. The inverse of
    `Run.save_latest`. Returns `(first iteration to run, global step, best so far)`."""
    for states, objects in ((state, shared), (mine, own)):
        for name, obj in objects.items():
            try:
                obj.load_state_dict(states[name])
            except (RuntimeError, KeyError, ValueError) as err:  # (a forced resume with other shapes, say)
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                first = " ".join(lines[:2]) or type(err).__name__  # (torch's first line only names the module)
                raise ckpt.CheckpointError(f"the resumed latest.pt's {name!r} does not fit this run ({first}): it was "
                                           "trained with other shapes or settings. Resume with the run's flags and "
                                           "config, or start a new run.") from None  # fmt: skip
    ckpt.restore_rng_state(mine["rng"])
    log.info("resumed at iteration %d (step %d)", state["iteration"], state["global_step"])
    return state["iteration"] + 1, state["global_step"], state["best"]


def out_of_patience(patience: int, eval_interval: int, iteration: int, num_iterations: int, best_iteration: int,
                    world: distributed.World, device) -> bool:  # fmt: skip
    """Whether a run stops early after `iteration` (a phase's `--patience`): it was a validation before the last
    iteration, and the last `patience` validations did not move best.pt, whose newest part is from `best_iteration`
    (patience 0: never). Rank 0 holds best.pt and decides for every rank."""
    if patience == 0 or iteration % eval_interval or not 0 < iteration < num_iterations:
        return False  # (every rank takes this branch alike)
    spent = patience_spent(patience, eval_interval, iteration, best_iteration)
    return distributed.broadcast_value(float(spent), world, device) > 0


def patience_spent(patience: int, eval_interval: int, iteration: int, best_iteration: int) -> bool:
    """Whether the last `patience` validations up to `iteration` did not move best.pt (patience 0: never)."""
    return patience > 0 and iteration - best_iteration >= patience * eval_interval


def cli(main, args_type, aliases: dict, script: str) -> None:
    """A phase script's command line: parse the flags (and `--config`), run `main`, and on bad input
    print one paragraph naming `script` and exit with code 2 (every rank leaves the process group)."""
    try:
        args, _ = parse_args(args_type, aliases)
        rank0 = distributed.launch_rank() == 0  # (rank 0 writes the run's files)
        held = ckpt.holding_run(args.output_dir, args.log_dir, script) if rank0 else contextlib.nullcontext()
        with held:  # one process in a run's folders at a time
            main(args)
        distributed.shutdown(wait=True)
    except (ConfigError, ckpt.CheckpointError, ValueError) as err:
        print(f"{script}: error: {err}", file=sys.stderr)
        distributed.shutdown()
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (every checkpoint is written whole or not at all)
        print(f"{script}: interrupted; the same command with --resume continues from the last checkpoint "
              "(latest.pt in --output-dir) where one was written", file=sys.stderr)  # fmt: skip
        sys.exit(130)


class Run:
    """One invocation of a phase script's training loop, from `start_iteration` (1, or the one after a
    resumed checkpoint) to the end or to `--stop-after`.

    `args` is the script's tyro `Args` (it reads `output_dir`, `log_dir`, `resume`, `progress`,
    `keep_checkpoints`, `stop_after`); rank 0 writes TensorBoard and checkpoints, other ranks nothing.
    `step_files`: on `--resume`, the resumed `latest.pt`'s own step files (`resume` fills them in), so that
    pruning counts only this run's files (`save_rotating`)."""

    def __init__(self, args, name: str, world: distributed.World, device: torch.device, log,
                 num_iterations: int, rows_per_iteration: int, start_iteration: int, global_step: int,
                 step_files: list[int] | None = None):  # fmt: skip
        self.args, self.world, self.log = args, world, log
        self.num_iterations, self.start_iteration = num_iterations, start_iteration
        self.rows_per_iteration = rows_per_iteration * world.size  # environment steps of all ranks
        self.writer = (
            # (a resume hides events logged after its checkpoint's step, not those logged at it)
            SummaryWriter(str(args.log_dir), purge_step=global_step + 1 if args.resume else None)
            if world.is_main
            else NullWriter()
        )
        if not args.resume:
            table = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        self.bar = tqdm(total=num_iterations * self.rows_per_iteration, initial=global_step, unit="step",
                        disable=not (args.progress and sys.stderr.isatty() and world.is_main), desc=name)  # fmt: skip
        self.start_time, self.start_step = time.time(), global_step
        # the step files this run wrote and keeps (pruning never counts another run's: see save_rotating)
        self.step_files = list(step_files or [])  # on --resume: the resumed latest.pt's `step_files`
        self.watch = Stopwatch(device)  # seconds per loop section and per minibatch (metrics.json timing)

    def sps(self, global_step: int) -> int:
        """Environment steps per second since this invocation started."""
        return int((global_step - self.start_step) / max(time.time() - self.start_time, 1e-9))

    def log_scalars(self, scalars: dict, global_step: int) -> None:
        """An iteration's scalars to TensorBoard; the progress bar moves on by one iteration."""
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step)
        self.bar.update(self.rows_per_iteration)
        self.watch.lap("logging")

    def save_latest(self, iteration: int, global_step: int, best: dict, payload: dict, shared: dict,
                    own: dict) -> None:  # fmt: skip
        """The rotating `latest.pt`: `payload` (the models, with what a loader checks), the `state_dict()` of
        each of `shared` and the loop's counters, plus every rank's `own` objects (a plain tensor as it is)
        and its random generators. Collective (see `save_latest`); `restore` reads it back."""

        def states(objects: dict) -> dict:
            return {name: obj.state_dict() if hasattr(obj, "state_dict") else obj for name, obj in objects.items()}

        payload = {**payload, **states(shared), "iteration": iteration, "global_step": global_step, "best": best,
                   "flags": trained_flags(self.args)}  # fmt: skip
        local = {**states(own), "rng": ckpt.rng_state()}
        self.step_files = save_latest(Path(self.args.output_dir), payload, local, self.world, global_step,
                                                  self.args.keep_checkpoints, self.step_files)  # fmt: skip
        self.watch.lap("validation")  # validation and checkpoints, since the last lap

    def stop_here(self, iteration: int) -> bool:
        """Whether `--stop-after` ends this invocation after `iteration` (then the writer is closed)."""
        done_here = iteration - self.start_iteration + 1
        if self.args.stop_after is None or done_here < self.args.stop_after or iteration >= self.num_iterations:
            return False
        self.log.info("stopping after %d iterations as asked (--stop-after); continue with --resume",
                      self.args.stop_after)  # fmt: skip
        self.bar.close()
        self.writer.close()
        return True

    def finish(self, global_step: int, fingerprint: str) -> tuple[dict, dict]:
        """Close the bar; return metrics.json's `timing` (wall seconds, steps/s and where the time went) and
        `ranks`, every rank's weight `fingerprint` gathered (collective: see `distributed.weight_agreement`)."""
        self.bar.close()
        wall = time.time() - self.start_time
        timing = {"seconds": wall, "steps_per_second": (global_step - self.start_step) / max(wall, 1e-9),
                  **self.watch.summary()}  # fmt: skip
        return timing, distributed.weight_agreement(fingerprint, self.world)


class Stopwatch:
    """Where a training loop spends its wall time: `lap("rollout")` charges the seconds since the last lap
    (or since it was made) to that part, and `minibatches` counts PPO minibatches, so `summary()` can give the time
    per minibatch that `benchmarks.throughput` reports. On a GPU each lap synchronises the device once (a lap
    is taken between loop sections, never inside the rollout), so the parts add up to the wall time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.minibatches = 0
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self._last
        self._last = now

    def summary(self) -> dict:
        """`<part>_seconds` for each part, the minibatch count and the update's seconds per minibatch."""
        out = {f"{part}_seconds": seconds for part, seconds in self.seconds.items()}
        out["minibatches"] = self.minibatches
        if self.minibatches:
            out["seconds_per_minibatch"] = self.seconds.get("update", 0.0) / self.minibatches
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class NullWriter:
    """Stands in for the TensorBoard writer on ranks other than 0 (they log nothing)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_text(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
