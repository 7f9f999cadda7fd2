"""mtq_common.agents.ppo.gae: a truncated row continues from V(final observation), and its chain restarts."""

import torch

from mtq_common.agents import ppo
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


def test_at_truncations_values_only_the_truncated_rows_and_gae_is_unchanged():
    """`at_truncations` evaluates V(final obs) only where a row was truncated (zero elsewhere, where `gae` never
    reads it), for `[S, B]` rollouts and Phase 1's `[S, K, R]`, with trailing value dims, and with no truncation
    at all; the advantages equal those from valuing every final observation."""
    gen = torch.Generator().manual_seed(0)
    critic = torch.nn.Linear(5, 3)
    for shape in [(6, 4), (6, 2, 3)]:
        final_obs = torch.randn(*shape, 5, generator=gen)
        truncs = (torch.rand(shape, generator=gen) < 0.3).float()
        truncs.view(-1)[0] = 1.0
        calls = []

        def value(obs, calls=calls):
            calls.append(len(obs))
            return critic(obs)

        with torch.no_grad():
            out = ppo.at_truncations(value, truncs, final_obs)
            full = critic(final_obs)
        assert calls == [int(truncs.sum())] and out.shape == full.shape
        torch.testing.assert_close(out[truncs.bool()], full[truncs.bool()])
        assert (out[~truncs.bool()] == 0).all()
        rewards, values = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        next_value = torch.randn(shape[1:], generator=gen)
        torch.testing.assert_close(gae(rewards, values, out[..., 0], next_value, truncs, 0.9, 0.8),
                                   gae(rewards, values, full[..., 0], next_value, truncs, 0.9, 0.8))  # fmt: skip
    none = ppo.at_truncations(lambda obs: critic(obs).sum(-1), torch.zeros(4, 2), torch.randn(4, 2, 5))
    assert none.shape == (4, 2) and (none == 0).all()
