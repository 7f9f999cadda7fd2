"""phase1_ppo.py: outputs, learning on a planted signal, determinism, exact resume, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import phase1_ppo
import phase2_meta
import phase3_joint
from tests.helpers import SMALL, run_cli, tensorboard_steps, tensorboard_tags, write_config

REPO = Path(__file__).resolve().parent.parent
CLEANRL_TAGS = {
    "charts/episodic_return", "charts/SPS", "charts/learning_rate", "losses/value_loss", "losses/policy_loss",
    "losses/entropy", "losses/approx_kl", "losses/clipfrac", "losses/explained_variance",
}  # fmt: skip


def run(tmp_path: Path, name: str, config: Path, **kwargs) -> dict:
    """Phase 1 in-process (imports once, so the suite stays fast)."""
    args = phase1_ppo.Args(
        config=None if config is None else str(config),
        output_dir=str(tmp_path / name / "out"),
        log_dir=str(tmp_path / name / "logs"),
        device="cpu",
        progress=False,
        **{**SMALL, **kwargs},
    )
    return phase1_ppo.main(args)


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "timing"}


def test_smoke_subprocess_writes_every_output(tmp_path):
    config = write_config(tmp_path / "c.yaml")
    out, logs = tmp_path / "out", tmp_path / "logs"
    cmd = [sys.executable, "phase1_ppo.py", "--config", str(config), "--timesteps", "1024", "--output-dir", str(out),
           "--log-dir", str(logs), "--device", "cpu", "--num-envs", "8", "--num-steps", "32", "--minibatch-size", "64",
           "--n-epochs", "1", "--eval-interval", "2"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Phase 1 validation" in done.stdout and "EURUSD" in done.stdout
    for name in ("latest.pt", "best.pt", "metrics.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("step_*.pt"))
    assert (logs / "training.log").read_text().count("iteration") >= 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["specialists"]) == {"forex", "commodities", "equity"}
    row = metrics["specialists"]["equity"]["SPX500"]
    for key in ("sharpe", "sortino", "calmar", "max_drawdown", "win_rate", "total_return", "momentum_sharpe"):
        assert isinstance(row[key], float)
    tags = tensorboard_tags(logs)
    assert CLEANRL_TAGS <= tags, CLEANRL_TAGS - tags
    assert {"trading/sharpe", "trading/max_drawdown", "trading/win_rate"} <= tags


def test_it_learns_when_the_next_return_is_observable(tmp_path):
    """The PPO machinery itself: with the (look-ahead) diagnostic feature every specialist trades well, learnt
    from scratch (no start rule)."""
    config = write_config(tmp_path / "c.yaml")
    metrics = run(tmp_path, "diag", config, timesteps=12288, num_envs=32, num_steps=64, minibatch_size=256,
                  n_epochs=4, eval_interval=3, next_return_diagnostic=True, start_rule=False)  # fmt: skip
    # Seeds 1-5 (costs on the drifted holdings, DESIGN section 4; Phase 1's default position_rate): forex 3.0-3.3,
    # commodities 4.6-5.3, equity 4.9-5.9, each well above the oracle's Sharpe on the same bars (forex 1.65,
    # commodities 2.4, equity 2.8). A fixed 3.0 sat inside the forex spread (2.6 on seed 1 without the rate).
    for name, table in metrics["specialists"].items():
        rows = [row for key, row in table.items() if key != "mean_sharpe"]
        oracle = sum(row["oracle_sharpe"] for row in rows) / len(rows)
        assert table["mean_sharpe"] > max(2.0, oracle + 0.5), (name, table["mean_sharpe"], oracle)


def test_it_beats_buy_and_hold_on_the_default_market(tmp_path):
    """No look-ahead: the default synthetic market, validation split, a short budget (~7 s).

    Tried seeds 1, 2, 3: mean Sharpe over the eight instruments 0.88, 0.83, 0.81 against
    buy-and-hold's -0.08 on the same bars (the 60-bar momentum rule: 1.15).
    """
    metrics = run(tmp_path, "default", None, timesteps=40960, num_envs=32, num_steps=64, minibatch_size=256,
                  n_epochs=4, eval_interval=5, eval_segments=16)  # fmt: skip
    rows = [row for table in metrics["specialists"].values() for key, row in table.items() if key != "mean_sharpe"]
    agent = sum(row["sharpe"] for row in rows) / len(rows)
    buy_and_hold = sum(row["buy_and_hold_sharpe"] for row in rows) / len(rows)
    assert agent > buy_and_hold + 0.4, (agent, buy_and_hold)


def test_the_specialists_start_at_the_scaled_trend_and_their_start_is_a_best_pt_candidate(tmp_path):
    """`--start-rule` (the default): the rule picked on the training split is stored with the weights, and the
    starting point is validated (iteration 0), so best.pt holds, per specialist, the rule or an iterate that beat it
    on validation."""
    import torch

    config = write_config(tmp_path / "c.yaml")
    metrics = run(tmp_path, "rule", config, timesteps=2048, eval_interval=2)
    assert metrics["start_rule"]["fitted_on"] == "train" and metrics["start_rule"]["scale"] > 0
    for name, table in metrics["specialists"].items():
        assert table["mean_sharpe"] >= metrics["start_sharpe"][name], name
        if metrics["best_iteration"][name] == 0:
            assert table["mean_sharpe"] == metrics["start_sharpe"][name]
    state = torch.load(tmp_path / "rule" / "out" / "best.pt", weights_only=True)
    assert state["start_rule"] == metrics["start_rule"]
    plain = run(tmp_path, "plain", config, timesteps=1024, start_rule=False)
    state = torch.load(tmp_path / "plain" / "out" / "best.pt", weights_only=True)
    assert state["start_rule"] is None and plain["start_rule"] is None


def test_a_kept_start_goes_on_with_the_normaliser_and_critic_the_run_learned(tmp_path, monkeypatch):
    """A specialist whose best.pt slice is its start rule (iteration 0) trades as the rule (its validation is the
    start's) but holds the last iterate's observation normaliser and critic (`nets.start_with_learned_estimates`),
    what Phase 3 fine-tunes from."""
    import torch

    real = phase1_ppo.update_best

    def keep_forex_start(best, agent, evaluation, iteration):  # forex never beats its start, the others may
        if iteration > 0:
            evaluation = {**evaluation, "forex": {**evaluation["forex"], "mean_sharpe": -float("inf")}}
        return real(best, agent, evaluation, iteration)

    monkeypatch.setattr(phase1_ppo, "update_best", keep_forex_start)
    config = write_config(tmp_path / "c.yaml")
    metrics = run(tmp_path, "kept", config, timesteps=2048, eval_interval=2, learning_rate=0.01)
    assert metrics["best_iteration"]["forex"] == 0
    assert metrics["specialists"]["forex"]["mean_sharpe"] == metrics["start_sharpe"]["forex"]
    best = torch.load(tmp_path / "kept" / "out" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "kept" / "out" / "latest.pt", weights_only=True)
    forex = best["specialists"].index("forex")
    for key, value in best["model"].items():
        if value.dim() == 0:
            continue  # (the normaliser's shared count)
        learned = key.startswith(("norm.", "critic."))
        assert torch.equal(value[forex], last["model"][key][forex]) == learned, key


def test_patience_stops_a_run_that_moves_no_specialist_and_a_resume_keeps_the_stop(tmp_path, monkeypatch):
    """With no iterate ever beating a start (update_best patched), `--patience 2` stops after the second validation
    (eval every iteration), `--patience 0` runs the whole budget, both keep the same starts, and resuming the stopped
    run trains nothing more."""
    real = phase1_ppo.update_best

    def keep_starts(best, agent, evaluation, iteration):
        if iteration > 0:
            evaluation = {name: {**table, "mean_sharpe": -float("inf")} for name, table in evaluation.items()}
        return real(best, agent, evaluation, iteration)

    monkeypatch.setattr(phase1_ppo, "update_best", keep_starts)
    config = write_config(tmp_path / "c.yaml")
    budget = dict(timesteps=2048, eval_interval=1)  # 8 iterations of 256 steps
    stopped = run(tmp_path, "patience_2", config, patience=2, **budget)
    assert (stopped["early_stop_iteration"], stopped["global_step"]) == (2, 2 * 256)
    assert set(stopped["best_iteration"].values()) == {0}
    full = run(tmp_path, "patience_0", config, patience=0, **budget)
    assert (full["early_stop_iteration"], full["global_step"]) == (None, 2048)
    assert full["specialists"] == stopped["specialists"]  # the starts, as validated
    again = run(tmp_path, "patience_2", config, patience=2, resume=True, **budget)
    assert (again["early_stop_iteration"], again["global_step"]) == (2, 2 * 256)
    assert again["specialists"] == stopped["specialists"]


def test_same_seed_same_metrics(tmp_path):
    config = write_config(tmp_path / "c.yaml")
    a = run(tmp_path, "a", config, timesteps=1024, seed=3)
    b = run(tmp_path, "b", config, timesteps=1024, seed=3)
    c = run(tmp_path, "c", config, timesteps=1024, seed=4)
    assert without_timing(a) == without_timing(b)
    assert without_timing(a)["specialists"] != without_timing(c)["specialists"]


def plant_foreign_step_files(out: Path) -> dict[Path, bytes]:
    """Step files another run left in `out`, one far beyond this run's steps and one before them."""
    files = {out / "step_0000999999.pt": b"another run's", out / "step_0000000100.pt": b"another run's"}
    out.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        path.write_bytes(data)
    return files


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    """Also: pruning counts only the run's own step files (fresh and resumed), and a resume with another config
    names the keys that differ."""
    import torch

    from mtq_common.training.checkpoint import CheckpointError

    config = write_config(tmp_path / "c.yaml")
    out = tmp_path / "unbroken" / "out"
    foreign = plant_foreign_step_files(out)  # 2048 steps of 256 per iteration: step files 256 .. 2048
    unbroken = run(tmp_path, "unbroken", config, timesteps=2048, eval_interval=3, keep_checkpoints=2)
    # the run's newest two (keep 2), and both foreign files untouched
    kept = ["step_0000000100.pt", "step_0000001792.pt", "step_0000002048.pt", "step_0000999999.pt"]
    assert sorted(p.name for p in out.glob("step_*.pt")) == kept
    assert all(path.read_bytes() == data for path, data in foreign.items())

    partial = run(tmp_path, "broken", config, timesteps=2048, eval_interval=3, stop_after=5, keep_checkpoints=2)
    assert partial["stopped_at_iteration"] == 5
    broken = tmp_path / "broken" / "out"
    latest = torch.load(broken / "latest.pt", weights_only=True)
    assert latest["step_files"] == [1024, 1280]  # the run's own, named in latest.pt for a resume
    foreign = plant_foreign_step_files(broken)
    other = write_config(tmp_path / "other.yaml", {"reward": {"risk_penalty_weight": 3.0}})
    with pytest.raises(CheckpointError, match=r"reward\.risk_penalty_weight: 1\.0 in the run, 3\.0 now"):
        run(tmp_path, "broken", other, timesteps=2048, eval_interval=3, resume=True, keep_checkpoints=2)
    # and with flags that change what is trained (the flags of where and how it runs may change)
    with pytest.raises(CheckpointError, match="other flags: --num-steps 32 in the run, 64 now; --ent-coef"):
        run(tmp_path, "broken", config, timesteps=2048, eval_interval=3, resume=True, keep_checkpoints=2,
            num_steps=64, ent_coef=0.5)  # fmt: skip
    with pytest.raises(CheckpointError, match="'model' does not fit this run .*size mismatch"):  # forced
        run(tmp_path, "broken", config, timesteps=2048, eval_interval=3, resume=True, keep_checkpoints=2,
            hidden_size=16, force=True)  # fmt: skip
    resumed = run(tmp_path, "broken", config, timesteps=2048, eval_interval=3, resume=True, keep_checkpoints=2)
    assert without_timing(resumed) == without_timing(unbroken)
    # TensorBoard shows the resumed run's logs with every step of the unbroken run's (the resumed checkpoint's own
    # step 1280 was hidden: the resumed writer purged from it, not from the step after it)
    steps = [tensorboard_steps(tmp_path / name / "logs", "losses/value_loss") for name in ("broken", "unbroken")]
    assert steps[0] == steps[1] == [256 * k for k in range(1, 9)]
    (broken / "latest.pt").write_bytes(b"not a checkpoint")  # the hint fits a phase script and pipeline.py alike
    with pytest.raises(CheckpointError, match=r"move the file away and run without --resume \(`pipeline.py --mode"):
        run(tmp_path, "broken", config, timesteps=2048, eval_interval=3, resume=True, keep_checkpoints=2)
    assert sorted(p.name for p in broken.glob("step_*.pt")) == kept
    assert all(path.read_bytes() == data for path, data in foreign.items())


def test_subset_of_specialists(tmp_path):
    config = write_config(tmp_path / "c.yaml")
    metrics = run(tmp_path, "subset", config, timesteps=512, specialists=["equity"])
    assert set(metrics["specialists"]) == {"equity"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config", "nope.yaml"], "config file not found"),
        (["--instruments", "EURUSD", "FOO"], "unknown symbol 'FOO'"),
        (["--resume"], "checkpoint not found"),
        (["--timesteps", "-5"], "phase_1_timesteps"),
        (["--position-rate", "1.5"], "position_rate 1.5 (--position-rate): accepted 0 < rate <= 1"),
        (["--patience", "-1"], "--patience -1: accepted 0 (never stop early) or more validations"),
        (["--eval-interval", "0"], "--eval-interval 0: accepted a whole number >= 1"),
        (["--ent-coef", "nan"], "--ent-coef nan: accepted a finite number >= 0"),
        (["--max-grad-norm", "0"], "--max-grad-norm 0.0: accepted a finite number > 0"),
        (["--num-steps", "0"], "--num-steps 0: accepted a whole number >= 1"),
        (["--hidden-size", "0"], "--hidden-size 0: accepted a whole number >= 1"),
        (["--keep-checkpoints", "-1"], "--keep-checkpoints -1: accepted a whole number >= 0"),
        (["--device", "cuda:x"], "training.device = 'cuda:x' is out of range; accepted: auto, cpu, cuda or cuda:N"),
    ],
)
def test_clear_errors(tmp_path, extra, message):
    code, stderr = run_cli("phase1_ppo.py", "--output-dir", str(tmp_path / "empty"), "--log-dir",
                           str(tmp_path / "l"), "--device", "cpu", *extra)  # fmt: skip
    assert code == 2
    assert message in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("flag, value", [("stop_after", 0), ("torch_threads", -1), ("keep_checkpoints", -2)])
def test_a_flag_out_of_range_is_refused_with_its_name(flag, value):
    """Each script's shared flags are checked before any work: `--stop-after 0` stopped after one iteration, a
    negative `--keep-checkpoints` deleted every step file, a negative `--torch-threads` was ignored."""
    from mtq_common.training.config import ConfigError
    from mtq_common.training.plumbing import check_flags

    for script in (phase1_ppo, phase2_meta, phase3_joint):
        with pytest.raises(ConfigError, match=f"--{flag.replace('_', '-')} {value}: accepted"):
            check_flags(script.Args(**{flag: value}))
    check_flags(phase1_ppo.Args(stop_after=None, torch_threads=0, keep_checkpoints=0))


def test_trade_pnl_excludes_the_cash_yield(tmp_path):
    """A trade's PnL is its trading return net of costs: the account's cash yield must not turn a
    losing trade into a win (found by review: tiny runs reported win rates near 1 with negative Sharpe)."""
    import numpy as np

    from mtq_common.agents.nets import SpecialistAgents
    from mtq_common.data.splits import load_splits
    from mtq_common.envs.trading_env import instrument_obs_size
    from mtq_common.evaluation.rules import TrendFilter
    from mtq_common.evaluation.specialist_eval import evaluate_specialists
    from mtq_common.training.config import Config

    cfg = Config()
    cfg.data.synthetic.val_bars = 600
    cfg.reward.risk_free_rate = 0.4  # a huge cash yield: it would dominate every trade's PnL
    val = load_splits(cfg)["val"]
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    agents = SpecialistAgents(cfg.specialists, instrument_obs_size(val.num_instruments), hidden=4)
    with torch.no_grad():
        agents.actor[-1].bias.fill_(0.05)  # tiny long positions, costs on every entry
    result = evaluate_specialists(agents, val, cfg, TrendFilter(), segments=4)
    rows = [r for t in result.values() for k, r in t.items() if k != "mean_sharpe"]
    assert np.mean([r["win_rate"] for r in rows]) < 0.9


def test_the_rules_trade_through_the_stop_loss():
    """Phase 1's rules run through the same SpecialistEnv as the specialists, stop-loss included: a very
    tight stop changes their Sharpe (the old vectorised backtest had no stop-loss at all), and a stop
    that never triggers (100%) gives the plain rule."""
    import dataclasses

    import numpy as np
    import torch

    from mtq_common.agents.nets import SpecialistAgents
    from mtq_common.data.splits import load_splits
    from mtq_common.data.tables import cost_rates
    from mtq_common.envs.trading_env import instrument_obs_size
    from mtq_common.evaluation.metrics import sharpe
    from mtq_common.evaluation.rules import TrendFilter, backtest, momentum_positions
    from mtq_common.evaluation.specialist_eval import evaluate_specialists, segment_starts
    from mtq_common.training.config import Config

    cfg = Config()
    cfg.data.synthetic.val_bars = 600
    val = load_splits(cfg)["val"]
    torch.manual_seed(0)
    agents = SpecialistAgents(cfg.specialists, instrument_obs_size(val.num_instruments), hidden=4)

    def momentum_sharpes(stop_loss_pct: float) -> np.ndarray:
        c = dataclasses.replace(cfg, environment=dataclasses.replace(cfg.environment, stop_loss_pct=stop_loss_pct))
        result = evaluate_specialists(agents, val, c, TrendFilter(), segments=1)
        return np.array(
            [result[s][symbol]["momentum_sharpe"] for symbol, s in zip(val.symbols, val.sectors, strict=True)]
        )

    tight, off = momentum_sharpes(0.002), momentum_sharpes(1.0)
    assert (np.abs(tight - off) > 1e-3).sum() >= 6 and np.abs(tight - off).max() > 0.3, (tight, off)
    # with the stop off, the rule is the plain position table held over the same bars (one continuous run)
    from mtq_common.data.tables import build_tables

    first, length = segment_starts(build_tables(val, cfg), 1)
    bars = slice(first[0], first[0] + length + 1)
    net = backtest(momentum_positions(val.prices)[bars] * cfg.environment.max_position_size, val.returns[bars],
                   cost_rates(val, cfg, "cpu").double().numpy())  # fmt: skip
    plain = np.array([sharpe(net[:, i], val.bars_per_year) for i in range(val.num_instruments)])
    assert np.corrcoef(plain, off)[0, 1] > 0.9, (plain, off)


def test_ctrl_c_ends_with_one_line_that_says_how_to_continue(tmp_path, monkeypatch):
    """Ctrl-C (a KeyboardInterrupt anywhere in the run) exits 130 with one line naming --resume, not a traceback."""
    import mtq_common.data.splits as splits

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(splits, "load_splits", interrupted)
    code, stderr = run_cli("phase1_ppo.py", "--output-dir", str(tmp_path / "out"), "--log-dir", str(tmp_path / "l"),
                           "--device", "cpu")  # fmt: skip
    assert code == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines() == [stderr.strip()] and "phase1_ppo.py: interrupted" in stderr
    assert "--resume" in stderr


def test_a_write_that_fails_is_one_error_naming_the_file_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    """A full disk hours into a run was an OSError traceback from deep in the checkpoint code; it is a WriteError
    now (a CheckpointError: one paragraph and exit 2 from every command line) naming the file and the resume."""
    import errno

    from mtq_common.training import checkpoint

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "latest.pt").write_bytes(b"the last whole checkpoint")
    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(checkpoint.WriteError, match=r"cannot write .*latest.pt \(No space left on device\); nothing "
                                                    r"was left half-written: .*--mode resume"):  # fmt: skip
        checkpoint.atomic_write_bytes(tmp_path / "latest.pt", b"a newer one")
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temporary file left
    assert (tmp_path / "latest.pt").read_bytes() == b"the last whole checkpoint"
    assert issubclass(checkpoint.WriteError, checkpoint.CheckpointError)


@pytest.mark.parametrize("flag", ["--output-dir", "--log-dir"])
def test_a_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, flag):
    """An output or log folder under a file (or one without write access) was found only at the first checkpoint,
    after the training; the probe that finds it first leaves no folder behind."""
    (tmp_path / "file").write_text("")
    folders = {"--output-dir": str(tmp_path / "out"), "--log-dir": str(tmp_path / "logs")}
    folders[flag] = str(tmp_path / "file" / "sub")
    code, stderr = run_cli("phase1_ppo.py", *[x for kv in folders.items() for x in kv], "--device", "cpu")
    assert code == 2 and "Traceback" not in stderr
    assert f"{flag} {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file, not a folder" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the other folder's probe left nothing


def test_the_writable_probe_makes_no_folder_and_leaves_no_file(tmp_path):
    from mtq_common.training.config import ConfigError
    from mtq_common.training.plumbing import check_writable

    check_writable(tmp_path / "a" / "b" / "c", "--output-dir")
    (tmp_path / "kept").mkdir()
    check_writable(tmp_path / "kept", "--output-dir")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []
    if Path("/proc").is_dir():  # (Linux: no file can be made there, whoever runs the test)
        with pytest.raises(ConfigError, match="cannot write in /proc"):
            check_writable(Path("/proc/mtq"), "--log-dir")


def hold_as_another_process(folder: Path, who: str):
    """The run lock of `folder` taken through a file of its own, as another process would take it (a lock is per
    open file: this process's own `holding` does not share it)."""
    import fcntl

    from mtq_common.training.checkpoint import lock_path

    path = lock_path(folder)
    path.parent.mkdir(exist_ok=True)
    handle = open(path, "w")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write(who)
    handle.flush()
    return handle


@pytest.mark.skipif(sys.platform == "win32", reason="the run lock is fcntl's")
def test_a_run_folder_is_held_by_one_process_at_a_time(tmp_path):
    """Two processes in one run (a `--resume` while the run still trains) wrote over each other's checkpoints and
    reports; the second is now refused, naming the first. The lock writes nothing into the run's folder."""
    from mtq_common.training.checkpoint import CheckpointError, holding

    folder = tmp_path / "run"
    with holding(folder, "phase1_ppo.py"):
        with holding(folder, "pipeline.py (phase1)"):  # nested in one process: free
            pass
        with pytest.raises(BlockingIOError):  # held against any other open file, i.e. any other process
            hold_as_another_process(folder, "x")
    assert not folder.exists()
    other = hold_as_another_process(folder, "pipeline.py --mode train (pid 1)")  # released when the block ended
    with pytest.raises(CheckpointError, match=r"run is in use by pipeline.py --mode train \(pid 1\): wait"):
        with holding(folder, "phase1_ppo.py"):
            pass
    code, stderr = run_cli("phase1_ppo.py", "--output-dir", str(folder), "--log-dir", str(tmp_path / "l"), "--resume")
    assert code == 2 and "is in use by pipeline.py --mode train (pid 1)" in stderr and "Traceback" not in stderr
    other.close()
