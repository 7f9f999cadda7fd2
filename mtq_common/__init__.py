"""MTQuant's shared library: what the phase scripts (`phase1_ppo.py`, `phase2_meta.py`, `phase3_joint.py`) import.

It holds the configuration (`config`), the market data (`market`, `synthetic`, `csv_data`), the causal
features (`features`), the batched trading environments (`envs`) and their Gymnasium adapters
(`gym_env`), the hierarchy of specialists and meta-controller (`hierarchy`), baselines and metrics.
Importing the package registers two Gymnasium ids, `MTQ/Specialist-v0` and `MTQ/Portfolio-v0`, for
`gymnasium.make` (a single-environment adapter) and `gymnasium.make_vec` (the native batched env).

The public API for a trained run is `load_policy(run_dir)` (`mtq_common.policy`): a `Policy` whose
`book(prices, holdings=None, capital=None)` gives the target book of `pipeline.py --mode act`.

The entry points are strings and `mtq_common.policy` imports its heavy dependencies inside its
functions, so this import stays light: torch and the market load only when an environment is made or
a policy loaded.
"""

import gymnasium

from mtq_common.policy import Policy, load_policy

__all__ = ["Policy", "load_policy"]

_ENVIRONMENTS = {
    "MTQ/Specialist-v0": ("SpecialistSingleEnv", "make_specialist_vec"),
    "MTQ/Portfolio-v0": ("PortfolioSingleEnv", "make_portfolio_vec"),
}

for _env_id, (_single, _vector) in _ENVIRONMENTS.items():
    # A module reload or a second import path must not register twice (Gymnasium warns on overrides).
    if _env_id not in gymnasium.registry:
        gymnasium.register(
            id=_env_id,
            entry_point=f"mtq_common.envs.gym_env:{_single}",
            vector_entry_point=f"mtq_common.envs.gym_env:{_vector}",
        )
