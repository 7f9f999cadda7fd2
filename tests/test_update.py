"""The compiled update and environment step (`--compile`) against the eager reference: the same arithmetic,
rounded differently, so the same weights, statistics and environment states to float32 precision."""

import pytest
import torch

from mtq_common.agents.coordination import clip_component_, clip_components_
from mtq_common.agents.nets import MetaController, SpecialistAgents
from mtq_common.agents.ppo import FlatAdam, clipped_surrogate, minibatches, normalise
from mtq_common.agents.update import JointUpdate, PPOUpdate
from mtq_common.training.distributed import World
from tests.helpers import random_books, restarting_portfolio_pair, restarting_specialist_pair

ROWS, OBS = 64, 6
OWNER = torch.tensor([0, 0, 1, 2])  # four instrument slots, three specialists


def close(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=msg)


def world_of(ranks: int, monkeypatch) -> tuple[World, list]:
    """One process, or two ranks with the same data: then the all-reduce is the identity, and the compiled update
    runs as under torchrun (two graphs around it). The stand-in records what it was given."""
    if ranks == 1:
        return World(), []
    given = []

    def average_(tensors, world):
        given.append([t.shape for t in tensors])

    monkeypatch.setattr("mtq_common.agents.update.distributed.average_", average_)
    return World(size=ranks), given


def specialist_setup():
    torch.manual_seed(0)
    agent = SpecialistAgents(["a", "b", "c"], OBS, hidden=8)
    optimizer = FlatAdam(agent.parameters(), lr=1e-2, eps=1e-5)

    def loss_fn(obs, actions, logprobs, advantages, returns):  # Phase 1's form
        _, newlogprob, entropy, value = agent.get_action_and_value(obs, actions)
        pg_loss, approx_kl, clipfrac = clipped_surrogate(newlogprob, logprobs, normalise(advantages), 0.2)
        loss = pg_loss - 0.01 * entropy.mean() + 0.5 * ((value - returns) ** 2).mean()
        return loss, (pg_loss.detach(), clipfrac)

    return agent, optimizer, loss_fn


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_compiled_ppo_update_matches_the_eager_one(ranks, monkeypatch):
    """Phase 1's form (stacked specialists, each clipped on its own); with 2 ranks, the gradients reach the
    all-reduce per parameter and the two compiled graphs (gradients, then Adam) agree with eager."""
    world, given = world_of(ranks, monkeypatch)
    g = torch.Generator().manual_seed(1)
    rollout = (torch.randn(3, ROWS, OBS, generator=g), torch.randn(3, ROWS, generator=g),
               torch.randn(3, ROWS, generator=g) - 1, torch.randn(3, ROWS, generator=g),
               torch.randn(3, ROWS, generator=g))  # fmt: skip
    results = []
    for compiled in (False, True):
        agent, optimizer, loss_fn = specialist_setup()
        update = PPOUpdate([agent], optimizer, loss_fn, lambda grads: clip_components_(grads, 0.5), world, compiled,
                           batch_dim=1)  # fmt: skip
        torch.manual_seed(2)
        stats = [update(mb, *rollout) for _ in range(2) for mb in minibatches(ROWS, 16, "cpu")]
        results.append((agent.state_dict(), optimizer.state_dict(), stats))
    (eager, eager_opt, eager_stats), (fused, fused_opt, fused_stats) = results
    for key in eager:
        close(fused[key], eager[key], key)
    assert not torch.equal(eager["actor.0.weight"], specialist_setup()[0].state_dict()["actor.0.weight"])  # moved
    for key in ("exp_avg", "exp_avg_sq", "step"):
        close(fused_opt["state"][0][key], eager_opt["state"][0][key], key)
    for a, b in zip(eager_stats, fused_stats, strict=True):
        close(torch.stack(b), torch.stack(a))
    if ranks == 2:  # every minibatch (two epochs of four), eager and compiled, one gradient per parameter
        shapes = [p.shape for p in specialist_setup()[0].parameters()]
        assert given == [shapes] * (2 * 2 * (ROWS // 16))


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_compiled_joint_update_matches_the_eager_one(ranks, monkeypatch):
    """Phase 3's two levels: the meta gradient, the specialists' three objectives kept apart (one batched pass
    compiled, three passes eager), the conflict projection, the clipping and Adam on both groups; with 2 ranks,
    the compiled update's two graphs around the all-reduce."""
    world, given = world_of(ranks, monkeypatch)
    g = torch.Generator().manual_seed(3)
    meta_rollout = (torch.randn(ROWS, 10, generator=g), torch.randn(ROWS, 4, generator=g),
                    torch.randn(ROWS, generator=g) - 4, torch.randn(ROWS, generator=g),
                    torch.randn(ROWS, generator=g))  # fmt: skip
    specialist_rollout = (torch.randn(ROWS, 4, OBS, generator=g), torch.randn(ROWS, 4, generator=g),
                          torch.randn(ROWS, 4, generator=g) - 1, meta_rollout[3], torch.randn(ROWS, 4, generator=g),
                          torch.randn(ROWS, 4, generator=g))  # fmt: skip
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        specialists, meta = SpecialistAgents(["a", "b", "c"], OBS, hidden=8), MetaController(10, 3, hidden=8)
        optimizer = FlatAdam([{"params": list(meta.parameters())}, {"params": list(specialists.parameters())}],
                             lr=1e-2, eps=1e-5)  # fmt: skip

        def meta_loss(obs, actions, logprobs, advantages, returns, meta=meta):
            _, newlogprob, _, value = meta.get_action_and_value(obs, actions)
            pg_loss, _, _ = clipped_surrogate(newlogprob, logprobs, normalise(advantages), 0.2)
            return pg_loss + 0.5 * ((value - returns) ** 2).mean(), (pg_loss.detach(),)

        def policy(obs, actions, logprobs, portfolio_adv, own_adv, _returns, specialists=specialists):
            mean, log_std = specialists.mean_per_slot(obs, OWNER), specialists.log_std[OWNER, 0, 0]
            logprob = torch.distributions.Normal(mean, log_std.exp().expand_as(mean)).log_prob(actions)
            port, _, _ = clipped_surrogate(
                logprob, logprobs, normalise(portfolio_adv).unsqueeze(-1).expand_as(mean), 0.2
            )
            own, _, _ = clipped_surrogate(logprob, logprobs, normalise(own_adv), 0.2)
            return torch.stack([0.5 * port, 0.5 * own]), torch.stack([port, own]).detach()

        def value(obs, _actions, _logprobs, _portfolio_adv, _own_adv, returns, specialists=specialists):
            return 0.5 * ((specialists.value_per_slot(obs, OWNER) - returns) ** 2).mean()

        update = JointUpdate(meta, specialists, optimizer, meta_loss, policy, value, 0.5, True, world, compiled)
        torch.manual_seed(4)
        stats = [update(mb, meta_rollout, specialist_rollout, True, i % 2 == 0)
                 for i, mb in enumerate(minibatches(ROWS, 16, "cpu"))]  # fmt: skip
        results.append((meta.state_dict(), specialists.state_dict(), stats))
    (eager_meta, eager_spec, eager_stats), (fused_meta, fused_spec, fused_stats) = results
    for key in eager_meta:
        close(fused_meta[key], eager_meta[key], f"meta.{key}")
    for key in eager_spec:
        close(fused_spec[key], eager_spec[key], f"specialists.{key}")
    conflicts = 0
    for (m_a, s_a, c_a), (m_b, s_b, c_b) in zip(eager_stats, fused_stats, strict=True):
        close(m_b[0], m_a[0])
        assert (s_a is None) == (s_b is None) and c_a.keys() == c_b.keys()
        if s_a is not None:
            close(s_b, s_a)
            conflicts += int(c_a["conflicts"].sum())
        for key in c_a:
            close(c_b[key].float(), c_a[key].float(), key)
    assert conflicts > 0  # the projection was exercised
    if ranks == 2:  # compiled: one exchange of the meta gradients and the specialists' three objectives
        meta_shapes, spec_shapes = ([p.shape for p in m.parameters()] for m in (meta, specialists))
        assert meta_shapes + 3 * spec_shapes in given and meta_shapes in given


def test_the_clip_rules_agree_with_clip_grad_norm():
    grads = [torch.randn(3, 4) * 5, torch.randn(5) * 5]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    mine = [g.clone() for g in grads]
    clip_component_(mine, 1.0)
    for p, g in zip(params, mine, strict=True):
        close(g, p.grad)


@pytest.mark.parametrize("observe", [True, False])
def test_the_compiled_portfolio_step_matches_the_eager_one(observe):
    """The step before the autoreset compiled, the autoreset eager: the same rewards, books, risk and
    observations over many restarts."""
    eager, fused, gen = restarting_portfolio_pair(compiled=True)
    restarts = 0
    for _ in range(30):
        weights = random_books(gen)
        a, b = eager.step(weights, observe=observe), fused.step(weights, observe=observe)
        restarts += int(a[3].sum())
        close(b[1], a[1], "reward")
        assert torch.equal(a[3], b[3])
        for key in ("net_return", "executed_weights", "var", "correlation_exposure", "equity", "bar_returns"):
            close(b[4][key], a[4][key], key)
        if observe:
            for key in a[0]:
                close(b[0][key], a[0][key], key)
    for key, value in eager.observe().items():
        close(fused.observe()[key], value, key)
    assert restarts > 20


@pytest.mark.parametrize("diagnostic", [False, True])
def test_the_compiled_specialist_step_matches_the_eager_one(diagnostic):
    """`SpecialistEnv(compiled=True)`: the step before the autoreset compiled, the autoreset eager; the same
    rewards, positions, stop-losses and observations over many restarts (with the look-ahead test aid too)."""
    eager, fused, gen = restarting_specialist_pair(next_return_diagnostic=diagnostic)
    restarts = 0
    for _ in range(30):
        actions = torch.rand(eager.num_envs, 1, generator=gen) * 2 - 1
        a, b = eager.step(actions), fused.step(actions)
        restarts += int(a[3].sum())
        close(b[0], a[0], "obs")
        close(b[1], a[1], "reward")
        assert torch.equal(a[3], b[3])
        for key in ("net_return", "position", "equity", "drawdown", "stop_loss"):
            close(b[4][key], a[4][key], key)
        close(b[4]["final_obs"], a[4]["final_obs"], "final_obs")
    close(fused.observe(), eager.observe(), "observe")
    assert restarts > 20
