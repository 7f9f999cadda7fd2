"""mtq_common.agents.ppo.FlatAdam: Adam's updates (its tensor form), each parameter group stepped as one tensor;
`WeightAverage`: the moving average of those tensors that Phase 3 validates."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtq_common.agents.nets import MetaController, SpecialistAgents
from mtq_common.agents.ppo import FlatAdam, WeightAverage, flatten_

ROOT = Path(__file__).resolve().parents[1]


def networks(seed: int = 0) -> tuple[SpecialistAgents, MetaController]:
    torch.manual_seed(seed)
    return SpecialistAgents(["a", "b", "c"], obs_size=32, hidden=64), MetaController(obs_size=40, num_specialists=3)


def test_the_same_updates_as_adam():
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
        for a, b in zip(flat_nets, plain_nets, strict=True):  # the tensor form rounds the step size differently
            for p, q in zip(a.parameters(), b.parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9, msg=lambda m, s=step: f"step {s}: {m}")
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


def test_the_state_dict_is_torch_adams_over_the_flat_tensor():
    agents, _ = networks()
    optimizer = FlatAdam(agents.parameters(), lr=1e-3, eps=1e-5)
    flat = flatten_(list(networks()[0].parameters()))
    adam = torch.optim.Adam([flat], lr=1e-3, eps=1e-5)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for p in agents.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        flat.grad = torch.cat([p.grad.reshape(-1) for p in agents.parameters()])
        optimizer.step()
        adam.step()
    ours, theirs = optimizer.state_dict(), adam.state_dict()
    assert ours["param_groups"][0].items() <= theirs["param_groups"][0].items()  # lr, betas, eps, params
    for key in ("step", "exp_avg", "exp_avg_sq"):  # the moments' arithmetic is Adam's, operation for operation
        assert torch.equal(ours["state"][0][key], theirs["state"][0][key]), key
    again = FlatAdam(networks()[0].parameters(), lr=0.5)
    again.load_state_dict(theirs)  # as written by the previous FlatAdam, a torch.optim.Adam over the flat tensor
    assert again.param_groups[0]["lr"] == 1e-3 and again.state_dict()["state"][0]["step"] == 3
    narrower = FlatAdam(SpecialistAgents(["a", "b", "c"], obs_size=32, hidden=32).parameters())
    with pytest.raises(ValueError, match="the networks differ from those that wrote it"):
        narrower.load_state_dict(theirs)


def test_stepping_it_does_not_import_the_compiler():
    # Why it is not a torch.optim.Optimizer: constructing one imports torch._dynamo (1.4-2.0 s per phase script).
    code = (
        "import sys, torch; from mtq_common.agents.ppo import FlatAdam; net = torch.nn.Linear(2, 2); "
        "opt = FlatAdam(net.parameters()); net(torch.ones(1, 2)).sum().backward(); opt.step(); "
        "print('torch._dynamo' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_weight_average_is_a_moving_average_swapped_in_for_a_block_and_its_state_round_trips():
    """`WeightAverage`: after each `update` the average is `decay * average + (1 - decay) * weights`; inside
    `swapped_in` the weights are the average, after it (an error included) the iterate again, bit for bit; decay 0
    swaps nothing; the state round-trips and a decay outside [0, 1) is refused."""
    torch.manual_seed(0)
    weights = [torch.randn(5), torch.randn(3, 2)]
    average, expected = WeightAverage(weights, decay=0.75), [w.clone() for w in weights]
    for _ in range(3):
        with torch.no_grad():
            for w in weights:
                w.add_(torch.randn_like(w))
        average.update()
        expected = [0.75 * e + 0.25 * w for e, w in zip(expected, weights, strict=True)]
    iterate = [w.clone() for w in weights]
    with average.swapped_in():
        for w, e in zip(weights, expected, strict=True):
            torch.testing.assert_close(w, e)
    assert all(torch.equal(w, i) for w, i in zip(weights, iterate, strict=True))
    with pytest.raises(RuntimeError), average.swapped_in():
        raise RuntimeError("a validation that fails")
    assert all(torch.equal(w, i) for w, i in zip(weights, iterate, strict=True))
    copy = WeightAverage([w.clone() for w in weights], decay=0.75)
    copy.load_state_dict(average.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(copy.average, average.average, strict=True))
    off = WeightAverage(weights, decay=0.0)
    for w in weights:
        w.data.mul_(2.0)
    off.update()
    with off.swapped_in():
        assert all(torch.equal(w, 2.0 * i) for w, i in zip(weights, iterate, strict=True))
    with pytest.raises(ValueError, match="decay 1"):
        WeightAverage(weights, decay=1.0)
