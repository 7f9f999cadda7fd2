"""pipeline.py end to end: every output, kill -9 and resume, CSV data, clear errors that touch nothing, runs that
never mix (a second --mode train refused, --overwrite), --smoke."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import phase3_joint
import pipeline as pipeline_script
from mtq_common.training.settings import parse_args
from tests.helpers import run_cli, tensorboard_scalars, write_config

REPO = Path(__file__).resolve().parent.parent
TINY_BUDGET = ["--phase1-timesteps", "1024", "--phase2-timesteps", "1024", "--phase3-timesteps", "1024",
               "--num-envs", "8", "--eval-episodes", "3", "--device", "cpu"]  # fmt: skip
REPORT_KEYS = ("portfolio", "baselines", "allocation_efficiency", "specialist_utilization", "per_regime", "targets",
               "data")  # fmt: skip
PORTFOLIO_KEYS = ("sharpe", "sortino", "calmar", "max_drawdown", "win_rate", "total_return", "annual_volatility",
                  "var_compliance", "var_breach_rate", "turnover", "sharpe_before_costs",
                  "turnover_per_vol")  # fmt: skip


def pipeline_args(tmp: Path, *extra: str, config: Path | None = None) -> list[str]:
    return ["--output-dir", str(tmp / "out"), "--log-dir", str(tmp / "logs"), *TINY_BUDGET,
            *(["--config", str(config)] if config else []), *extra]  # fmt: skip


def pipeline(tmp: Path, *extra: str, config: Path | None = None, wait: bool = True, timeout: int = 600,
             helper: bool = False):  # fmt: skip
    """pipeline.py in a subprocess; without `helper`, `--no-helper` (at these budgets a helper process costs more
    than it saves; the `trained` run keeps the default)."""
    cmd = [sys.executable, "pipeline.py", *pipeline_args(tmp, *extra, config=config),
           *([] if helper else ["--no-helper"])]  # fmt: skip
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    config = write_config(tmp / "c.yaml")
    done = pipeline(tmp, "--mode", "train", config=config, helper=True)
    assert done.returncode == 0, done.stderr
    return tmp, config, done


def test_train_writes_every_output(trained):
    tmp, _, done = trained
    out, logs = tmp / "out", tmp / "logs"
    assert "Test evaluation" in done.stdout and ("PASS" in done.stdout or "FAIL" in done.stdout)
    for phase in ("phase1", "phase2", "phase3"):
        for name in ("latest.pt", "best.pt", "metrics.json"):
            assert (out / phase / name).is_file(), (phase, name)
        assert (logs / phase / "training.log").is_file() and list((logs / phase).glob("events.out.tfevents.*"))
    manifest = json.loads((out / "pipeline.json").read_text())
    assert all(manifest["phases"][p]["completed"] for p in ("phase1", "phase2", "phase3"))
    assert manifest["phases"]["phase1"]["global_step"] == 1024 and manifest["config_hash"]
    assert "torch" in manifest["versions"] and manifest["seed"] == 1
    report = json.loads((out / "eval" / "report.json").read_text())
    for key in REPORT_KEYS:
        assert key in report, key
    for key in PORTFOLIO_KEYS:
        assert key in report["portfolio"], key
        for name in ("equal_weight", "buy_and_hold", "risk_parity", "momentum", "trend_filter", "scaled_trend",
                     "oracle"):  # fmt: skip
            assert key in report["baselines"][name], (name, key)
    assert report["data"]["split"] == "test" and report["data"]["source"] == "synthetic"
    assert {t["metric"] for t in report["targets"]} >= {"sharpe", "max_drawdown", "win_rate", "var_compliance"}
    assert report["portfolio"]["var_compliance"] == 1.0
    for png in ("equity.png", "allocation.png", "tearsheet.png"):
        data = (out / "eval" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "## " in (out / "eval" / "report.md").read_text()
    # the per-bar exports of the pipeline's own run: one row per test bar, the report's Sharpe recomputed
    returns = pd.read_csv(out / "eval" / "returns.csv", index_col="date", parse_dates=True)
    weights = pd.read_csv(out / "eval" / "weights.csv", index_col="date", parse_dates=True)
    equity = pd.read_csv(out / "eval" / "equity.csv", index_col="date", parse_dates=True)
    assert len(returns) == len(weights) == len(equity) == report["data"]["bars"]
    assert list(weights.columns) == report["data"]["instruments"]
    bars_per_year, rf = report["data"]["bars_per_year"], report["data"]["risk_free_rate"]
    excess = returns["system"] - rf / bars_per_year
    assert excess.mean() / excess.std() * bars_per_year**0.5 == pytest.approx(report["portfolio"]["sharpe"], rel=1e-9)


def test_the_test_evaluation_is_one_continuous_backtest_of_the_whole_split(trained):
    """DESIGN section 9: one row per policy from the test split's first tradable bar to its second-to-last bar
    (the last position earns the last bar's return), never parallel segments."""
    from mtq_common.data.splits import load_splits
    from mtq_common.data.tables import build_tables
    from mtq_common.training.settings import load_config

    tmp, config, _ = trained
    report = json.loads((tmp / "out" / "eval" / "report.json").read_text())
    cfg = load_config(config)
    test = load_splits(cfg)["test"]
    first = build_tables(test, cfg).first_bar
    assert report["data"]["segments"] == 1
    assert report["data"]["bars"] == test.num_bars - 1 - first  # bars first .. num_bars - 2
    assert report["data"]["start"] == str(np.datetime64(test.timestamps[first], "D"))
    assert report["data"]["end"] == str(np.datetime64(test.timestamps[-1], "D"))
    assert "One continuous backtest of the whole split" in (tmp / "out" / "eval" / "report.md").read_text()


def test_eval_again_reproduces_the_report(trained):
    """The training run's evaluation ran its episodes in a helper process where a core was spare (`--helper`,
    the default); again in place, the report (episodes included) is the same to the bit."""
    tmp, config, _ = trained
    before = json.loads((tmp / "out" / "eval" / "report.json").read_text())
    done = pipeline(tmp, "--mode", "eval", config=config)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp / "out" / "eval" / "report.json").read_text()) == before


def test_fresh_paths_evaluates_a_run_on_another_draw_of_the_market_and_leaves_its_report(trained, tmp_path):
    """benchmarks.fresh_paths: the run's test evaluation again on another synthetic draw (new seed, longer test
    split), into its own folder; the run's own report is untouched. A CSV run or the run's own seed is refused."""
    from benchmarks import fresh_paths
    from mtq_common.training.config import ConfigError

    tmp, _, _ = trained
    own = (tmp / "out" / "eval" / "report.json").read_bytes()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "seed_1").symlink_to(tmp / "out", target_is_directory=True)
    result = fresh_paths.main(fresh_paths.Args(runs=str(tmp_path / "runs"), seeds=[1], synthetic_seed=11,
                                               test_bars=900, eval_episodes=2, workers=1))  # fmt: skip
    report = json.loads((tmp_path / "fresh_11" / "seed_1" / "eval" / "report.json").read_text())
    config = yaml.safe_load((tmp_path / "fresh_11" / "seed_1" / "fresh.yaml").read_text())
    assert config["data"]["synthetic"]["seed"] == 11 and config["data"]["synthetic"]["test_bars"] == 900
    assert report["data"]["bars"] == json.loads(own)["data"]["bars"] + 200  # 900 test bars instead of 700
    assert result["seeds"][0]["sharpe"]["system"] == report["portfolio"]["sharpe"]
    assert (tmp / "out" / "eval" / "report.json").read_bytes() == own
    manifest = json.loads((tmp / "out" / "pipeline.json").read_text())
    seed = manifest["config"]["data"]["synthetic"]["seed"]
    with pytest.raises(ConfigError, match="must differ"):
        fresh_paths.fresh_config(manifest["config"], seed, 900, "pipeline.json")
    for bad in ({"workers": 0}, {"eval_episodes": 0}):
        flag = "--" + next(iter(bad)).replace("_", "-")
        with pytest.raises(ConfigError, match=f"{flag} 0: accepted"):  # before any folder is written
            fresh_paths.main(fresh_paths.Args(runs=str(tmp_path / "runs"), seeds=[1], synthetic_seed=12, **bad))
    assert not (tmp_path / "fresh_12").exists()
    csv = {**manifest["config"], "data": {**manifest["config"]["data"], "source": "csv"}}
    with pytest.raises(ConfigError, match="synthetic"):
        fresh_paths.fresh_config(csv, seed + 1, 900, "pipeline.json")


def test_killed_run_resumes_to_the_same_result(trained, tmp_path):
    ref_tmp, config, _ = trained
    reference = json.loads((ref_tmp / "out" / "eval" / "report.json").read_text())
    process = pipeline(tmp_path, "--mode", "train", config=config, wait=False)
    target = tmp_path / "out" / "phase2" / "latest.pt"  # kill during Phase 2
    deadline = time.time() + 300
    while not target.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    manifest = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert not manifest["phases"].get("phase3", {}).get("completed")
    done = pipeline(tmp_path, "--mode", "resume", config=config)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "eval" / "report.json").read_text()) == reference


def write_csv_market(folder: Path, symbols: list[str], bars: int = 1500) -> None:
    rng = np.random.default_rng(0)
    dates = pd.bdate_range("2001-01-01", periods=bars)
    folder.mkdir(parents=True, exist_ok=True)
    for i, symbol in enumerate(symbols):
        close = 100 * np.exp(np.cumsum(rng.normal(0.0002 * (i - 1), 0.01, bars)))
        pd.DataFrame({"Date": dates, "Open": close, "Close": close}).to_csv(folder / f"{symbol}.csv", index=False)


def test_csv_end_to_end_with_two_asset_classes(tmp_path):
    data = tmp_path / "data"
    write_csv_market(data, ["SPX500", "NAS100", "XAUUSD"])
    spot = {"instruments": {"SPX500": {"sector": "equity", "spot": True}}}  # a long position pays the cash rate
    config = write_config(tmp_path / "c.yaml", spot)
    done = pipeline(tmp_path, "--mode", "train", "--data-dir", str(data), "--instruments", "SPX500", "NAS100",
                    "XAUUSD", config=config)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "eval" / "report.json").read_text())
    assert report["data"]["source"] == "csv" and report["data"]["split"] == "test"
    assert report["data"]["instruments"] == ["SPX500", "NAS100", "XAUUSD"]
    assert report["data"]["spot_instruments"] == ["SPX500"]
    said = (tmp_path / "out" / "eval" / "report.md").read_text()
    assert "SPX500 is a spot instrument: a long position pays the risk-free rate on the cash it uses" in said
    assert "SPX500 is a spot instrument" in done.stdout  # and on the terminal
    assert "oracle" not in report["baselines"]
    assert set(report["specialist_utilization"]) >= {"commodities", "equity"}
    assert "forex" not in report["specialist_utilization"]
    # two sectors: the 40% limit applies as configured (reached by scaling, never relaxed)
    assert report["limits"]["max_sector"] == 0.4 and report["limits"]["notes"] == []
    assert report["risk_layer"]["system"]["flat_books"] == 0.0
    assert report["data"]["start"] == str(np.datetime64(report["data"]["start"], "D"))  # an ISO date
    assert "skipped" in (tmp_path / "logs" / "phase1" / "training.log").read_text()
    # a test split no longer than an episode (124 tradable bars, episodes of 200): one window, reported as one
    # (it was 3 copies of the same backtest with a spread of 0)
    assert report["episodes_source"].startswith("one window, the whole test split (124 bars")
    short = write_config(tmp_path / "short.yaml", {"environment": {"episode_length": 50}, **spot})
    csv = ("--data-dir", str(data), "--instruments", "SPX500", "NAS100", "XAUUSD")
    code, stderr = run_cli("pipeline.py", *pipeline_args(tmp_path, "--mode", "eval", *csv, config=short))
    assert code == 0, stderr
    report = json.loads((tmp_path / "out" / "eval" / "report.json").read_text())
    assert report["episodes_source"] == "random windows of the test split" and report["episodes"]["sharpe"]["std"] > 0


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("eval-untrained", ["--mode", "eval"], "run `python pipeline.py --mode train`"),
        ("resume-nothing", ["--mode", "resume"], "nothing to resume"),
        # a flag another mode alone reads was ignored
        ("folds-in-train", ["--mode", "train", "--folds", "8"], "--folds applies to --mode walkforward only (given"),
        ("capital-in-eval", ["--mode", "eval", "--capital", "1e5"], "--capital applies to --mode act only (given"),
        ("holdings-in-train", ["--mode", "train", "--holdings", "h.csv"], "--holdings applies to --mode act only"),
        ("missing-config", ["--mode", "train", "--config", "nope.yaml"], "config file not found"),
        ("bad-csv", ["--mode", "train", "--data-dir", "DATA"], "close"),
        ("device", ["--mode", "train", "--device", "cudaX"], "training.device = 'cudaX' is out of range"),
        ("seed", ["--mode", "train", "--seed", "-1"], "--seed -1: accepted a whole number 0 <= seed < 2**32"),
        ("episodes", ["--mode", "train", "--eval-episodes", "0"], "--eval-episodes 0: accepted a whole number >= 1"),
        # a later phase's flag is checked before the first phase trains, and named as the pipeline passes it
        (
            "phase3-flag",
            ["--mode", "train", "--phase3-weight-average", "1.5"],
            "phase3: --weight-average 1.5: accepted 0 (off) <= decay < 1 (pipeline.py passes its --phase3-* flags",
        ),
        ("phase2-flag", ["--mode", "train", "--phase2-replace-confidence", "nan"], "phase2: "),
    ],
)
def test_bad_input_is_one_paragraph_and_exit_2(tmp_path, case, extra, message):
    if case == "bad-csv":
        data = tmp_path / "data"
        write_csv_market(data, ["SPX500"], 300)
        (data / "SPX500.csv").write_text("Date,Open\n2001-01-01,1\n")
        extra = [x.replace("DATA", str(data)) for x in extra] + ["--instruments", "SPX500"]
    code, stderr = run_cli("pipeline.py", *pipeline_args(tmp_path, *extra))
    assert code == 2, stderr
    assert message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_an_output_folder_that_cannot_be_written_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "file").write_text("")
    code, stderr = run_cli("pipeline.py", "--output-dir", str(tmp_path / "file"), "--log-dir", str(tmp_path / "logs"))
    assert code == 2 and f"--output-dir {tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a folder" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(sys.platform == "win32", reason="the run lock is fcntl's")
def test_a_run_another_process_holds_is_refused_and_touches_nothing(trained, tmp_path):
    """A `--mode resume` (or eval, or act) while the run still trains wrote into it beside the training; now it
    stops at once, naming the process that holds the run."""
    from tests.test_phase1 import hold_as_another_process

    tmp, config, _ = trained
    before = snapshot(tmp / "out")
    other = hold_as_another_process(tmp / "out", "pipeline.py --mode train (pid 1)")
    try:
        code, stderr = run_cli("pipeline.py", *pipeline_args(tmp, "--mode", "resume", config=config))
    finally:
        other.close()
    assert code == 2 and f"{(tmp / 'out').resolve()} is in use by pipeline.py --mode train (pid 1)" in stderr
    assert snapshot(tmp / "out") == before


@pytest.mark.parametrize("text", ['{"config_hash": "ab', "[1, 2]", '{"phases": 3}'])
def test_a_manifest_edited_by_hand_is_refused_with_its_path(tmp_path, text):
    """A manifest that is JSON but not the object pipeline.py writes (a list, say) was an AttributeError traceback;
    it is a CheckpointError now, which the command line prints as one paragraph with exit 2."""
    from mtq_common.training.checkpoint import CheckpointError

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "pipeline.json").write_text(text)
    args, _ = parse_args(pipeline_script.Args, pipeline_script.ALIASES, pipeline_args(tmp_path, "--mode", "resume"))
    path = tmp_path / "out" / "pipeline.json"
    with pytest.raises(CheckpointError, match=f"{path} is not a readable manifest .*move it away to start over"):
        pipeline_script.main(args)


@pytest.mark.skipif(sys.platform == "win32", reason="the run lock is fcntl's")
def test_a_log_folder_another_run_holds_is_refused_and_touches_nothing(tmp_path):
    """A second run into another --output-dir but the running one's --log-dir, with --overwrite, deleted the first
    run's TensorBoard events mid-run and then wrote beside it; the log folder is held with the run's now, and so is
    each phase's folder."""
    from tests.test_phase1 import hold_as_another_process

    logs = tmp_path / "logs"
    (logs / "phase1").mkdir(parents=True)
    (logs / "phase1" / "events.out.tfevents.1").write_text("the running run's")
    from mtq_common.training.checkpoint import CheckpointError

    def train(*flags):  # (in this process: the lock is taken through its own open file, as another process's is)
        args, _ = parse_args(pipeline_script.Args, pipeline_script.ALIASES, ["--mode", "train", *flags])
        pipeline_script.main(args)

    other = hold_as_another_process(logs, "pipeline.py --mode train (pid 1)")
    try:
        with pytest.raises(CheckpointError, match=f"{logs.resolve()} is in use by pipeline.py --mode train .pid 1."):
            train("--overwrite", "--output-dir", str(tmp_path / "new"), "--log-dir", str(logs))
        code, stderr = run_cli("phase1_ppo.py", "--output-dir", str(tmp_path / "p1"), "--log-dir", str(logs))
    finally:
        other.close()
    assert code == 2 and f"{logs.resolve()} is in use by" in stderr and "Traceback" not in stderr
    assert (logs / "phase1" / "events.out.tfevents.1").read_text() == "the running run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]
    # a phase script run by hand into one phase's folder of a run (Phase 3 loads from there): the pipeline holds
    # every phase's folders while it runs, so the one that comes second is refused
    other = hold_as_another_process(tmp_path / "new" / "phase1", "phase1_ppo.py (pid 1)")
    try:
        with pytest.raises(CheckpointError, match="phase1 is in use by phase1_ppo.py .pid 1."):
            train("--output-dir", str(tmp_path / "new"), "--log-dir", str(tmp_path / "new_logs"))
    finally:
        other.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_ctrl_c_ends_with_one_line(tmp_path, monkeypatch, mode):
    """Ctrl-C (a KeyboardInterrupt) exits 130 with one line, not a traceback; while training, it names
    `--mode resume`."""
    from mtq_common.training import distributed

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "resolve_device", interrupted)  # (the first step of every mode)
    code, stderr = run_cli("pipeline.py", *pipeline_args(tmp_path, "--mode", mode))
    assert code == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines() == [stderr.strip()] and "pipeline.py: interrupted" in stderr
    assert ("--mode resume" in stderr) == (mode == "train")


def test_resume_with_another_config_is_refused_and_touches_nothing(trained, tmp_path):
    tmp, config, _ = trained
    other = write_config(tmp_path / "other.yaml", {"reward": {"risk_penalty_weight": 2.0}})
    before = snapshot(tmp / "out")
    code, stderr = run_cli("pipeline.py", *pipeline_args(tmp, "--mode", "resume", "--num-envs", "4", config=other))
    assert code == 2 and "config hash" in stderr and "--force" in stderr
    # every key that differs, with the run's value and the current one
    assert "reward.risk_penalty_weight: 1.0 in the run, 2.0 now" in stderr
    assert "training.n_envs: 8 in the run, 4 now" in stderr
    assert snapshot(tmp / "out") == before
    # and another seed: Phases 2 and 3 would draw other numbers than the run's first part did
    code, stderr = run_cli("pipeline.py", *pipeline_args(tmp, "--mode", "resume", "--seed", "2", config=config))
    assert code == 2 and "was trained with --seed 1, not 2" in stderr and "--force" in stderr
    assert snapshot(tmp / "out") == before


@pytest.mark.parametrize("change", ["limits", "instruments", "seed"])
def test_eval_with_a_config_unlike_the_runs_is_refused_and_touches_nothing(trained, tmp_path, change):
    tmp, config, _ = trained
    seed = []
    if change == "seed":  # the episodes would draw other windows than the run's report did
        other, seed, words = config, ["--seed", "2"], "was trained with --seed 1, not 2: evaluate with the run's seed"
    elif change == "limits":  # the report would be another policy's: the run's weights under other limits
        other = write_config(tmp_path / "other.yaml", {"environment": {"max_position_size": 0.05}})
        words = "environment.max_position_size: 0.1 in the run, 0.05 now"
    else:  # the same sectors, fewer instruments: named, not a tensor-shape error
        other = write_config(tmp_path / "other.yaml", {"data": {"instruments": ["EURUSD", "XAUUSD", "SPX500"]}})
        words = "the data does not match the run trained in"
    before = snapshot(tmp / "out")
    code, stderr = run_cli("pipeline.py", *pipeline_args(tmp, "--mode", "eval", *seed, config=other))
    assert code == 2 and words in stderr and "Traceback" not in stderr, stderr
    assert snapshot(tmp / "out") == before


def listing(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folders` with its size and modification time (ns)."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) for f in folders for p in sorted(f.rglob("*")) if p.is_file()
    }


def test_a_second_train_into_a_run_is_refused_and_changes_no_file(trained):
    tmp, config, _ = trained
    before = listing(tmp / "out", tmp / "logs")
    code, stderr = run_cli("pipeline.py", *pipeline_args(tmp, "--mode", "train", config=config))
    assert code == 2 and "Traceback" not in stderr
    for words in (f"{tmp / 'out'} (or the log folder {tmp / 'logs'}) already holds a run", "--mode resume",
                  "another --output-dir", "--overwrite"):  # fmt: skip
        assert words in stderr, words
    assert listing(tmp / "out", tmp / "logs") == before


def test_a_log_folder_with_another_runs_events_is_refused(trained, tmp_path):
    """A new --output-dir with the old run's --log-dir: its TensorBoard folders would mix the two runs."""
    tmp, config, _ = trained
    code, stderr = run_cli("pipeline.py", "--output-dir", str(tmp_path / "new"), "--log-dir", str(tmp / "logs"),
                           *TINY_BUDGET, "--config", str(config), "--mode", "train")  # fmt: skip
    assert code == 2 and "events.out.tfevents" in stderr and "--log-dir" in stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_overwrite_deletes_the_earlier_run_first(trained, tmp_path):
    tmp, config, _ = trained
    shutil.copytree(tmp / "out", tmp_path / "out")
    shutil.copytree(tmp / "logs", tmp_path / "logs")
    old_events = {p.name for p in (tmp_path / "logs" / "phase1").glob("events.out.tfevents.*")}
    (tmp_path / "out" / "phase1" / "step_9999999999.pt").write_bytes(b"the earlier run's")
    (tmp_path / "out" / "notes.txt").write_text("not a run's output: kept")
    done = pipeline(tmp_path, "--mode", "train", "--overwrite", config=config)
    assert done.returncode == 0, done.stderr
    assert "--overwrite: deleted" in done.stderr
    assert not (tmp_path / "out" / "phase1" / "step_9999999999.pt").exists()
    assert (tmp_path / "out" / "notes.txt").read_text() == "not a run's output: kept"
    new_events = {p.name for p in (tmp_path / "logs" / "phase1").glob("events.out.tfevents.*")}
    assert len(new_events) == 1 and not new_events & old_events  # one run's events only
    # the same config and seed: the same result as the run it replaced
    report = json.loads((tmp_path / "out" / "eval" / "report.json").read_text())
    assert report == json.loads((tmp / "out" / "eval" / "report.json").read_text())


def test_overwrite_is_for_train_only(tmp_path):
    code, stderr = run_cli("pipeline.py", *pipeline_args(tmp_path, "--mode", "eval", "--overwrite"))
    assert code == 2 and "--overwrite applies to --mode train only" in stderr


def test_smoke_sets_tiny_budgets_and_explicit_flags_win():
    argv = pipeline_script.smoke_argv(["--smoke", "--num-envs", "8", "--output-dir", "x"])
    args, cfg = parse_args(pipeline_script.Args, pipeline_script.ALIASES, argv)
    assert args.smoke and args.num_envs == 8 and args.output_dir == "x"
    for key, value in pipeline_script.SMOKE.items():
        if key != "num_envs":
            assert getattr(args, key) == value, key
    assert cfg.training.phase_3_timesteps == pipeline_script.SMOKE["phase3_timesteps"] and cfg.training.n_envs == 8
    assert pipeline_script.smoke_argv(["--mode", "eval"]) == ["--mode", "eval"]


def test_the_config_files_training_values_reach_every_phase(tmp_path):
    """The pipeline builds each phase's Args on the config file (built-in default < YAML < flag, as for a script run
    alone): a file's `training.learning_rate` (Phases 1 and 2; Phase 3 reads `phase_3_learning_rate`), `n_epochs`,
    `gamma` and `specialist_update_freq` reach the phases, and the pipeline's own flags still win (here
    `--phase1-timesteps` over the file's `phase_1_timesteps`)."""
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 0.001\n  phase_3_learning_rate: 0.0002\n  n_epochs: 3\n  gamma: 0.95\n"
                    "  specialist_update_freq: 2\n  phase_1_timesteps: 1234\n")  # fmt: skip
    args, _ = parse_args(pipeline_script.Args, pipeline_script.ALIASES, ["--config", str(path)])
    for name, rate in (("phase1", 0.001), ("phase2", 0.001), ("phase3", 0.0002)):
        phase = pipeline_script.phase_args(args, name, False)
        assert (phase.learning_rate, phase.n_epochs, phase.gamma) == (rate, 3, 0.95), name
    assert pipeline_script.phase_args(args, "phase3", False).specialist_update_freq == 2
    assert pipeline_script.phase_args(args, "phase1", False).timesteps == 1234
    argv = ["--config", str(path), "--phase1-timesteps", "99"]
    args, _ = parse_args(pipeline_script.Args, pipeline_script.ALIASES, argv)
    assert pipeline_script.phase_args(args, "phase1", False).timesteps == 99


def test_selection_flags_reach_the_phase_scripts():
    """`--phase3-replace-confidence`, `--phase3-patience`, `--no-phase3-joint-sizing` and `--phase3-weight-average`
    are Phase 3's `--replace-confidence`, `--patience`, `--no-joint-sizing` and `--weight-average`,
    `--phase2-replace-confidence` Phase 2's, with the scripts' defaults (0.9: best.pt leaves the starting point only
    with confidence; 3: stop after three validations without a new best.pt; the joint sizing on; the average of the
    iterates at decay 0.9)."""
    args, _ = parse_args(pipeline_script.Args, pipeline_script.ALIASES, [])
    defaults = pipeline_script.phase_args(args, "phase3", False)
    assert (defaults.replace_confidence, defaults.patience, defaults.joint_sizing) == (0.9, 3, True)
    assert defaults.weight_average == phase3_joint.Args.weight_average == 0.9
    assert pipeline_script.phase_args(args, "phase2", False).replace_confidence == 0.9
    args, _ = parse_args(pipeline_script.Args, pipeline_script.ALIASES, ["--phase3-weight-average", "0"])
    assert pipeline_script.phase_args(args, "phase3", False).weight_average == 0.0
    argv = ["--phase3-replace-confidence", "0", "--phase3-patience", "2", "--phase2-replace-confidence", "0.5"]
    args, _ = parse_args(pipeline_script.Args, pipeline_script.ALIASES, argv)
    assert (pipeline_script.phase_args(args, "phase3", False).replace_confidence, args.phase3_patience) == (0.0, 2)
    assert pipeline_script.phase_args(args, "phase3", False).patience == 2
    assert pipeline_script.phase_args(args, "phase2", False).replace_confidence == 0.5
    args, _ = parse_args(pipeline_script.Args, pipeline_script.ALIASES, ["--no-phase3-joint-sizing"])
    assert pipeline_script.phase_args(args, "phase3", False).joint_sizing is False


def test_compile_reaches_every_phase():
    """`pipeline.py --compile off` trains every phase eager (no C++ compiler needed), `on` compiles every phase; the
    default leaves each phase's own `auto`; a value other than auto, on or off is refused."""
    for argv, expected in (([], "auto"), (["--compile", "off"], "off"), (["--compile", "on"], "on")):
        args, _ = parse_args(pipeline_script.Args, pipeline_script.ALIASES, argv)
        phases = [pipeline_script.phase_args(args, name, False) for name in ("phase1", "phase2", "phase3")]
        assert [phase.compile for phase in phases] == [expected] * 3, argv
    code, err = run_cli("pipeline.py", "--compile", "sometimes")
    assert code != 0 and "--compile" in err


def test_a_copy_of_phase2_with_its_own_reward_runs_through_the_pipeline(trained, tmp_path):
    """README's walkthrough: copy phase2_meta.py, change `meta_reward`, pass the copy with --phase2-script. The
    copy's reward is the one Phase 2 trains on, for the env and the twin alike (a constant 1 here: the twin's
    logged reward is exactly 1); the manifest records the script; resuming with other scripts is refused."""
    source = (REPO / "phase2_meta.py").read_text()
    built_in = '    return reward if book is None else book(info["net_return"])\n\n\ndef main('
    assert source.count(built_in) == 1  # the one line a user edits
    copy = tmp_path / "my_phase2.py"
    copy.write_text(source.replace(built_in, "    return torch.ones_like(reward)\n\n\ndef main("))
    _, config, _ = trained
    done = pipeline(tmp_path, "--mode", "train", "--phase2-script", str(copy), config=config)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert manifest["scripts"] == {"phase1": "phase1_ppo.py", "phase2": str(copy.resolve()),
                                   "phase3": "phase3_joint.py"}  # fmt: skip
    assert set(tensorboard_scalars(tmp_path / "logs" / "phase2", "charts/twin_reward")) == {1.0}
    assert set(tensorboard_scalars(tmp_path / "logs" / "phase3", "charts/twin_reward")) != {1.0}  # built-in
    refused = pipeline(tmp_path, "--mode", "resume", config=config)  # without the flag: other scripts
    assert refused.returncode == 2 and "other phase scripts" in refused.stderr


def test_a_phase_script_without_main_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "empty.py").write_text("x = 1\n")
    done = pipeline(tmp_path, "--mode", "train", "--phase1-script", str(tmp_path / "empty.py"))
    assert done.returncode == 2 and "has no Args and no main" in done.stderr
    assert not (tmp_path / "out" / "phase1").exists()
    # a copy that does not load (a typo): one paragraph naming the file and its error, not the pipeline's traceback
    (tmp_path / "typo.py").write_text("def main(:\n")
    code, stderr = run_cli("pipeline.py", *pipeline_args(tmp_path, "--mode", "train", "--phase2-script",
                                                         str(tmp_path / "typo.py")))  # fmt: skip
    assert code == 2 and "Traceback" not in stderr and "--phase2-script" in stderr
    assert "loading it failed: SyntaxError: invalid syntax (typo.py, line 1)" in stderr
    assert not (tmp_path / "out" / "phase1").exists()
