"""The PPO pieces every phase script shares: GAE with truncation bootstrapping, an epoch's shuffled
minibatches, the clipped surrogate, the update's TensorBoard tags, `FlatAdam` (Adam stepping each
parameter group as one tensor), `WeightAverage` (Polyak averaging of those tensors) and `DivergenceGuard`
(a diverged policy stops the run with a clear error instead of trading a NaN book).

The scripts keep the algorithm in view (rollout, update, logging in CleanRL's order) and call these for the
formulas that must be the same in all three phases.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class FlatAdam:
    """Adam (Kingma & Ba, 2015) stepping each parameter group as one flat tensor: `torch.optim.Adam`'s updates
    (its tensor form, `adam_`: equal to the default form to float32 rounding) in a handful of tensor ops instead
    of a dozen per parameter.

    Why flat: PPO's networks here are small (a few 64-wide layers), so on the CPU Adam's per-parameter dispatch
    cost more than its arithmetic (measured: 0.68 ms a step for the 13 tensors of the stacked specialists,
    0.17 ms as one tensor). Each module parameter becomes a view into its group's flat tensor, so the modules,
    their `state_dict` keys and every checkpoint of weights are unchanged. Gradients are computed and clipped
    per parameter as before; `step` gathers them into the flat gradient (one copy) first. Adam's update is
    element-wise, so where an element sits in memory does not change it. The compiled update
    (`mtq_common.agents.update`) steps the same flat tensors and state through `group_tensors`.

    Why not a `torch.optim.Optimizer` subclass: constructing one imports the compiler stack (`torch._dynamo`,
    1.4-2.0 s), paid by every phase script at start. The interface is the part the scripts use: `param_groups`
    (a dict per group, its ``"lr"`` set by the learning-rate schedule), `zero_grad`, `step`, and a `state_dict`
    in `torch.optim.Adam`'s format, so a checkpoint holds the same tensors either way.

    A group whose parameters all have no gradient is skipped, as Adam skips such parameters (Phase 3's level
    that does not update at an iteration); a group with only some gradients is refused, since Adam would skip
    those parameters and a flat step cannot. Create it once the modules are on their device and hold their
    starting weights (moving a module afterwards, or loading with ``assign=True``, would detach its parameters
    from the flat tensor; `load_state_dict` copies in place and is fine).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.members, self.param_groups = [], []  # each group's module parameters; its flat tensor and settings
        for group in groups:
            self.members.append(list(group["params"]))
            settings = {"lr": lr, "betas": tuple(betas), "eps": eps}
            self.param_groups.append({**settings, **group, "params": [flatten_(self.members[-1])]})
        self.state: dict[int, dict] = {}  # group index -> step count and the two moment estimates, once stepped
        self._lr: dict[int, torch.Tensor] = {}  # group index -> its learning rate as a tensor (see group_tensors)

    @torch.no_grad()
    def step(self) -> None:
        for i, members in enumerate(self.members):
            grads = [p.grad for p in members]
            if all(g is None for g in grads):
                continue
            if any(g is None for g in grads):
                missing = sum(g is None for g in grads)
                raise ValueError(f"FlatAdam: {missing} of {len(grads)} parameters of a group have no gradient")
            adam_(*self.group_tensors(i), flat_cat(grads), *self.group_constants(i))

    def group_tensors(self, i: int) -> tuple[torch.Tensor, ...]:
        """Group `i`'s flat weights, its two moment estimates, its step count and its learning rate (each a tensor,
        so a compiled update reads the new values without recompiling); the rate is read from `param_groups`."""
        flat, group = self.param_groups[i]["params"][0], self.param_groups[i]
        if i not in self.state:
            self.state[i] = {"step": torch.zeros((), device=flat.device), "exp_avg": torch.zeros_like(flat),
                             "exp_avg_sq": torch.zeros_like(flat)}  # fmt: skip
        if i not in self._lr:
            self._lr[i] = torch.zeros((), device=flat.device)
        self._lr[i].fill_(group["lr"])
        state = self.state[i]
        return flat, state["exp_avg"], state["exp_avg_sq"], state["step"], self._lr[i]

    def group_constants(self, i: int) -> tuple[float, float, float]:
        """Group `i`'s (beta1, beta2, eps)."""
        (beta1, beta2), eps = self.param_groups[i]["betas"], self.param_groups[i]["eps"]
        return beta1, beta2, eps

    def zero_grad(self) -> None:
        for members in self.members:
            for p in members:
                p.grad = None

    def state_dict(self) -> dict:
        """`torch.optim.Adam`'s layout: the step as a float tensor, each group's settings with its index."""
        state = {i: {key: value.clone() for key, value in s.items()} for i, s in self.state.items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [i]}
                  for i, g in enumerate(self.param_groups)]  # fmt: skip
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = [len(group["params"]) for group in state_dict["param_groups"]]
        if saved != [1] * len(self.param_groups):
            raise ValueError(
                f"the optimiser state in this checkpoint holds {saved} tensors per parameter group; this version "
                "steps each group as one flat tensor (FlatAdam): resume with the version that wrote the checkpoint, "
                "or start the phase again"
            )
        self.state = {}
        for i, (group, saved_group) in enumerate(zip(self.param_groups, state_dict["param_groups"], strict=True)):
            flat = group["params"][0]
            group.update({k: v for k, v in saved_group.items() if k != "params"})  # as torch: the saved settings
            s = state_dict["state"].get(saved_group["params"][0])
            if s is None:  # never stepped
                continue
            if s["exp_avg"].shape != flat.shape:
                raise ValueError(
                    f"the optimiser state in this checkpoint holds {s['exp_avg'].numel()} values for parameter "
                    f"group {i}, which has {flat.numel()}: the networks differ from those that wrote it"
                )
            self.state[i] = {k: torch.as_tensor(s[k]).to(flat).clone() for k in ("step", "exp_avg", "exp_avg_sq")}


@torch.no_grad()
def adam_(param, exp_avg, exp_avg_sq, step, lr, grad, beta1: float, beta2: float, eps: float) -> None:
    """One Adam step of `param` in place (Kingma & Ba, 2015), with the step count and the learning rate as 0-d
    tensors: `torch.optim.Adam`'s arithmetic in its tensor ("capturable") form, so the eager optimiser and a
    compiled update (`mtq_common.agents.update`) share one formula and a new rate never recompiles."""
    step += 1
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    t = step.double()  # 1 - 0.999^t in float32 would lose five digits to cancellation
    step_size = (lr / (1 - beta1**t)).float()
    denom = (exp_avg_sq.sqrt() / (1 - beta2**t).sqrt().float()).add_(eps)
    param.sub_(step_size * exp_avg / denom)


def flat_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated into one 1-D tensor (a copy; empty for none): a component's gradients, a
    group's parameters."""
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.reshape(-1) for t in tensors])


def flatten_(params: list[nn.Parameter]) -> nn.Parameter:
    """Move `params` into one flat tensor (each becomes a view of it, values unchanged) and return that tensor
    as a parameter."""
    flat = flat_cat([p.detach() for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return nn.Parameter(flat)


class WeightAverage:
    """Polyak averaging: an exponential moving average of weights, `average <- decay * average + (1 - decay) *
    weights` after each iteration's update, and the average swapped into the modules while they are validated.

    Why (Phase 3): PPO's iterates jitter around the direction training takes, and a validation picks the one that
    happened to be lucky; their average moves the same way with less noise (on seeds 1-5 its test gain over Phase 2
    was larger than the chosen iterate's: docs/benchmarks.md, *Trading quality*). `weights` are tensors the modules
    read in place: the optimiser's flat tensors (`FlatAdam`), so two tensors hold both levels. `decay` 0 turns it
    off: the average is the iterate itself and nothing is swapped.
    """

    def __init__(self, weights: list[torch.Tensor], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"weight average decay {decay}: accepted 0 (off) <= decay < 1")
        self.weights, self.decay = weights, decay
        self.average = [w.detach().clone() for w in weights]

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the current weights."""
        for a, w in zip(self.average, self.weights, strict=True):
            a.copy_(w)

    @torch.no_grad()
    def update(self) -> None:
        """One step of the moving average (after an iteration's update)."""
        if self.decay > 0.0:
            for a, w in zip(self.average, self.weights, strict=True):
                a.lerp_(w, 1.0 - self.decay)

    @contextmanager
    def swapped_in(self):
        """The average in the modules' weights inside the block, the iterate back after it (even on error)."""
        if self.decay == 0.0:
            yield
            return
        with torch.no_grad():
            iterate = [w.clone() for w in self.weights]
            for w, a in zip(self.weights, self.average, strict=True):
                w.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for w, i in zip(self.weights, iterate, strict=True):
                    w.copy_(i)

    def state_dict(self) -> dict:
        return {"average": [a.clone() for a in self.average]}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for a, saved in zip(self.average, state["average"], strict=True):
                a.copy_(saved)


def minibatches(rows: int, minibatch_size: int, device):
    """One PPO epoch's minibatches, CleanRL's way: a fresh permutation of the `rows` rollout rows, cut into
    index blocks of `minibatch_size` (the last one shorter when it does not divide)."""
    perm = torch.randperm(rows, device=device)
    for start in range(0, rows, minibatch_size):
        yield perm[start : start + minibatch_size]


def gae(rewards, values, final_values, next_value, truncs, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates over a rollout `[S, ...]` (time first).

    `final_values[t]` is V of the final observation of a row whose episode was truncated at step t: the
    episode goes on beyond the data's end or its length limit, so it bootstraps from there, while the GAE
    chain stops at the boundary (the next step belongs to a new episode). `next_value` is V after the last
    step. Episodes never terminate (the market goes on), so nothing is cut to zero.
    """
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        nextvalues = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        # At a truncation the next state of this episode is the final obs, not the reset obs.
        nextvalues = torch.where(truncs[t].bool(), final_values[t], nextvalues)
        delta = rewards[t] + gamma * nextvalues - values[t]
        lastgaelam = delta + gamma * lam * (1.0 - truncs[t]) * lastgaelam
        advantages[t] = lastgaelam
    return advantages


def at_truncations(value_fn, truncs: torch.Tensor, *final_parts: torch.Tensor) -> torch.Tensor:
    """`final_values` for `gae`, shaped like `truncs` (`[S, B]`, or `[S, K, R]` in Phase 1; plus `value_fn`'s
    trailing dims): V of the final observation where a row was truncated, 0 elsewhere (`gae` reads it only
    there). `final_parts` are the final observation's pieces as the rollout stored them, each shaped like
    `truncs` and more; `value_fn(*parts)` gets them for the M truncated (step, row) pairs only, each `[M, ...]`.

    Why only those: one bar in `episode_length` ends a row, so valuing every stored final observation was the
    whole rollout's forward pass once more for a few rows (Phase 3: 6 s of its 2 minutes). Finding the pairs is
    one host sync per iteration, after the rollout."""
    done = truncs.reshape(-1).nonzero().squeeze(-1)
    values = value_fn(*(part.flatten(0, truncs.dim() - 1).index_select(0, done) for part in final_parts))
    out = values.new_zeros(truncs.numel(), *values.shape[1:])
    out.index_copy_(0, done, values)
    return out.view(*truncs.shape, *values.shape[1:])


def _mean(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    return x.mean() if dim is None else x.mean(dim)


def normalise(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Advantages over a minibatch to zero mean and unit std: over every element (`dim=None`), or along `dim`
    (Phase 1: each specialist's own, `[K, rows]` along the rows)."""
    if dim is None:
        return (x - x.mean()) / (x.std() + 1e-8)
    return (x - x.mean(dim, keepdim=True)) / (x.std(dim, keepdim=True) + 1e-8)


def clipped_surrogate(new_logprob, old_logprob, advantages, clip: float, dim: int | None = None):
    """PPO's clipped policy loss, the one form of all three phases (CleanRL's lines): the mean over every
    element (`dim=None`) or along `dim` of `max(-A r, -A clip(r, 1 - clip, 1 + clip))`, `r` the probability
    ratio. Returns `(loss, approx_kl, clipfrac)`: CleanRL's `(r - 1) - log r` KL estimate (averaged like the
    loss) and the share of clipped ratios, both without gradient."""
    logratio = new_logprob - old_logprob
    ratio = logratio.exp()
    with torch.no_grad():
        approx_kl = _mean((ratio - 1) - logratio, dim)
        clipfrac = ((ratio - 1.0).abs() > clip).float().mean()
    loss = _mean(torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)), dim)
    return loss, approx_kl, clipfrac


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var(target - pred) / Var(target): how much of the returns the critic explains."""
    return (1 - (target - pred).var() / target.var().clamp_min(1e-8)).item()


def update_scalars(learning_rate: float, sps: int, value_loss, policy_loss, entropy, approx_kl, clipfracs: list,
                   explained_var) -> dict:  # fmt: skip
    """CleanRL's `charts/` and `losses/` tags of one PPO update, named alike in every phase so that runs
    compare tag for tag. Tensors (per specialist in Phase 1) are averaged and read here: the one host
    sync of the iteration's logging."""
    return {
        "charts/learning_rate": learning_rate,
        "charts/SPS": sps,
        "losses/value_loss": value_loss.mean().item(),
        "losses/policy_loss": policy_loss.mean().item(),
        "losses/entropy": entropy.mean().item(),
        "losses/approx_kl": approx_kl.mean().item(),
        "losses/clipfrac": torch.stack(clipfracs).mean().item(),
        "losses/explained_variance": float(torch.as_tensor(explained_var).mean()),
    }


# --- a diverged policy stops the run ----------------------------------------------------------------------
# A diverged policy stops the run with a clear error instead of trading a NaN book.
#
# The training scripts step their environments without per-step checks (`check_actions=False`: a host
# sync per step would stall a GPU rollout). `DivergenceGuard` keeps the check on the device instead: each
# step adds one `isfinite` reduction and records the first step and row whose proposal was not finite;
# `raise_if_diverged`, called once per iteration after the rollout (where the scripts sync anyway), raises
# a `ValueError` naming the phase, the step and the row, before any update uses the poisoned batch. On the CPU,
# where a sync costs nothing, a finite proposal returns after the one reduction (10 ops fewer per step).


class DivergenceGuard:
    """Device-side record of the first non-finite proposal of a rollout (see the module docstring)."""

    def __init__(self, phase: str, device):
        self.phase = phase
        self.on_cpu = torch.device(device).type == "cpu"
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.first_row = torch.zeros((), dtype=torch.long, device=device)

    def watch(self, proposal: torch.Tensor, global_step: int) -> None:
        """Record `global_step` and the first bad row if `proposal` [rows, ...] has a non-finite entry."""
        if self.on_cpu and bool(torch.isfinite(proposal).all()):  # (a CPU sync is free: two ops, not ten)
            return
        bad = ~torch.isfinite(proposal.reshape(proposal.shape[0], -1)).all(-1)
        first = bad.any() & (self.first_step < 0)
        self.first_step = torch.where(first, global_step, self.first_step)
        self.first_row = torch.where(first, torch.argmax(bad.to(torch.int8)), self.first_row)

    def raise_if_diverged(self) -> None:
        """Raise if any watched proposal was non-finite (one host sync)."""
        step = int(self.first_step)
        if step >= 0:
            raise ValueError(
                f"{self.phase}: the policy proposed a non-finite book at step {step} (row {int(self.first_row)}): "
                "training diverged. Lower the learning rate, check the data, or resume from an earlier checkpoint."
            )
