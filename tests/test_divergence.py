"""A diverged policy stops training with a clear error naming the phase, the step and the row (DESIGN section 5)."""

import pytest
import torch

import phase2_meta
from mtq_common.agents.nets import MetaController
from mtq_common.agents.ppo import DivergenceGuard
from tests.helpers import SMALL


def test_finite_proposals_pass():
    guard = DivergenceGuard("phase 1", "cpu")
    for step in range(5):
        guard.watch(torch.randn(8, 3), step)
        guard.watch(torch.full((8, 1), 1e30), step)  # large is not diverged
    guard.raise_if_diverged()


def test_the_first_non_finite_proposal_is_named_by_phase_step_and_row():
    guard = DivergenceGuard("phase 3", "cpu")
    guard.watch(torch.zeros(6, 4), 10)
    bad = torch.zeros(6, 4)
    bad[2, 1] = float("nan")
    guard.watch(bad, 20)
    later = torch.zeros(6, 4)
    later[0, 0] = float("inf")
    guard.watch(later, 30)  # a later one does not replace the first
    with pytest.raises(ValueError, match=r"phase 3: .*step 20 \(row 2\)"):
        guard.raise_if_diverged()


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_infinite_proposals_count_as_diverged(bad):
    guard = DivergenceGuard("phase 1", "cpu")
    proposal = torch.zeros(4, 1)
    proposal[3, 0] = bad
    guard.watch(proposal, 7)
    with pytest.raises(ValueError, match=r"step 7 \(row 3\)"):
        guard.raise_if_diverged()


def phase2_args(config, phase1_dir, tmp_path) -> phase2_meta.Args:
    return phase2_meta.Args(config=str(config), output_dir=str(tmp_path / "p2"), log_dir=str(tmp_path / "l2"),
                            specialists_dir=str(phase1_dir), device="cpu", progress=False,
                            **{**SMALL, "timesteps": 512})  # fmt: skip


def test_nan_actions_stop_phase_2_naming_the_phase_step_and_row(tiny_phases, tmp_path, monkeypatch):
    """The meta-controller's sampled actions turn NaN: Phase 2 stops after the rollout with an error naming
    the phase, the step and the row, before any update and before a checkpoint of the poisoned iteration.

    (The policy's own distribution is evaluated on the finite part of the observation, so that the
    guard's wiring is what is tested; the next test lets the NaN reach the distribution too.)"""
    _, config, (phase1_dir, _) = tiny_phases
    original = MetaController.get_action_and_value

    def poisoned(self, obs, action=None, noise=None):
        u, logprob, entropy, value = original(self, torch.nan_to_num(obs), action, noise)
        return torch.full_like(u, float("nan")), logprob, entropy, value

    monkeypatch.setattr(MetaController, "get_action_and_value", poisoned)
    with pytest.raises(ValueError, match=r"phase 2: .*non-finite.*step 8 \(row 0\)"):  # the first step: 8 rows
        phase2_meta.main(phase2_args(config, phase1_dir, tmp_path))
    assert not (tmp_path / "p2" / "latest.pt").exists()


def test_nan_actions_from_a_diverged_meta_controller_stop_phase_2_with_a_clear_error(
    tiny_phases, tmp_path, monkeypatch
):
    """The NaN book poisons the env and the next observations; the distributions do not raise on NaN
    (`validate_args=False`), so the guard's error, naming the phase, is what the user sees."""
    _, config, (phase1_dir, _) = tiny_phases
    original = MetaController.get_action_and_value

    def poisoned(self, obs, action=None, noise=None):
        u, logprob, entropy, value = original(self, obs, action, noise)
        return torch.full_like(u, float("nan")), logprob, entropy, value

    monkeypatch.setattr(MetaController, "get_action_and_value", poisoned)
    with pytest.raises(ValueError, match="phase 2"):
        phase2_meta.main(phase2_args(config, phase1_dir, tmp_path))
