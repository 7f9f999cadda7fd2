"""mtq_common.agents.ppo.gae and its bootstrap values: a truncated row continues from V(final observation), and
`truncated_values` computes that value only where a row was truncated."""

import torch

from mtq_common.agents.nets import SpecialistAgents
from mtq_common.agents.ppo import gae, truncated_values


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


def test_truncated_values_are_the_full_passes_values_where_truncated_and_zero_elsewhere():
    """The bootstrap over the truncated rows alone gives what a forward pass over the whole rollout gives there
    (so GAE is unchanged), zeros elsewhere, with the value's own trailing shape; a rollout with no truncation
    calls the network on an empty batch."""
    torch.manual_seed(0)
    agents = SpecialistAgents(["a", "b", "c"], obs_size=6, hidden=8)
    owner = torch.tensor([0, 0, 1, 2, 2])
    final_obs = torch.randn(16, 4, 5, 6)  # [steps, rows, slots, features]
    truncs = torch.zeros(16, 4)
    truncs[3, 1] = truncs[9, 0] = truncs[15, 3] = 1.0
    value = lambda obs: agents.value_per_slot(obs, owner)  # noqa: E731

    got = truncated_values(truncs, value, final_obs)
    full = value(final_obs.flatten(0, 1)).view(16, 4, 5)
    done = truncs.bool()
    assert got.shape == (16, 4, 5)
    assert torch.equal(got[done], full[done]) and not got[~done].any()
    none = truncated_values(torch.zeros(16, 4), value, final_obs)
    assert none.shape == (16, 4, 5) and not none.any()
    # parts that are None (a meta-controller without risk evidence) pass through as None
    assert truncated_values(
        truncs, lambda obs, missing: value(obs) if missing is None else None, final_obs, None
    ).shape == (16, 4, 5)
