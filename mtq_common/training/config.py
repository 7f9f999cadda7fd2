"""Typed configuration: `config/agents.yaml` supplies defaults, explicit CLI flags override them.

The file has the seed's sections (`training`, `environment`, `reward`) plus `risk`, `instruments`,
`specialists` and `data`. Every section is a dataclass below, with its defaults; `settings.load_config`
reads a YAML file into them and `settings.validate` checks every value. Unknown keys, wrong types and
out-of-range values raise `ConfigError` with a message that names the file and the key.

Every script reads its flags through `mtq_common.training.settings.parse_args`, which takes the file's values as
the defaults of the script's tyro `Args` and writes the final values back into the `Config`. One
precedence rule everywhere: built-in default < YAML file < CLI flag.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "config" / "agents.yaml"


class ConfigError(ValueError):
    """A bad configuration value: the message names the file, the key, the value and what is accepted."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingConfig:
    """PPO hyperparameters and run sizes (the seed's `training` section)."""

    learning_rate: float = 0.0003
    minibatch_size: int = 256
    """PPO minibatch size: rollout rows per gradient step (the seed's and SB3's `batch_size`, still read as a
    deprecated alias; CleanRL's `batch_size` is the whole rollout)."""
    n_epochs: int = 10
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    phase_1_timesteps: int = 500_000
    phase_2_timesteps: int = 300_000
    phase_3_timesteps: int = 1_000_000
    phase_3_learning_rate: float = 0.00003
    """Phase 3's rate (both levels; the specialists at `--specialist-lr-scale` of it): a tenth of `learning_rate`,
    which Phases 1 and 2 use (docs/benchmarks.md: picked on validation)."""
    meta_update_freq: int = 1
    specialist_update_freq: int = 5
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`."""
    n_envs: int = 64
    """Environment rows per policy (each specialist, or the portfolio) stepped in one batch."""


@dataclass
class EnvironmentConfig:
    """Trading mechanics and the hard portfolio limits (the seed's `environment` section)."""

    episode_length: int = 1000
    warmup_steps: int = 50
    """Bars at the start of an episode's history used to warm up the reward's moving moments."""
    initial_capital: float = 100_000.0
    transaction_cost: float = 0.003
    """Cost per unit of turnover (|w - w_prev| summed over instruments)."""
    max_position_size: float = 0.1
    stop_loss_pct: float = 0.02
    max_portfolio_var: float = 0.02
    max_correlation_exposure: float = 0.7
    max_sector_allocation: float = 0.4


@dataclass
class RewardConfig:
    """Reward shaping weights (the seed's `reward` section); each one has an effect."""

    risk_penalty_weight: float = 1.0
    transaction_cost_weight: float = 1.0
    diversification_bonus_weight: float = 0.5
    sharpe_target: float = 2.0
    max_drawdown_target: float = 0.15
    risk_free_rate: float = 0.02
    downside_volatility_weight: float = 1.0


@dataclass
class RiskConfig:
    """Risk model settings."""

    var_confidence: float = 0.95
    correlation_window: int = 100
    """Span (bars) of the exponentially weighted covariance."""


@dataclass
class InstrumentSpec:
    """One tradable symbol: its sector (= asset class = specialist) and synthetic-market parameters."""

    sector: str
    annual_vol: float = 0.15
    """Annualised volatility of the synthetic path (ignored for CSV data)."""
    cost: float | None = None
    """Cost per unit of turnover of this instrument (default: `environment.transaction_cost` x `cost_multiplier`)."""
    cost_multiplier: float = 1.0
    """Scales `transaction_cost` for this instrument (ignored when `cost` is set)."""
    signal: float = 1.0
    """Multiplies the synthetic latent drift of this instrument (0: a pure-noise instrument)."""
    driver: float = 0.0
    """Loading in [0, 1] of the synthetic path on one common driver shared by every instrument with a loading
    (`mtq_common.data.synthetic`; 0: none, the built-in market)."""
    contract_size: float = 1.0
    """Units of the instrument in one contract (`pipeline.py --mode act` rounds units to whole contracts)."""
    spot: bool = False
    """A spot (cash) instrument, e.g. a stock's adjusted close: a long position spends cash that would earn
    `reward.risk_free_rate` and a short one earns it, so its returns pay that rate (`MarketData.financing`).
    False: a future or CFD, whose price moves need no cash (the built-in market)."""


@dataclass
class SyntheticConfig:
    """Synthetic market generator settings (see `mtq_common.data.synthetic`)."""

    seed: int = 7
    """Market seed; train, validation and test paths come from three different streams of it."""
    train_bars: int = 20_000
    val_bars: int = 5_000
    test_bars: int = 5_000
    drift_half_life: float = 60.0
    """Half-life in bars of the latent AR(1) drift."""
    drift_scale: float = 3.0
    """Stationary std of the latent drift, in units of the instrument's volatility (annualised)."""


AS_WRITTEN = "as_written"
"""`data.csv.timezone` value: keep every time's clock time as written in the file and drop its UTC offset."""


@dataclass
class CsvConfig:
    """How the CSV files are written (see `mtq_common.data.csv_file`)."""

    delimiter: str = ","
    """The character between columns: `;` for many European exports, `"\\t"` for tab-separated files."""
    decimal: str = "."
    """The decimal mark of the prices: `.` (101.25) or `,` (101,25)."""
    dayfirst: bool = False
    """Read 01/02/2020 as 1 February (dates that start with a four-digit year are always year-month-day)."""
    date_format: str | None = None
    """The strftime format of the time column, e.g. `%d.%m.%Y %H:%M` (unset: inferred from the first row)."""
    timezone: str | None = None
    """Zone that times with a UTC offset are converted to before aligning, e.g. `UTC` or `America/New_York`;
    times without an offset are taken as times in it. `as_written`: keep the clock times written in the files
    and drop their offsets (daily bars stamped at each exchange's local midnight). Unset: offsets converted to
    UTC, and files with and without offsets are not mixed."""


@dataclass
class DataConfig:
    """Where the market comes from and how it is split."""

    source: str = "synthetic"
    """`synthetic` (built-in generator) or `csv` (`data_dir/<SYMBOL>.csv`)."""
    data_dir: str | None = None
    instruments: list[str] = field(
        default_factory=lambda: ["EURUSD", "GBPUSD", "USDJPY", "XAUUSD", "WTIUSD", "SPX500", "NAS100", "US30"]
    )
    """Instruments traded, in column order."""
    splits: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    """Train / validation / test fractions for CSV data (split by time)."""
    folds: int = 0
    """Walk-forward folds (`pipeline.py --mode walkforward` sets it; 0: the plain splits above)."""
    fold: int = 0
    """Which walk-forward fold this run trains and tests (0 to folds - 1; see `mtq_common.data.splits`)."""
    allow_partial_overlap: bool = False
    """Accept CSV files whose common period (they are aligned on the timestamps they all share) keeps less
    than half of some file's rows; refused by default, since it usually means one file starts much later."""
    csv: CsvConfig = field(default_factory=CsvConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


def default_instruments() -> dict[str, InstrumentSpec]:
    """The built-in registry: symbol -> sector and annual volatility (DESIGN section 3)."""
    table = {
        "EURUSD": ("forex", 0.07),
        "GBPUSD": ("forex", 0.08),
        "USDJPY": ("forex", 0.08),
        "XAUUSD": ("commodities", 0.15),
        "WTIUSD": ("commodities", 0.35),
        "SPX500": ("equity", 0.17),
        "NAS100": ("equity", 0.22),
        "US30": ("equity", 0.16),
    }
    return {sym: InstrumentSpec(sector=sec, annual_vol=vol) for sym, (sec, vol) in table.items()}


@dataclass
class Config:
    """The whole configuration."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    risk: RiskConfig = field(default_factory=RiskConfig)
    instruments: dict[str, InstrumentSpec] = field(default_factory=default_instruments)
    """Registry of known symbols; the YAML section adds to (or overrides) the built-in one."""
    specialists: list[str] = field(default_factory=lambda: ["forex", "commodities", "equity"])
    """Specialists in order; each trades the instruments whose sector has its name."""
    data: DataConfig = field(default_factory=DataConfig)
    source_path: str = "<defaults>"
    """Where the values came from (for error messages); not a YAML key."""

    # -- derived views ------------------------------------------------------------------------
    def sector_of(self, symbol: str) -> str:
        return self.instruments[symbol].sector

    def active_specialists(self) -> list[str]:
        """Specialists that own at least one traded instrument (others are skipped)."""
        sectors = {self.sector_of(s) for s in self.data.instruments}
        return [name for name in self.specialists if name in sectors]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source_path")
        return out

    def hash(self) -> str:
        """Stable short hash of every value that changes what is trained (resume refuses a mismatch)."""
        payload = hashed_values(self.to_dict())
        payload["training"]["batch_size"] = payload["training"].pop("minibatch_size")  # renamed: the same hash
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def hashed_values(config: dict) -> dict:
    """What `Config.hash` hashes: `config` (a `Config.to_dict()`, or the record of one that an older run kept)
    without what does not change what is trained, and without keys added after runs were started while they hold
    their defaults, so that those runs still resume and a resume's message names only real differences."""
    payload = _plain(config)  # (a copy, in the types a JSON record reads back: a manifest's, a checkpoint's)
    training = payload.get("training", {})
    training.pop("device", None)
    for spec in payload.get("instruments", {}).values():
        spec.pop("contract_size", None)  # how a book is rounded to contracts, not what is trained
        if spec.get("driver", 0.0) == 0.0:
            spec.pop("driver", None)
        if not spec.get("spot", False):
            spec.pop("spot", None)  # (added later: futures, as before)
    data = payload.get("data", {})
    if data.get("csv") == _plain(dataclasses.asdict(CsvConfig())):
        data.pop("csv")
    if not data.get("allow_partial_overlap", False):
        data.pop("allow_partial_overlap", None)
    if "batch_size" in training:  # (the key's name in runs started before it was renamed)
        training["minibatch_size"] = training.pop("batch_size")
    if training.get("phase_3_learning_rate") == training.get("learning_rate"):
        training.pop("phase_3_learning_rate", None)  # (before the key, Phase 3 trained at learning_rate)
    return payload


def _plain(values: dict) -> dict:
    """`values` as JSON reads it back (tuples as lists, other objects as their text): what `Config.hash` serialises."""
    return json.loads(json.dumps(values, default=str))
