"""mtq_common.ppo.FlatAdam: Adam's updates bit for bit, each parameter group stepped as one tensor."""

import pytest
import torch

from mtq_common.nets import MetaController, SpecialistAgents
from mtq_common.ppo import FlatAdam


def networks(seed: int = 0) -> tuple[SpecialistAgents, MetaController]:
    torch.manual_seed(seed)
    return SpecialistAgents(["a", "b", "c"], obs_size=32, hidden=64), MetaController(obs_size=40, num_specialists=3)


def test_the_same_updates_as_adam_bit_for_bit():
    flat_nets, plain_nets = networks(), networks()
    keys = [list(net.state_dict()) for net in flat_nets]

    def groups(nets):
        return [{"params": list(net.parameters()), "name": name} for net, name in zip(nets, ("s", "m"), strict=True)]

    flat = FlatAdam(groups(flat_nets), lr=3e-4, eps=1e-5)
    plain = torch.optim.Adam(groups(plain_nets), lr=3e-4, eps=1e-5)
    assert [list(net.state_dict()) for net in flat_nets] == keys  # the modules keep their parameters' names
    for step in range(60):
        g = torch.Generator().manual_seed(step)
        for opt, nets in ((flat, flat_nets), (plain, plain_nets)):
            opt.zero_grad()
            for net in nets:
                for p in net.parameters():  # gradients of every scale; the specialists skip odd steps
                    skip = step % 2 and isinstance(net, SpecialistAgents)
                    p.grad = None if skip else torch.randn(p.shape, generator=g) * 10.0 ** (step % 7 - 4)
            opt.step()
            g = torch.Generator().manual_seed(step)
        for a, b in zip(flat_nets, plain_nets, strict=True):
            assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True)), step
    assert not torch.equal(networks()[0].actor[0].weight, flat_nets[0].actor[0].weight)  # they did move


def test_a_group_with_some_gradients_missing_is_refused_and_the_state_round_trips():
    agents, _ = networks()
    optimizer = FlatAdam(agents.parameters(), lr=1e-3)
    for p in agents.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    agents.log_std.grad = None
    with pytest.raises(ValueError, match="1 of 13 parameters of a group have no gradient"):
        optimizer.step()
    again = FlatAdam(networks()[0].parameters(), lr=1e-3)
    again.load_state_dict(optimizer.state_dict())
    assert torch.equal(again.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    per_parameter = torch.optim.Adam(networks()[0].parameters(), lr=1e-3).state_dict()  # an older checkpoint
    with pytest.raises(ValueError, match=r"holds \[13\] tensors per parameter group.*one flat tensor"):
        again.load_state_dict(per_parameter)
