"""mtq_common.agents.ppo.gae: a truncated row continues from V(final observation), and its chain restarts."""

import torch

from mtq_common.agents.ppo import gae


def test_gae_bootstraps_a_truncated_row_from_its_final_value_and_restarts_the_chain():
    """Two steps, one row truncated after step 0: step 0's target uses V(final obs) = 5, not V(step 1) = 3, and
    step 1's advantage does not flow back into step 0."""
    rewards = torch.tensor([[1.0], [2.0]])
    values = torch.tensor([[0.5], [3.0]])
    final_values = torch.tensor([[5.0], [-7.0]])  # (read only where truncated: step 0)
    truncs = torch.tensor([[1.0], [0.0]])
    adv = gae(rewards, values, final_values, torch.tensor([4.0]), truncs, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv[0], torch.tensor([1.0 + 0.9 * 5.0 - 0.5]))
    torch.testing.assert_close(adv[1], torch.tensor([2.0 + 0.9 * 4.0 - 3.0]))
