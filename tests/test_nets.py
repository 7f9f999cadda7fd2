"""The stacked specialists and the meta-controller: the one-network paths (the actor alone, the critic alone)
give the full forward's values, bit for bit."""

import math

import torch

from mtq_common.agents.nets import (
    MetaController,
    SpecialistAgents,
    Tanh,
    affine,
    start_with_learned_estimates,
    tanh,
)


def test_one_network_per_slot_gives_the_full_forwards_values_bit_for_bit():
    """`mean_per_slot` (positions, the rollouts that only trade) skips the critic and `value_per_slot` the
    actor; they must give the very values `forward_per_slot` gives, so that skipping either changes no
    trained model."""
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
    assert torch.equal(agents.value_per_slot(obs, owner), value)  # and the critic alone (Phase 3's bootstrap)
    assert torch.equal(agents.positions(obs, owner), agents.to_position(mean, obs))
    # a slot's mean uses its owner's weights: another owner changes it
    assert not torch.equal(agents.mean_per_slot(obs, torch.tensor([1, 0, 1, 2, 2]))[:, 0], mean[:, 0])


def test_a_specialist_with_a_start_rule_starts_at_the_rule_and_keeps_it_in_its_checkpoint():
    """`start_rule`: the action mean is the scaled trend's target read from the raw observation plus the actor's
    residual (0 here), in Phase 1's grouped rows and in the per-slot paths; `describe` carries it to a loader."""
    torch.manual_seed(0)
    rule = {"half_life": 20, "scale": 0.5, "index": 1}
    agents = SpecialistAgents(["a", "b"], obs_size=4, hidden=8, start_rule=rule)  # (the residual starts at 0)
    obs = 3 * torch.randn(2, 9, 4)
    target = (0.5 * obs[..., 1]).clamp(-1.0, 1.0)
    assert torch.equal(agents.forward_grouped(obs)[0], target)
    at_mean = agents.get_action_and_value(obs, target)[1]  # the density's peak: the rule is the mean
    assert torch.allclose(at_mean, (-agents.log_std.view(2, 1) - 0.5 * math.log(2 * math.pi)).expand_as(at_mean))
    owner = torch.tensor([0, 1, 1])
    slots = 3 * torch.randn(5, 3, 4)
    assert torch.equal(agents.mean_per_slot(slots, owner), (0.5 * slots[..., 1]).clamp(-1.0, 1.0))
    # a residual moves the mean away from the rule, by the actor's output
    with torch.no_grad():
        agents.actor[-1].bias.fill_(0.25)
    assert torch.allclose(agents.mean_per_slot(slots, owner), (0.5 * slots[..., 1]).clamp(-1.0, 1.0) + 0.25)
    rebuilt = SpecialistAgents.from_spec(agents.describe())
    assert rebuilt.start_rule == rule
    assert SpecialistAgents.from_spec(SpecialistAgents(["a"], obs_size=4).describe()).start_rule is None


def test_a_start_with_learned_estimates_acts_as_the_start_and_values_as_the_trained_network():
    """`start_with_learned_estimates` (what `best.pt` holds where a phase keeps its start): a starting point's
    weights with a trained network's normaliser and critic act exactly as the start, since a start's actor ends in
    zero weights, and value as the trained network; `rows` limits it to those specialists' slices."""
    torch.manual_seed(4)
    start = MetaController(obs_size=6, num_specialists=3, hidden=8)
    trained = MetaController(obs_size=6, num_specialists=3, hidden=8)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.3 * torch.randn_like(p))
    trained.norm.update(2 * torch.randn(1, 40, 6) + 1)
    merged = MetaController(obs_size=6, num_specialists=3, hidden=8)
    merged.load_state_dict(start_with_learned_estimates(start.state_dict(), trained.state_dict()))
    obs = 3 * torch.randn(11, 6)
    assert torch.equal(merged.action_mean(obs), start.action_mean(obs))
    assert torch.equal(merged.get_value(obs), trained.get_value(obs))
    assert not torch.equal(merged.get_value(obs), start.get_value(obs))

    rule = {"half_life": 20, "scale": 0.5, "index": 1}
    start, trained = (SpecialistAgents(["a", "b"], obs_size=4, hidden=8, start_rule=rule) for _ in range(2))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.3 * torch.randn_like(p))
    trained.norm.update(2 * torch.randn(2, 40, 4) + 1)
    merged = SpecialistAgents(["a", "b"], obs_size=4, hidden=8, start_rule=rule)
    merged.load_state_dict(start_with_learned_estimates(start.state_dict(), trained.state_dict(), rows=[1]))
    obs = 3 * torch.randn(2, 9, 4)
    assert torch.equal(merged.forward_grouped(obs)[0], start.forward_grouped(obs)[0])  # both act as the rule
    values, start_values, trained_values = (x.get_value(obs) for x in (merged, start, trained))
    assert torch.equal(values[0], start_values[0]) and torch.equal(values[1], trained_values[1])


def test_specialists_that_kept_their_start_trade_as_fresh_ones_whatever_else_they_learned():
    """`trades_start_rule` (pipeline.py fits Phase 2's start beside Phase 1 over fresh specialists, and Phase 2 uses
    those fits only where it holds): true for a fresh start and for one whose hidden layers, normaliser and critic
    moved, which trade the same positions bit for bit; false once the actor's output layer moves, for another
    spec, or without a start rule."""
    torch.manual_seed(2)
    rule = {"half_life": 20, "scale": 0.5, "index": 1}
    fresh = SpecialistAgents(["a", "b"], obs_size=4, hidden=8, position_rate=0.3, position_index=3, start_rule=rule)
    kept = SpecialistAgents(["a", "b"], obs_size=4, hidden=8, position_rate=0.3, position_index=3, start_rule=rule)
    with torch.no_grad():
        for p in [*kept.actor[:-1].parameters(), *kept.critic.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    kept.norm.update(2 * torch.randn(2, 40, 4) + 1)
    spec = fresh.describe()
    assert fresh.trades_start_rule(spec) and kept.trades_start_rule(spec)
    owner, obs = torch.tensor([0, 1, 1]), 3 * torch.randn(5, 3, 4)
    assert torch.equal(kept.positions(obs, owner), fresh.positions(obs, owner))
    assert not kept.trades_start_rule({**spec, "start_rule": {**rule, "scale": 0.25}})
    assert not kept.trades_start_rule({**spec, "position_rate": 1.0})
    with torch.no_grad():
        kept.actor[-1].weight[0, 0, 0] = 1e-6  # one trained weight: the residual is no longer 0
    assert not kept.trades_start_rule(spec)
    plain = SpecialistAgents(["a", "b"], obs_size=4, hidden=8)
    assert not plain.trades_start_rule(plain.describe())


def test_the_critic_alone_gives_the_full_forwards_value_bit_for_bit():
    """Phase 1's bootstrap takes `get_value` (the critic alone) on grouped rows: the values of
    `forward_grouped`, so that skipping the actor changes no trained model."""
    torch.manual_seed(1)
    agents = SpecialistAgents(["a", "b"], obs_size=5, hidden=8)
    with torch.no_grad():
        for p in agents.parameters():
            p.add_(0.3 * torch.randn_like(p))
    agents.norm.update(2 * torch.randn(2, 40, 5) - 1)
    obs = torch.randn(2, 9, 5)  # [K, R, F]
    mean, _, value = agents.forward_grouped(obs)
    assert value.shape == (2, 9) and not torch.equal(mean, value)
    assert torch.equal(agents.get_value(obs), value)


def test_the_meta_controllers_actor_alone_gives_the_full_forwards_mean_bit_for_bit():
    """Evaluation's `deterministic` (every validation and backtest of the hierarchy) takes the actor alone
    (`action_mean`): the mean of `heads`, without the critic's work."""
    torch.manual_seed(2)
    meta = MetaController(obs_size=6, num_specialists=3, hidden=8)
    with torch.no_grad():
        for p in meta.parameters():
            p.add_(0.3 * torch.randn_like(p))  # the actor's head starts at zero weights
    meta.norm.update(2 * torch.randn(1, 40, 6) + 1)
    obs = torch.randn(11, 6)
    mean, value = meta.heads(obs)
    assert mean.shape == (11, 4) and value.shape == (11,)
    assert torch.equal(meta.action_mean(obs), mean)
    assert torch.equal(meta.deterministic(obs), mean)


def test_the_meta_controllers_sample_from_drawn_noise_is_dist_sample_bit_for_bit():
    """Phase 3's rollout draws the sample's noise itself (outside its compiled step) and passes it as `noise`:
    the same action, log-probability and generator state as `dist.sample()` inside."""
    torch.manual_seed(3)
    meta = MetaController(obs_size=6, num_specialists=3, hidden=8)
    with torch.no_grad():
        for p in meta.parameters():
            p.add_(0.3 * torch.randn_like(p))
    obs = torch.randn(64, 6)
    torch.manual_seed(7)
    inside = meta.get_action_and_value(obs)
    after_inside = torch.randn(3)
    torch.manual_seed(7)
    drawn = meta.get_action_and_value(obs, noise=torch.randn(64, 4))
    for x, y in zip(inside, drawn, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(torch.randn(3), after_inside)


def test_the_activation_is_tanh_to_float32_rounding_with_its_gradient():
    """`nets.tanh` computes tanh as 2 sigmoid(2x) - 1 (faster on the CPU): the same function and the same
    derivative to float32 rounding, saturating at +-1 as tanh does, and every hidden layer of both networks
    uses it."""
    x = torch.linspace(-30.0, 30.0, 20001, requires_grad=True)
    y = tanh(x)
    torch.testing.assert_close(y, torch.tanh(x), atol=3e-7, rtol=0.0)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, 1 - torch.tanh(x.detach()) ** 2, atol=1e-6, rtol=0.0)
    assert y.detach().abs().max() == 1.0 and torch.equal(tanh(torch.zeros(3)), torch.zeros(3))
    meta = MetaController(obs_size=5, num_specialists=3, hidden=8)
    assert not any(isinstance(m, torch.nn.Tanh) for m in meta.modules())
    assert sum(isinstance(m, Tanh) for m in meta.modules()) == 4


def test_a_stacked_layer_with_one_output_is_the_batched_matmul_to_float32_rounding_with_its_gradients():
    """`nets.affine` computes a single output column as a dot product per row (torch's CPU `bmm` is slow there):
    the same values and gradients as `torch.baddbmm` to float32 rounding; wider layers are `baddbmm` itself."""
    torch.manual_seed(0)
    x = torch.randn(3, 50, 16, requires_grad=True)
    for out in (1, 4):
        weight = torch.randn(3, 16, out, requires_grad=True)
        bias = torch.randn(3, 1, out, requires_grad=True)
        y = affine(bias, x, weight)
        ref = torch.baddbmm(bias, x, weight)
        if out > 1:
            assert torch.equal(y, ref)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(y.square().sum(), (x, weight, bias))
        expected = torch.autograd.grad(ref.square().sum(), (x, weight, bias))
        for g, e in zip(grads, expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-5)
    agents = SpecialistAgents(["a", "b"], obs_size=6, hidden=8)
    obs, owner = torch.randn(4, 3, 6), torch.tensor([0, 1, 1])
    mean, _, value = agents.forward_per_slot(obs, owner)
    x_norm = agents._normalised(obs, owner)
    h = tanh(agents.critic[1].per_slot(tanh(agents.critic[0].per_slot(x_norm, owner)), owner))
    last = agents.critic[2]
    slots = h.transpose(0, 1)  # [N, rows, hidden]
    expected_value = torch.baddbmm(last.bias[owner], slots, last.weight[owner]).transpose(0, 1).squeeze(-1)
    torch.testing.assert_close(value, expected_value, atol=1e-5, rtol=1e-5)
