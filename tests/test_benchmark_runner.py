"""The seed-sweep runner: expansion, print-only default, aggregation, a real 2-seed run, failure reporting."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import sys
from dataclasses import dataclass

import pytest

from benchmarks.run import Args, aggregate, expand, flatten, main, selected_rows
from tests.helpers import run_cli, write_config

PY = shlex.quote(sys.executable)
TINY_PPO = "--timesteps 512 --num-envs 8 --num-steps 32 --minibatch-size 64 --n-epochs 1 --device cpu"


def flag(argv: list[str], name: str) -> str:
    """The value after `name` in an argv."""
    return argv[argv.index(name) + 1]


def test_expand_seeds_times_configs(tmp_path):
    runs = expand("python phase1_ppo.py --timesteps 64", [1, 2, 3], ["cfg/a.yaml", "cfg/b.yaml"], str(tmp_path))
    assert len(runs) == 6
    assert [(r.config, r.seed) for r in runs] == [(c, s) for c in ("cfg/a.yaml", "cfg/b.yaml") for s in (1, 2, 3)]
    for run in runs:
        assert run.command[:4] == ["python", "phase1_ppo.py", "--timesteps", "64"]
        assert flag(run.command, "--seed") == str(run.seed)
        assert flag(run.command, "--config") == run.config
        assert flag(run.command, "--output-dir") == run.output_dir
        assert flag(run.command, "--log-dir").startswith(run.output_dir)
        assert "--no-progress" in run.command
    assert len({r.output_dir for r in runs}) == 6
    assert runs[0].output_dir.endswith("a/seed_1") and runs[-1].output_dir.endswith("b/seed_3")


def test_expand_without_configs_uses_default_group(tmp_path):
    runs = expand("python x.py", [7], [], str(tmp_path))
    assert len(runs) == 1 and "--config" not in runs[0].command
    assert runs[0].output_dir.endswith("default/seed_7")
    with pytest.raises(ValueError):
        expand("python x.py", [1], ["a/c.yaml", "b/c.yaml"], str(tmp_path))


@pytest.mark.parametrize(
    "command, seeds, extra, words",
    [
        ("", [1], [], "--command is empty"),
        ('python phase1_ppo.py "unclosed', [1], [], "not a command line a shell would split"),
        ("python phase1_ppo.py", [], [], "--seeds is empty"),
        ("python phase1_ppo.py", [1, 1], [], "seeds must be distinct"),
        ("python phase1_ppo.py", [1, -1], [], "--seeds [1, -1]: accepted whole numbers 0 <= seed < 2**32"),
        ("python phase1_ppo.py", [1], ["--workers", "0"], "--workers 0: accepted a whole number >= 1"),
        ("python phase1_ppo.py", [1], ["--timeout", "0"], "--timeout 0.0: accepted seconds > 0"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(command, seeds, extra, words):
    code, stderr = run_cli("benchmarks/run.py", "--command", command, "--seeds", *map(str, seeds), *extra)
    assert code == 2 and words in stderr and "Traceback" not in stderr, stderr


def test_print_only_by_default(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(Args(command=f"{PY} -c 'raise SystemExit(1)'", seeds=[1, 2], output_dir=str(out)))
    assert code == 0
    assert not out.exists()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert "--seed 1" in lines[0] and "--seed 2" in lines[1]


def test_flatten_and_aggregate():
    runs = [
        {"a": {"sharpe": 1.0, "n": 3, "name": "x", "curve": [1, 2]}, "timing": {"seconds": 5.0}, "ok": True},
        {"a": {"sharpe": 2.0, "n": 3, "name": "y", "curve": [3]}, "timing": {"seconds": 9.0}, "ok": False},
        {"a": {"sharpe": 6.0, "n": 3}},
    ]
    flat = [flatten(r) for r in runs]
    assert flat[0] == {"a/sharpe": 1.0, "a/n": 3.0}
    table = aggregate(flat)
    assert list(table) == ["a/sharpe", "a/n"]
    s = table["a/sharpe"]
    assert s["mean"] == pytest.approx(3.0) and s["std"] == pytest.approx(2.6457513, rel=1e-6)
    assert (s["min"], s["max"], s["n"]) == (1.0, 6.0, 3)
    assert table["a/n"]["std"] == 0.0
    one = aggregate([{"k": 4.0}])["k"]
    assert (one["mean"], one["std"], one["n"]) == (4.0, 0.0, 1)


def test_failing_run_is_reported(tmp_path, capsys):
    out = tmp_path / "bench"
    args = Args(command=f"{PY} -c 'import sys; sys.exit(3)'", seeds=[1, 2], output_dir=str(out), workers=2, run=True)
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "return code 3" in err
    result = json.loads((out / "results.json").read_text())
    assert [r["returncode"] for r in result["runs"]] == [3, 3]
    assert {r["status"] for r in result["runs"]} == {"failed"}


@pytest.mark.slow
def test_two_seed_phase1_sweep(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml")
    out = tmp_path / "bench"
    args = Args(
        command=f"{PY} phase1_ppo.py {TINY_PPO}",
        seeds=[1, 2],
        configs=[str(config)],
        output_dir=str(out),
        workers=2,
        run=True,
        json=str(tmp_path / "results.json"),
    )
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    for seed in (1, 2):
        assert (out / "tiny" / f"seed_{seed}" / "metrics.json").is_file()
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in result["runs"]] == ["ok", "ok"]
    assert len(result["commands"]) == 2
    table = result["table"]["tiny"]
    sharpe_keys = [k for k in table if k.endswith("sharpe")]
    assert sharpe_keys
    row = table[sharpe_keys[0]]
    assert row["n"] == 2 and "mean" in row and "std" in row
    assert not any(k.startswith("timing") for k in table)
    assert sharpe_keys[0] in printed
    print(printed)


def test_selected_rows_match_globs_summaries_first():
    table = aggregate([{"a/x/sharpe": 1.0, "a/mean_sharpe": 1.0, "a/x/win_rate": 0.5, "a/x/turnover": 2.0}])
    assert selected_rows(table, ["*sharpe", "*win_rate"]) == ["a/mean_sharpe", "a/x/sharpe", "a/x/win_rate"]
    assert selected_rows(table, ["a/x/*"]) == ["a/x/sharpe", "a/x/win_rate", "a/x/turnover"]


def test_a_pipeline_run_is_read_from_its_test_report(tmp_path):
    # a stand-in for pipeline.py: writes OUT/eval/report.json and no metrics.json
    script = tmp_path / "fake_pipeline.py"
    script.write_text(
        "import json, pathlib, sys\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--output-dir') + 1]) / 'eval'\n"
        "out.mkdir(parents=True)\n"
        "seed = int(sys.argv[sys.argv.index('--seed') + 1])\n"
        "(out / 'report.json').write_text(json.dumps({'portfolio': {'sharpe': seed / 10}}))\n"
    )
    code = main(Args(command=f"{PY} {shlex.quote(str(script))}", seeds=[1, 3], output_dir=str(tmp_path / "runs"),
                     run=True))  # fmt: skip
    assert code == 0
    table = json.loads((tmp_path / "runs" / "results.json").read_text())["table"]["default"]
    assert table["portfolio/sharpe"]["mean"] == pytest.approx(0.2) and table["portfolio/sharpe"]["n"] == 2


def fake_report(seed: int) -> dict:
    """A test report with what the trading-quality table reads (the values are made up, per seed)."""
    rule = lambda sharpe, turnover=0.7: {"sharpe": sharpe, "turnover_per_vol": turnover}  # noqa: E731
    paired = lambda d: {"difference": d, "low": d - 0.1, "high": d + 0.1}  # noqa: E731
    system = 4.0 + seed / 5
    return {
        "portfolio": rule(system, 0.8),
        "equal_allocation": rule(3.5),
        "phase2_system": rule(system),
        "baselines": {
            "momentum": rule(3.2),
            "trend_filter": rule(3.3),
            "vol_managed_trend_filter": rule(3.9),
            "vol_managed_equal_allocation": rule(4.1),
        },
        "confidence": {
            "vs_system": {
                "vol_managed_trend_filter": paired(system - 3.9),
                "vol_managed_equal_allocation": paired(system - 4.1),
                "equal_allocation": paired(system - 3.5),
                "phase2_system": paired(0.0),
            }
        },
        "relative_targets": [{"target": ">= vol_managed_trend_filter + 0.3", "pass": system - 3.9 - 0.1 > 0.3}],
        "phase3_best_iteration": seed,
    }


def test_collect_tabulates_finished_pipeline_runs_with_paired_differences(tmp_path, capsys):
    for seed in (1, 3):
        report = tmp_path / "runs" / "default" / f"seed_{seed}" / "eval" / "report.json"
        report.parent.mkdir(parents=True)
        report.write_text(json.dumps(fake_report(seed)))
    code = main(Args(command="python pipeline.py --mode train", seeds=[1, 3], output_dir=str(tmp_path / "runs"),
                     collect=True))  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    quality = json.loads((tmp_path / "runs" / "results.json").read_text())["trading_quality"]
    first, second = quality["seeds"]
    assert first["best_rule"] == "vol_managed_trend_filter" and first["phase3_best_iteration"] == 1
    assert first["differences"]["vol_managed_equal_allocation"]["difference"] == pytest.approx(0.1)
    assert first["differences"]["best_rule"]["low"] == pytest.approx(0.2)
    assert not first["pass"] and second["pass"] and not quality["all_pass"]
    assert quality["system"]["mean"] == pytest.approx(4.4) and "logical cores" in quality["machine"]
    assert "DESIGN 14 NOT met for every seed" in printed and "deflated" not in printed
    # the tally over seeds: seed 1 fails its one check, seed 3 passes it
    assert (quality["checks"], quality["checks_passed"], quality["seeds_passing"]) == (2, 1, 1)
    assert (
        "DESIGN 14 checks passed: 1 of 2; seeds passing every check: 1 of 2; >= vol_managed_trend_filter + 0.3 "
        "fails on seed(s) 1"
    ) in printed


@pytest.mark.parametrize(
    "script, extra, words",
    [
        ("market_calibration", ["--bars", "0"], "--bars 0: accepted a whole number >= 200"),
        ("market_calibration", ["--seed", "-1"], "--seed -1: accepted a whole number 0 <= seed < 2**32"),
        ("risk_limits", ["--split", "tset"], "--split 'tset': accepted train, val or test"),
        ("meta_headroom", ["--runs", "nowhere", "--seeds", "1"], "checkpoint not found: nowhere/seed_1/phase3/best.pt"),
        ("throughput", ["--steps", "0"], "--steps 0: accepted whole numbers >= 1"),
    ],
)
def test_the_other_benchmarks_refuse_bad_input_in_one_paragraph_with_exit_2(script, extra, words):
    """`benchmarks.cli`: a bad flag or a missing run was a traceback (or, for `--bars 0`, a table of zeros)."""
    code, stderr = run_cli(f"benchmarks/{script}.py", *extra)
    assert code == 2 and f"benchmarks.{script}: error: {words}" in stderr and "Traceback" not in stderr, stderr


def test_ctrl_c_in_a_benchmark_is_one_line_with_exit_130(monkeypatch):
    from benchmarks import cli

    def interrupted(args):
        raise KeyboardInterrupt

    @dataclass
    class Flags:
        steps: int = 1

    monkeypatch.setattr(sys, "argv", ["market_calibration"])
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit) as exit_:
        cli(interrupted, Flags, "market_calibration")
    assert exit_.value.code == 130 and err.getvalue() == "benchmarks.market_calibration: interrupted\n"
