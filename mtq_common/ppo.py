"""The PPO pieces every phase script shares: GAE with truncation bootstrapping, an epoch's shuffled
minibatches, the clipped surrogate, the update's TensorBoard tags.

The scripts keep the algorithm in view (rollout, update, logging in CleanRL's order) and call these for the
formulas that must be the same in all three phases.
"""

from __future__ import annotations

import torch


def minibatches(rows: int, batch_size: int, device):
    """One PPO epoch's minibatches, CleanRL's way: a fresh permutation of the `rows` rollout rows, cut into
    index blocks of `batch_size` (the last one shorter when it does not divide)."""
    perm = torch.randperm(rows, device=device)
    for start in range(0, rows, batch_size):
        yield perm[start : start + batch_size]


def gae(rewards, values, final_values, next_value, truncs, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates over a rollout `[S, ...]` (time first).

    `final_values[t]` is V of the final observation of a row whose episode was truncated at step t: the
    episode goes on beyond the data's end or its length limit, so it bootstraps from there, while the GAE
    chain stops at the boundary (the next step belongs to a new episode). `next_value` is V after the last
    step. Episodes never terminate (the market goes on), so nothing is cut to zero.
    """
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        nextvalues = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        # At a truncation the next state of this episode is the final obs, not the reset obs.
        nextvalues = torch.where(truncs[t].bool(), final_values[t], nextvalues)
        delta = rewards[t] + gamma * nextvalues - values[t]
        lastgaelam = delta + gamma * lam * (1.0 - truncs[t]) * lastgaelam
        advantages[t] = lastgaelam
    return advantages


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Advantages over a minibatch to zero mean and unit std."""
    return (x - x.mean()) / (x.std() + 1e-8)


def clipped_surrogate(new_logprob, old_logprob, advantages, clip: float):
    """PPO's clipped policy loss (mean) and the probability ratio."""
    ratio = (new_logprob - old_logprob).exp()
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
    return loss, ratio


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var(target - pred) / Var(target): how much of the returns the critic explains."""
    return (1 - (target - pred).var() / target.var().clamp_min(1e-8)).item()


def update_scalars(learning_rate: float, sps: int, value_loss, policy_loss, entropy, approx_kl, clipfracs: list,
                   explained_var) -> dict:  # fmt: skip
    """CleanRL's `charts/` and `losses/` tags of one PPO update, named alike in every phase so that runs
    compare tag for tag. Tensors (per specialist in Phase 1) are averaged and read here: the one host
    sync of the iteration's logging."""
    return {
        "charts/learning_rate": learning_rate,
        "charts/SPS": sps,
        "losses/value_loss": value_loss.mean().item(),
        "losses/policy_loss": policy_loss.mean().item(),
        "losses/entropy": entropy.mean().item(),
        "losses/approx_kl": approx_kl.mean().item(),
        "losses/clipfrac": torch.stack(clipfracs).mean().item(),
        "losses/explained_variance": float(torch.as_tensor(explained_var).mean()),
    }
