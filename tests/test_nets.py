"""The stacked specialists' per-slot evaluation: the actor-only path gives the full forward's mean."""

import torch

from mtq_common.nets import SpecialistAgents


def test_the_actor_alone_gives_the_full_forwards_mean_bit_for_bit():
    """`mean_per_slot` (positions, the rollouts that only trade) skips the critic; its mean must be the
    very values `forward_per_slot` gives, so that skipping the critic changes no trained model."""
    torch.manual_seed(0)
    agents = SpecialistAgents(["a", "b", "c"], obs_size=6, hidden=8, position_rate=0.5, position_index=2)
    with torch.no_grad():
        for p in agents.parameters():
            p.add_(0.3 * torch.randn_like(p))  # away from the initialisation's zeros
    agents.norm.update(3 * torch.randn(3, 50, 6) + 1)
    owner = torch.tensor([0, 0, 1, 2, 2])
    obs = torch.randn(7, 5, 6)
    mean, log_std, value = agents.forward_per_slot(obs, owner)
    assert mean.shape == value.shape == (7, 5) and log_std.shape == (5,)
    assert not torch.equal(mean, value)
    assert torch.equal(agents.mean_per_slot(obs, owner), mean)
    assert torch.equal(agents.positions(obs, owner), agents.to_position(mean, obs))
    # a slot's mean uses its owner's weights: another owner changes it
    assert not torch.equal(agents.mean_per_slot(obs, torch.tensor([1, 0, 1, 2, 2]))[:, 0], mean[:, 0])
