"""mtq_common.agents.coordination: PCGrad projection, per-component clipping, update schedule, adaptive rates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtq_common.agents.coordination import (
    AdaptiveLR,
    UpdateSchedule,
    clip_component_,
    clip_components_,
    component_grads,
    grad_norm,
    grad_norms,
    grads_of,
    grads_of_each,
    project_conflict_,
    project_conflicts_,
)
from mtq_common.agents.nets import MetaController, SpecialistAgents
from mtq_common.agents.ppo import FlatAdam, flat_cat


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return torch.nn.functional.cosine_similarity(flat_cat(a), flat_cat(b), dim=0).item()


def random_component(seed: int, shapes=((3, 4), (5,), (2, 2, 2))) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def tiny_hierarchy(seed: int = 0) -> tuple[SpecialistAgents, MetaController]:
    """Two specialists (a, b) with gradients from one backward pass, and a small meta-controller (no grads)."""
    torch.manual_seed(seed)
    agents = SpecialistAgents(["a", "b"], obs_size=5, hidden=4)
    obs = torch.randn(2, 6, 5)
    mean, log_std, value = agents.forward_grouped(obs)
    (mean.pow(2).sum() + value.sum() + log_std.sum()).backward()
    return agents, MetaController(obs_size=3, num_specialists=2, hidden=4)


# ----------------------------------------------------------------------------------------------------------
# PCGrad projection
# ----------------------------------------------------------------------------------------------------------


def test_conflicting_gradients_are_projected_to_the_normal_plane():
    other = random_component(1)
    own = [-0.7 * o + 0.3 * r for o, r in zip(other, random_component(2), strict=True)]
    before = cosine(own, other)
    other_copy = [o.clone() for o in other]
    cos, conflicted = project_conflict_(own, other)
    assert before < -0.5 and cos.item() == pytest.approx(before, abs=1e-6)
    assert conflicted.dtype == torch.bool and conflicted.item()
    assert cosine(own, other) >= -1e-6
    assert abs(cosine(own, other)) < 1e-5  # projected exactly onto the normal plane
    assert all(torch.equal(o, c) for o, c in zip(other, other_copy, strict=True))  # `other` untouched


def test_agreeing_and_zero_gradients_are_left_bit_identical():
    other = random_component(3)
    own = [0.5 * o + 0.3 * r for o, r in zip(other, random_component(4), strict=True)]
    original = [g.clone() for g in own]
    cos, conflicted = project_conflict_(own, other)
    assert cos.item() > 0 and not conflicted.item()
    assert all(torch.equal(g, o) for g, o in zip(own, original, strict=True))

    zeros = [torch.zeros_like(o) for o in other]
    for a, b in ((zeros, other), (own, zeros)):
        keep = [g.clone() for g in a]
        cos, conflicted = project_conflict_(a, b)
        assert cos.item() == 0.0 and not conflicted.item()
        assert all(torch.equal(g, k) for g, k in zip(a, keep, strict=True))
        assert all(torch.isfinite(g).all() for g in a)


def test_projection_lands_in_the_stacked_grad_of_one_specialist_only():
    agents, _ = tiny_hierarchy()
    grads_before = [p.grad.clone() for p in agents.parameters()]
    slice0 = component_grads(agents, 0)
    # A "portfolio" gradient that points against specialist 0's own gradient.
    portfolio = [-g.clone() + 0.1 * torch.randn_like(g) for g in slice0]
    _, conflicted = project_conflict_(slice0, portfolio)
    assert conflicted.item()
    assert cosine(component_grads(agents, 0), portfolio) >= -1e-6
    for p, before in zip(agents.parameters(), grads_before, strict=True):
        assert torch.equal(p.grad[1], before[1])  # specialist 1 untouched
    assert any(
        not torch.equal(p.grad[0], before[0]) for p, before in zip(agents.parameters(), grads_before, strict=True)
    )


def reference_projection_(own: list[torch.Tensor], other: list[torch.Tensor]) -> torch.Tensor:
    """PCGrad on one component written out plainly (float64 sums tensor by tensor): what Phase 3's trained
    weights were measured with. Returns the cosine."""

    def dot(a, b):
        return torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)]).sum()

    d, own_sq, other_sq = dot(own, other), dot(own, own), dot(other, other)
    coef = d / other_sq if d < 0 and own_sq > 1e-24 and other_sq > 1e-24 else torch.zeros((), dtype=torch.float64)
    for g, h in zip(own, other, strict=True):
        g.copy_(g.double() - coef * h.double())
    return (d / (own_sq.sqrt() * other_sq.sqrt()).clamp_min(1e-12)).float()


def reference_clip_(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_`'s rule on one component, written out plainly."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    for g in grads:
        g.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


def test_all_specialists_at_once_equal_the_plain_rules_one_at_a_time_bit_for_bit():
    """Phase 3 projects and clips the K stacked specialists in one pass; the result must be exactly what
    the plain rules give one specialist at a time (the trained weights depend on it), conflicted or not."""
    torch.manual_seed(0)
    shapes = [p.shape for p in SpecialistAgents(["a", "b", "c"], obs_size=32, hidden=64).parameters()]
    conflicts = 0
    for trial in range(20):
        own = [torch.randn(s) * 10.0 ** (trial % 5 - 3) for s in shapes]
        other = [(-1.0 if trial % 2 else 1.0) * g + 3.0 * torch.randn(g.shape) for g in own]
        stacked = [g.clone() for g in own]
        cosines = torch.stack([reference_projection_([g[k] for g in own], [h[k] for h in other]) for k in range(3)])
        cosine_all, conflicted = project_conflicts_(stacked, other)
        assert torch.equal(cosines, cosine_all)
        assert all(torch.equal(a, b) for a, b in zip(own, stacked, strict=True))
        conflicts += int(conflicted.sum())
        assert torch.equal(grad_norms(stacked), torch.stack([grad_norm([g[k] for g in own]) for k in range(3)]))
        norms = torch.stack([reference_clip_([g[k] for g in own], max_norm=1.0) for k in range(3)])
        assert torch.equal(norms, clip_components_(stacked, max_norm=1.0))
        assert all(torch.equal(a, b) for a, b in zip(own, stacked, strict=True))
    assert 10 <= conflicts < 60  # both branches were taken
    meta = [torch.randn(s) for s in shapes]  # one component (the meta-controller's path)
    single = [g.clone() for g in meta]
    assert torch.equal(reference_clip_(meta, 1.0), clip_component_(single, 1.0))
    assert all(torch.equal(a, b) for a, b in zip(meta, single, strict=True))


def test_specialist_slice_projected_against_a_meta_gradient():
    """A specialist slice projected against a meta-controller gradient laid out in the slice's shapes.

    (The two networks have different shapes; Phase 3 projects a specialist's own gradient against its
    portfolio gradient, both in specialist shapes. Here the meta gradient is tiled onto that layout.)
    """
    agents, meta = tiny_hierarchy(seed=1)
    meta.get_value(torch.randn(4, 3)).sum().backward()
    meta_flat = flat_cat(component_grads(meta))
    slice0 = component_grads(agents, 0)
    sizes = [g.numel() for g in slice0]
    # Tile the meta gradient to specialist 0's size and negate it: a shared direction in conflict.
    tiled = -meta_flat.repeat(sum(sizes) // meta_flat.numel() + 1)[: sum(sizes)] - flat_cat(slice0)
    other = [t.view_as(g) for t, g in zip(tiled.split(sizes), slice0, strict=True)]
    before1 = [p.grad[1].clone() for p in agents.parameters()]
    _, conflicted = project_conflict_(slice0, other)
    assert conflicted.item()
    assert cosine(component_grads(agents, 0), other) >= -1e-6
    assert all(torch.equal(p.grad[1], b) for p, b in zip(agents.parameters(), before1, strict=True))


# ----------------------------------------------------------------------------------------------------------
# Components and clipping
# ----------------------------------------------------------------------------------------------------------


def test_component_grads_are_views_and_skip_parameters_without_grad():
    agents, meta = tiny_hierarchy()
    assert component_grads(meta) == []  # no backward through the meta-controller yet
    comp = component_grads(agents, 1)
    assert len(comp) == len(list(agents.parameters()))
    assert all(g.data_ptr() == p.grad[1].data_ptr() for g, p in zip(comp, agents.parameters(), strict=True))
    agents.log_std.grad = None
    assert len(component_grads(agents, 0)) == len(list(agents.parameters())) - 1
    assert grad_norm([]).item() == 0.0 and flat_cat([]).numel() == 0


def test_clipping_bounds_each_component_and_leaves_small_ones_alone():
    agents, _ = tiny_hierarchy()
    for p in agents.parameters():
        p.grad[0].mul_(100.0)  # specialist 0 large, specialist 1 small
        p.grad[1].mul_(1e-3)
    small_before = [g.clone() for g in component_grads(agents, 1)]
    norm0 = grad_norm(component_grads(agents, 0))
    returned = clip_component_(component_grads(agents, 0), max_norm=1.0)
    assert returned.item() == pytest.approx(norm0.item()) and norm0.item() > 1.0
    assert grad_norm(component_grads(agents, 0)).item() <= 1.0 + 1e-6
    assert grad_norm(component_grads(agents, 0)).item() == pytest.approx(1.0, rel=1e-5)
    small_norm = clip_component_(component_grads(agents, 1), max_norm=1.0)
    assert small_norm.item() < 1.0
    assert all(torch.equal(g, b) for g, b in zip(component_grads(agents, 1), small_before, strict=True))


# ----------------------------------------------------------------------------------------------------------
# Update schedule
# ----------------------------------------------------------------------------------------------------------


def test_gradients_of_each_loss_on_two_threads_equal_them_in_sequence_bit_for_bit():
    """Phase 3's three backward passes through one forward graph, one of them on a second thread: the
    gradients of each loss, `.grad` untouched, zeros for parameters a loss does not reach, and bit for
    bit what the passes give one after the other (each op runs single-threaded either way)."""
    torch.manual_seed(3)
    agents = SpecialistAgents(["a", "b", "c"], obs_size=7, hidden=16)
    params = list(agents.parameters())
    owner = torch.tensor([0, 1, 1, 2])
    for _ in range(3):
        mean, log_std, value = agents.forward_per_slot(torch.randn(64, 4, 7), owner)
        losses = [(mean * torch.randn_like(mean)).mean(), (mean.pow(2) * log_std).mean(), value.pow(2).mean()]
        together = grads_of_each(losses, params)
        apart = [grads_of(loss, params, retain=True) for loss in losses]
        for got, want in zip(together, apart, strict=True):
            assert all(torch.equal(g, h) for g, h in zip(got, want, strict=True))
        for got, want in zip(grads_of_each(losses, params, concurrent=False), apart, strict=True):
            assert all(torch.equal(g, h) for g, h in zip(got, want, strict=True))
    critic = {id(p) for p in agents.critic.parameters()}
    assert all(not g.any() for p, g in zip(params, together[0], strict=True) if id(p) in critic)  # unreached: 0
    assert all(p.grad is None for p in params)


def test_update_schedule_frequencies():
    schedule = UpdateSchedule(meta_update_freq=1, specialist_update_freq=5)
    assert [i for i in range(1, 21) if schedule.specialists(i)] == [5, 10, 15, 20]
    assert all(schedule.meta(i) for i in range(1, 21))
    with pytest.raises(ValueError, match="specialist_update_freq"):
        UpdateSchedule(1, 0)


def test_adam_steps_specialists_only_on_their_iterations():
    agents, meta = tiny_hierarchy()
    optimizer = FlatAdam(  # Phase 3's optimiser
        [
            {"params": list(meta.parameters()), "name": "meta"},
            {"params": list(agents.parameters()), "name": "specialists"},
        ],
        lr=1e-2,
    )
    schedule = UpdateSchedule(1, 5)
    obs, meta_obs = torch.randn(2, 6, 5), torch.randn(4, 3)
    changed_specialists, changed_meta = [], []
    for iteration in range(1, 11):
        spec_before = [p.detach().clone() for p in agents.parameters()]
        meta_before = [p.detach().clone() for p in meta.parameters()]
        optimizer.zero_grad()
        mean, log_std, value = agents.forward_grouped(obs)  # every parameter gets a gradient
        _, meta_logprob, _, meta_value = meta.get_action_and_value(meta_obs)
        spec_loss = mean.pow(2).sum() + value.pow(2).sum() + log_std.sum()
        (spec_loss + meta_logprob.sum() + meta_value.pow(2).sum()).backward()
        if not schedule.specialists(iteration):
            for p in agents.parameters():
                p.grad = None  # Adam skips parameters without a gradient
        if not schedule.meta(iteration):
            for p in meta.parameters():
                p.grad = None
        optimizer.step()
        after = list(agents.parameters())
        changed_specialists.append(any(not torch.equal(a, b) for a, b in zip(after, spec_before, strict=True)))
        changed_meta.append(any(not torch.equal(a, b) for a, b in zip(meta.parameters(), meta_before, strict=True)))
    assert [i for i, c in enumerate(changed_specialists, 1) if c] == [5, 10]
    assert all(changed_meta)


# ----------------------------------------------------------------------------------------------------------
# Adaptive learning rates
# ----------------------------------------------------------------------------------------------------------


def test_adaptive_rates_fall_recover_and_stay_in_bounds():
    base = {"meta": 1e-3, "specialists": 3e-4}
    lr = AdaptiveLR(base, decrease=0.5, increase=2.0, min_scale=0.1, max_scale=1.0, tolerance=0.1, window=1)
    assert lr.rates() == base
    assert lr.step(1.0) == base  # first evaluation: nothing to compare with, at the upper bound
    fallen = lr.step(0.5)
    assert all(fallen[k] == pytest.approx(0.5 * base[k]) for k in base)
    for sharpe in (0.0, -0.5, -1.0, -1.5, -2.0, -2.5):
        lr.step(sharpe)  # keeps falling: floored at min_scale
    assert all(lr.rates()[k] == pytest.approx(0.1 * base[k]) for k in base)
    recovered = lr.step(1.0)  # a recovery: rates rise by `increase`
    assert all(recovered[k] == pytest.approx(0.2 * base[k]) for k in base)
    for _ in range(5):
        lr.step(2.0)
    assert lr.rates() == base  # capped at max_scale
    for sharpe in (-1.0, 3.0, float("nan"), 0.0, 3.5, 1.0):
        rates = lr.step(sharpe)
        assert all(0.1 * base[k] - 1e-15 <= rates[k] <= base[k] + 1e-15 for k in base)


def test_adaptive_rates_do_not_ratchet_down_on_a_flat_noisy_series():
    """Validation Sharpe that only fluctuates (N(2, 0.1)) must not drive the rates to their floor, as a
    comparison with the best Sharpe ever seen did (mean scale 0.1 within 12 validations)."""
    for seed in range(5):
        lr = AdaptiveLR({"meta": 1.0})
        series = np.random.default_rng(seed).normal(2.0, 0.1, 60)
        scales = [lr.step(v)["meta"] for v in series]
        assert np.mean(scales[12:]) > 0.6, (seed, np.mean(scales[12:]))
        assert scales[-1] > 0.4
    # ... while a real, lasting fall still cuts them, and a recovery brings them back
    lr = AdaptiveLR({"meta": 1.0})
    for v in (2.0, 2.05, 1.95, 2.0, 1.0, 0.9, 1.05, 0.95):
        lr.step(v)
    assert lr.rates()["meta"] <= 0.25
    for v in (2.0, 2.1, 1.95, 2.05, 2.0):
        lr.step(v)
    assert lr.rates()["meta"] == 1.0


def test_adaptive_rates_tolerance_state_dict_and_apply():
    lr = AdaptiveLR({"meta": 1e-3, "specialists": 1e-3}, tolerance=0.2, window=1)
    lr.step(1.0)
    assert lr.step(0.85)["meta"] == pytest.approx(1e-3)  # within tolerance: not a fall
    assert lr.step(0.6)["meta"] == pytest.approx(5e-4)
    state = lr.state_dict()
    assert state == {"scales": {"meta": 0.5, "specialists": 0.5}, "history": [1.0, 0.85, 0.6]}
    restored = AdaptiveLR({"meta": 1e-3, "specialists": 1e-3}, tolerance=0.2, window=1)
    restored.load_state_dict(state)
    assert restored.rates() == lr.rates() and restored.step(0.1) == lr.step(0.1)

    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    groups = [{"params": [params[0]], "name": "meta"}, {"params": [params[1]], "name": "specialists"}]
    optimizer = torch.optim.Adam([*groups, {"params": [params[2]]}], lr=1.0)
    lr.apply(optimizer, ["meta"], factor=0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.5 * lr.rates()["meta"]), 1.0, 1.0]
    lr.apply(optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [lr.rates()["meta"], lr.rates()["specialists"], 1.0]
    with pytest.raises(KeyError, match="critic"):
        lr.apply(optimizer, ["critic"])
