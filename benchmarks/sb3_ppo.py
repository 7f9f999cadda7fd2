"""Stable-Baselines3 PPO on `MTQ/Specialist-v0` with the seed's settings: the reference that
`python -m benchmarks.throughput --sections sb3` times side by side with `phase1_ppo.py`.

    python -m benchmarks.sb3_ppo --timesteps 65536 --seed 1

The seed's settings: `n_steps` 2048, minibatch 256, 10 epochs, 8 environments (SB3's `DummyVecEnv` over
`gymnasium.make("MTQ/Specialist-v0")`, one instrument each, the built-in market), learning rate 3e-4,
gamma 0.99, GAE lambda 0.95, clip 0.2, one torch thread, on the CPU. Stable-Baselines3 is not a
dependency of MTQuant: `pip install "stable-baselines3>=2.3,<3"` to run this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import tyro


@dataclass
class Args:
    timesteps: int = 65_536
    """Environment steps (a multiple of 8 x 2048 trains whole rollouts)."""
    seed: int = 1
    """Seed of SB3 and of the environments."""


def main(args: Args) -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    import mtq_common  # noqa: F401 (registers MTQ/Specialist-v0)

    torch.set_num_threads(1)
    env = make_vec_env("MTQ/Specialist-v0", n_envs=8, seed=args.seed)
    model = PPO("MlpPolicy", env, n_steps=2048, batch_size=256, n_epochs=10, learning_rate=3e-4, gamma=0.99,
                gae_lambda=0.95, clip_range=0.2, seed=args.seed, device="cpu", verbose=0)  # fmt: skip
    model.learn(total_timesteps=args.timesteps)


if __name__ == "__main__":
    main(tyro.cli(Args))
