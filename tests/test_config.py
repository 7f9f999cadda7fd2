"""Configuration: the seed's defaults, precedence (defaults < YAML < CLI), and clear errors."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from mtq_common.training.config import Config, ConfigError, CsvConfig
from mtq_common.training.settings import load_config, parse_args

REPO = Path(__file__).resolve().parent.parent
SEED_VALUES = {
    "training": dict(
        learning_rate=0.0003,
        minibatch_size=256,
        n_epochs=10,
        gamma=0.99,
        gae_lambda=0.95,
        clip_range=0.2,
        phase_1_timesteps=500000,
        phase_2_timesteps=300000,
        phase_3_timesteps=1000000,
        meta_update_freq=1,
        specialist_update_freq=5,
        device="auto",
    ),
    "environment": dict(
        episode_length=1000,
        warmup_steps=50,
        initial_capital=100000,
        transaction_cost=0.003,
        max_position_size=0.1,
        stop_loss_pct=0.02,
        max_portfolio_var=0.02,
        max_correlation_exposure=0.7,
        max_sector_allocation=0.4,
    ),
    "reward": dict(
        risk_penalty_weight=1.0,
        transaction_cost_weight=1.0,
        diversification_bonus_weight=0.5,
        sharpe_target=2.0,
        max_drawdown_target=0.15,
        risk_free_rate=0.02,
        downside_volatility_weight=1.0,
    ),
    "risk": dict(var_confidence=0.95, correlation_window=100),
}


@dataclass
class Args:
    config: str | None = None
    """YAML file."""
    timesteps: int = 0
    """Environment steps."""
    learning_rate: float = 0.0
    """Adam learning rate."""
    num_envs: int = 1
    """Environment rows."""
    seed: int = 1
    """Seed."""


@pytest.mark.parametrize("source", ["builtin", "yaml"])
def test_defaults_are_the_seed_values(source):
    cfg = Config() if source == "builtin" else load_config(REPO / "config" / "agents.yaml")
    for section, values in SEED_VALUES.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
    assert cfg.specialists == ["forex", "commodities", "equity"]
    assert [cfg.sector_of(s) for s in cfg.data.instruments] == ["forex"] * 3 + ["commodities"] * 2 + ["equity"] * 3


def test_yaml_file_equals_builtin_defaults():
    a = dataclasses.asdict(load_config(REPO / "config" / "agents.yaml"))
    b = dataclasses.asdict(Config())
    a.pop("source_path"), b.pop("source_path")
    assert a == b


def test_precedence_defaults_yaml_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 0.001\n  n_envs: 8\n  phase_1_timesteps: 1234\n")
    args, cfg = parse_args(Args, aliases={"timesteps": "training.phase_1_timesteps"}, argv=["--config", str(path)])
    assert args.learning_rate == 0.001 and cfg.training.learning_rate == 0.001
    assert args.num_envs == 8 and args.timesteps == 1234
    assert cfg.training.gamma == 0.99  # untouched key keeps the built-in default
    args, cfg = parse_args(
        Args,
        aliases={"timesteps": "training.phase_1_timesteps"},
        argv=["--config", str(path), "--learning-rate", "0.01", "--timesteps", "99"],
    )
    assert args.learning_rate == 0.01 and cfg.training.learning_rate == 0.01
    assert args.timesteps == 99 and cfg.training.phase_1_timesteps == 99
    assert args.num_envs == 8


def test_user_can_add_a_symbol(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "instruments:\n  DAX40: {sector: equity, annual_vol: 0.18}\ndata:\n  instruments: [DAX40, SPX500]\n"
    )
    cfg = load_config(path)
    assert cfg.sector_of("DAX40") == "equity" and cfg.instruments["DAX40"].annual_vol == 0.18
    assert cfg.active_specialists() == ["equity"]
    assert cfg.sector_of("EURUSD") == "forex"  # the built-in registry is kept


@pytest.mark.parametrize(
    "text, words",
    [
        ("training:\n  lerning_rate: 0.1\n", ["training.lerning_rate", "unknown key"]),
        ("trainig:\n  learning_rate: 0.1\n", ["trainig", "unknown section"]),
        ("training:\n  minibatch_size: abc\n", ["training.minibatch_size", "whole number"]),
        ("training:\n  gamma: 1.5\n", ["training.gamma", "1.5"]),
        ("training:\n  phase_1_timesteps: -5\n", ["training.phase_1_timesteps", "-5"]),
        ("training:\n  phase_3_learning_rate: 0\n", ["training.phase_3_learning_rate", "0 < value < 1"]),
        ("environment:\n  max_portfolio_var: 1.5\n", ["environment.max_portfolio_var", "(0, 1]"]),
        ("environment:\n  max_sector_allocation: 0\n", ["environment.max_sector_allocation"]),
        ("reward:\n  risk_penalty_weight: -1\n", ["reward.risk_penalty_weight"]),
        ("data:\n  instruments: [EURUSD, FOO]\n", ["FOO", "instruments"]),
        ("instruments:\n  FOO: {annual_vol: 0.2}\n", ["instruments.FOO", "sector"]),
        ("data:\n  splits: [0.5, 0.5]\n", ["data.splits"]),
        ("data:\n  synthetic:\n    sed: 3\n", ["data.synthetic.sed"]),
        ("training: [1, 2]\n", ["training", "mapping"]),
        (
            "instruments:\n  EURUSD: {sector: forex, cost: -0.001}\n",
            ["instruments.EURUSD.cost", "-0.001", "0 <= value"],
        ),
        ("instruments:\n  EURUSD: {sector: forex, cost: fast}\n", ["instruments.EURUSD.cost", "number"]),
        ("data:\n  source: csv\n", ["data.data_dir", "--data-dir"]),
        ("data:\n  allow_partial_overlap: 1\n", ["data.allow_partial_overlap", "true or false"]),
        ("data:\n  csv:\n    delimeter: ';'\n", ["data.csv.delimeter", "unknown key", "delimiter"]),
        ("data:\n  csv:\n    delimiter: ';;'\n", ["data.csv.delimiter", "one character"]),
        ("data:\n  csv:\n    decimal: 'x'\n", ["data.csv.decimal", "'.' or ','"]),
        ("data:\n  csv:\n    decimal: ','\n", ["data.csv.decimal", "data.csv.delimiter", "';'"]),
        ("data:\n  csv:\n    dayfirst: maybe\n", ["data.csv.dayfirst", "true or false"]),
        ("data:\n  csv:\n    date_format: '%Y-%q'\n", ["data.csv.date_format", "'%d/%m/%Y'"]),
        ("data:\n  csv:\n    date_format: 'YYYY-MM-DD'\n", ["data.csv.date_format", "strftime"]),
        ("data:\n  csv: {dayfirst: true, date_format: '%d/%m/%Y'}\n", ["data.csv.dayfirst", "one of them"]),
        ("data:\n  csv:\n    timezone: Mars/Olympus\n", ["data.csv.timezone", "Mars/Olympus", "as_written"]),
        ("training:\n  device: cudaX\n", ["training.device", "'cudaX'", "cuda:N"]),
        ("training:\n  device: 'cuda:x'\n", ["training.device", "cuda:N"]),
        ("specialists: [forex, forex, commodities, equity]\n", ["specialists", "no repeated name"]),
        ("instruments:\n  EURUSD: {sector: forex, annual_vol: .inf}\n", ["instruments.EURUSD.annual_vol", "finite"]),
        ("environment:\n  initial_capital: .inf\n", ["environment.initial_capital", "finite"]),
        ("instruments:\n  EURUSD: {sector: forex, signal: .nan}\n", ["instruments.EURUSD.signal", "finite"]),
        ("data:\n  synthetic:\n    drift_scale: .inf\n", ["data.synthetic.drift_scale", "finite"]),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_a_config_that_is_not_text_names_the_file(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(ConfigError, match=f"{path}: not a text file in UTF-8"):
        load_config(path)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_bad_cli_value_is_rejected():
    with pytest.raises(ConfigError, match="training.learning_rate"):
        parse_args(Args, argv=["--learning-rate", "-1"])


def test_hash_changes_with_values_not_with_device():
    a, b = Config(), Config()
    assert a.hash() == b.hash()
    b.training.device = "cpu"
    assert a.hash() == b.hash()
    b.reward.risk_penalty_weight = 2.0
    assert a.hash() != b.hash()


def test_per_instrument_costs_reach_every_env(tmp_path):
    """`instruments.SYMBOL.cost` is the cost per unit of turnover of that instrument; the others keep
    `transaction_cost` x `cost_multiplier`; the curriculum's market multiplier scales all of them."""
    import dataclasses

    from mtq_common.data.splits import load_splits
    from mtq_common.data.tables import cost_rates

    path = tmp_path / "costs.yaml"
    path.write_text("environment:\n  transaction_cost: 0.0004\ninstruments:\n  EURUSD: {sector: forex, cost: 0.0001}\n"
                    "  WTIUSD: {sector: commodities, cost_multiplier: 2.0}\n")  # fmt: skip
    cfg = load_config(path)
    market = load_splits(cfg)["val"]
    rates = dict(zip(market.symbols, cost_rates(market, cfg, "cpu").tolist(), strict=True))
    assert rates["EURUSD"] == pytest.approx(0.0001) and rates["WTIUSD"] == pytest.approx(0.0008)
    assert rates["SPX500"] == pytest.approx(0.0004)
    harder = cost_rates(dataclasses.replace(market, cost_multiplier=1.5), cfg, "cpu")
    assert harder[0].item() == pytest.approx(0.00015)


def test_csv_options_are_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  allow_partial_overlap: true\n  csv:\n    delimiter: \"\\t\"\n    decimal: ','\n"
                    "    date_format: '%d.%m.%Y'\n    timezone: Europe/London\n")  # fmt: skip
    cfg = load_config(path)
    assert cfg.data.allow_partial_overlap is True
    assert cfg.data.csv == CsvConfig(delimiter="\t", decimal=",", date_format="%d.%m.%Y", timezone="Europe/London")
    assert load_config(REPO / "config" / "agents.yaml").data.csv == CsvConfig()


def test_hash_changes_with_the_csv_options():
    a, b = Config(), Config()
    b.data.csv.dayfirst = True
    assert a.hash() != b.hash()
    c = Config()
    c.data.allow_partial_overlap = True
    assert c.hash() != a.hash()


@dataclass
class DataArgs:
    config: str | None = None
    """YAML file."""
    data_dir: str | None = None
    """Folder of <SYMBOL>.csv files."""


def test_csv_source_in_yaml_takes_the_folder_from_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  source: csv\n")
    args, cfg = parse_args(DataArgs, argv=["--config", str(path), "--data-dir", str(tmp_path / "prices")])
    assert cfg.data.source == "csv" and cfg.data.data_dir == str(tmp_path / "prices")
    with pytest.raises(ConfigError, match="data.source is csv but data.data_dir is not set") as err:
        parse_args(DataArgs, argv=["--config", str(path)])
    assert "--data-dir" in str(err.value)
    # --data-dir alone (the built-in synthetic source in the file) reads the CSV files.
    args, cfg = parse_args(DataArgs, argv=["--data-dir", str(tmp_path / "prices")])
    assert cfg.data.source == "csv" and cfg.data.data_dir == str(tmp_path / "prices")


def test_batch_size_is_a_deprecated_name_of_minibatch_size(tmp_path):
    """`--batch-size` and the YAML key `training.batch_size` still work, each with a deprecation line, and mean
    the minibatch (`minibatch_size`); the rename leaves the config hash, so runs started before it resume."""
    import phase1_ppo

    with pytest.warns(FutureWarning, match="--batch-size is deprecated"):
        args, cfg = parse_args(phase1_ppo.Args, argv=["--batch-size", "64"])
    assert args.minibatch_size == 64 and args.batch_size is None and cfg.training.minibatch_size == 64
    path = tmp_path / "old.yaml"
    path.write_text("training:\n  batch_size: 128\n")
    with pytest.warns(FutureWarning, match="training.batch_size is deprecated"):
        assert load_config(path).training.minibatch_size == 128
    path.write_text("training:\n  batch_size: 128\n  minibatch_size: 64\n")
    with pytest.raises(ConfigError, match="same setting"):
        load_config(path)
    before = Config()  # the default config before the rename, and before Phase 3 had its own rate
    before.training.phase_3_learning_rate = before.training.learning_rate
    assert before.hash() == "69d0e6103b13bab5"
    assert Config().hash() != before.hash()  # (a run started then trained Phase 3 at another rate)


def test_the_config_file_is_read_once_per_process(tmp_path):
    """A phase start parses the flags (the file's values as defaults) and builds its config again in `start_run`;
    the pipeline does so for every phase: the file is read once, and read again only once edited."""
    from mtq_common.training.settings import config_from_args, read_yaml

    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 0.001\n")
    read_yaml.cache_clear()
    args, cfg = parse_args(Args, argv=["--config", str(path)])
    again = config_from_args(args)
    assert read_yaml.cache_info().misses == 1 and again.training.learning_rate == cfg.training.learning_rate == 0.001
    path.write_text("training:\n  learning_rate: 0.0002\n")  # edited (another size): read again
    assert load_config(path).training.learning_rate == 0.0002 and read_yaml.cache_info().misses == 2


def test_a_resume_message_names_only_the_keys_the_config_hash_reads():
    """An older run's record (before `spot` and the `minibatch_size` rename, on another device) differs from the
    current config in one trained value: the refusal names that value alone, not the key added since at its
    default (it listed `spot: '<absent>' in the run, False now` for every instrument), the renamed key or the
    device, none of which changes the hash."""
    from mtq_common.training.checkpoint import CheckpointError, check_config_hash
    from mtq_common.training.config import hashed_values

    cfg = Config()
    old = cfg.to_dict()
    for spec in old["instruments"].values():
        spec.pop("spot")
    old["training"]["batch_size"] = old["training"].pop("minibatch_size")
    old["training"]["device"] = "cuda:1"
    assert hashed_values(old) == hashed_values(cfg.to_dict())  # the same experiment
    cost = cfg.environment.transaction_cost
    old["environment"]["transaction_cost"] = 2 * cost
    with pytest.raises(CheckpointError) as refused:
        check_config_hash({"config_hash": "0" * 16, "config": old}, cfg.hash(), "latest.pt", config=cfg.to_dict())
    message = str(refused.value)
    assert (
        f"the config differs from the run's: environment.transaction_cost: {2 * cost!r} in the run, {cost!r} now "
        in message
    )
    assert "spot" not in message and "device" not in message and "batch_size" not in message
