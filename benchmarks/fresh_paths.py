"""Judge finished pipeline runs on another draw of the built-in market: does the test split's verdict carry?

    python -m benchmarks.fresh_paths --runs runs/bench/default [--seeds 1 2 3 4 5] \
        [--synthetic-seed 8] [--test-bars 20000] [--output-dir runs/bench/fresh_8]

Every verdict of `benchmarks.run` is read off one path: the built-in market's test split, 4,899 bars. Its
paired bootstrap intervals resample that path in blocks of about 27 bars, while the market's volatility
regimes last hundreds of bars, so they cannot say how a comparison would come out on another path of the
same market. This benchmark re-runs each seed's test evaluation on another draw of the market
(`data.synthetic.seed` changed, a longer test split), without retraining anything: for each run
`--runs/seed_S`, the folder `--output-dir/seed_S` links its `phase1..3` outputs, holds a copy of its
manifest and the changed config (`fresh.yaml`), and gets the report of `pipeline.py --mode eval --config
fresh.yaml` (the run's own `eval/` is untouched). The rules are fit on the new draw's own training and
validation splits, as the report always fits them; the system keeps what it learned on the original draw.
Then the trading-quality table of `benchmarks.run` for the new path.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import yaml

from benchmarks import cli
from benchmarks.run import finite_or_none, trading_quality
from mtq_common.training.checkpoint import atomic_write_bytes, atomic_write_json
from mtq_common.training.config import Config, ConfigError
from mtq_common.training.settings import config_from_dict

REPO = Path(__file__).resolve().parent.parent
PHASES = ("phase1", "phase2", "phase3")


@dataclass
class Args:
    runs: str
    """Folder of finished pipeline runs, one `seed_S` folder each (a `benchmarks.run --output-dir`'s `default`)."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """Which seed_S folders to evaluate."""
    synthetic_seed: int = 8
    """The new draw's `data.synthetic.seed` (must differ from the runs' own)."""
    test_bars: int = 20_000
    """The new draw's test split length (the built-in market's is 5,000)."""
    output_dir: str | None = None
    """Where the evaluations go (default: RUNS/../fresh_SEED)."""
    eval_episodes: int = 5
    """`--eval-episodes` of each evaluation (the table reads the one continuous backtest, not the episodes)."""
    workers: int = 2
    """Evaluations run at once."""


def fresh_config(config: dict, synthetic_seed: int, test_bars: int, where: str) -> Config:
    """A run's config (`pipeline.json`'s `config`) with another synthetic seed and test split length, validated as
    every config is (`config_from_dict`: a test split too short for the features is refused there)."""
    data = config["data"]
    if data["source"] != "synthetic":
        raise ConfigError(f"{where}: data.source = {data['source']!r}; another draw exists only of the built-in "
                          "synthetic market (for CSV data, use --mode walkforward)")  # fmt: skip
    if data["synthetic"]["seed"] == synthetic_seed:
        raise ConfigError(f"{where}: data.synthetic.seed is already {synthetic_seed}; --synthetic-seed must differ "
                          "from the runs' own, or the new path is the test split again")  # fmt: skip
    out = copy.deepcopy(config)
    out["data"]["synthetic"].update(seed=synthetic_seed, test_bars=test_bars)
    return config_from_dict(out, where=f"{where} with --synthetic-seed {synthetic_seed} --test-bars {test_bars}")


def prepare(run: Path, folder: Path, synthetic_seed: int, test_bars: int) -> Path:
    """`folder` ready for `pipeline.py --mode eval`: links to the run's phases, its manifest, `fresh.yaml`."""
    manifest_path = run / "pipeline.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: --runs must hold finished pipeline runs (seed_S folders)")
    manifest = json.loads(manifest_path.read_text())
    config = fresh_config(manifest["config"], synthetic_seed, test_bars, str(manifest_path))
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for phase in PHASES:
        (folder / phase).symlink_to((run / phase).resolve(), target_is_directory=True)
    shutil.copy(manifest_path, folder / "pipeline.json")
    atomic_write_bytes(folder / "fresh.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    return folder


def evaluate(folder: Path, episodes: int, helper: bool = True) -> dict:
    """`pipeline.py --mode eval` in `folder` on its `fresh.yaml` (`--no-helper` without `helper`); the test report
    it writes."""
    seed = json.loads((folder / "pipeline.json").read_text())["seed"]  # (the run's: its episodes draw from it)
    cmd = [sys.executable, "pipeline.py", "--mode", "eval", "--config", str(folder / "fresh.yaml"), "--output-dir",
           str(folder), "--log-dir", str(folder / "logs"), "--eval-episodes", str(episodes), "--seed", str(seed),
           *([] if helper else ["--no-helper"])]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads((folder / "eval" / "report.json").read_text())


def main(args: Args) -> dict:
    if args.workers < 1:  # (refused before any folder is written)
        raise ConfigError(f"--workers {args.workers}: accepted a whole number >= 1 (evaluations at the same time)")
    if args.eval_episodes < 1:
        raise ConfigError(f"--eval-episodes {args.eval_episodes}: accepted a whole number >= 1")
    runs = Path(args.runs)
    out = Path(args.output_dir) if args.output_dir else runs.parent / f"fresh_{args.synthetic_seed}"
    folders = {seed: prepare(runs / f"seed_{seed}", out / f"seed_{seed}", args.synthetic_seed, args.test_bars)
               for seed in args.seeds}  # fmt: skip
    helper = args.workers < 2  # (evaluations side by side leave no core idle for a helper process)
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        ran = pool.map(lambda f: evaluate(f, args.eval_episodes, helper), folders.values())
        reports = dict(zip(folders, ran, strict=True))
    outcomes = [SimpleNamespace(run=SimpleNamespace(seed=seed), report=reports[seed]) for seed in args.seeds]
    text, summary = trading_quality(outcomes)
    print(f"Trading quality on another draw of the market (synthetic seed {args.synthetic_seed}, "
          f"{args.test_bars} test bars; nothing retrained), per seed:\n{text}")  # fmt: skip
    result = {"synthetic_seed": args.synthetic_seed, "test_bars": args.test_bars, "runs": str(runs), **summary}
    atomic_write_json(out / "results.json", finite_or_none(result), sort_keys=False)
    print(f"table written to {out / 'results.json'}")
    return result


if __name__ == "__main__":
    cli(main, Args, "fresh_paths", RuntimeError)  # (RuntimeError: a run's evaluation failed, its stderr attached)
