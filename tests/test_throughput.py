"""benchmarks.throughput: the environment rows and the training section on tiny sizes (no timing asserted)."""

from benchmarks import throughput
from tests.helpers import write_config


def test_env_and_training_sections_report_what_ran(tmp_path):
    args = throughput.Args(
        sections=("env", "training"),
        batch_sizes=(8,),
        steps=2,
        warmup=1,
        devices=("cpu", "cuda"),
        config=str(write_config(tmp_path / "c.yaml")),
        training_timesteps=(512, 256, 256),
        script_flags="--num-envs 8 --num-steps 32 --batch-size 64 --n-epochs 1",
        json=str(tmp_path / "t.json"),
    )
    out = throughput.main(args)
    env_rows = [r for r in out["results"] if r["benchmark"] in ("env", "kernel")]
    assert {r["name"] for r in env_rows} == {"specialist", "portfolio", "portfolio_step", "risk_step"}
    training = [r for r in out["results"] if r["benchmark"] == "training"]
    assert [r["name"] for r in training] == ["phase1", "phase2", "phase3"]
    # the scripts' own step counts: 2 iterations of 8 rows x 32 steps (Phase 1), 1 iteration after
    assert [r["timesteps"] for r in training] == [512, 256, 256]
    assert all(r["steps_per_second"] > 0 and r["wall_seconds"] >= r["loop_seconds"] for r in training)
    # minibatches counted by the scripts: iterations x epochs x (rows per iteration / batch size)
    assert [r["minibatches"] for r in training] == [8, 4, 4]
    assert all(r["ms_per_minibatch"] > 0 and r["rollout_seconds"] + r["update_seconds"] <= r["loop_seconds"]
               for r in training)  # fmt: skip
    assert out["devices"]["train"]["name"] and (tmp_path / "t.json").is_file()
