"""One PPO minibatch update, eager (the reference) or compiled (`--compile`, LeanRL's recipe on any device).

The eager update is CleanRL's: the loss, `loss.backward()`, the gradients averaged over ranks, clipped, one
Adam step. The compiled update computes the same loss as a function of the parameters, as views of the
optimiser's flat weight tensors (`torch.func.grad` of a `torch.func.functional_call`, `WeightsAsInputs`), so
the forward pass, the backward pass, the clipping and Adam run as one `torch.compile`d graph per minibatch
(under torchrun two: the gradients, then their application, with the gradient all-reduce between them). No
host sync inside; the learning rate and Adam's step count are tensors, so a new value never recompiles.

Why: the networks are small (64 wide), so an eager update is several hundred small ops whose dispatch
from Python costs more than their arithmetic; compiled, Inductor fuses the element-wise work into a few
loops. Fused code rounds differently, so a compiled run's weights differ from an eager run's in the last
bits (tested close after a few updates); its trained results were re-validated on seeds (docs/benchmarks.md).
`--compile auto` (the default) compiles when a run has enough minibatches to repay the compilation
(`COMPILE_MIN_MINIBATCHES`): the default pipeline does, the smoke run and the tests' tiny runs stay eager.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from mtq_common.agents.coordination import coordinate_, grads_of_each
from mtq_common.agents.ppo import FlatAdam, adam_, flat_cat
from mtq_common.training import distributed
from mtq_common.training.compiling import compile_options

CompileChoice = Literal["auto", "on", "off"]
CPU = torch.device("cpu")

# Compiling a phase's update takes 15-55 s the first time on a machine and 4.5-7.5 s once Inductor's on-disk
# cache holds it (tracing, imports, loading), against 1.25-1.9 ms saved per minibatch on the 2-core CPU: warm,
# Phase 1 breaks even at about 3,600 minibatches, Phase 2 at 4,200, Phase 3 at 4,000 (measured whole runs,
# docs/benchmarks.md). Every default phase compiles (Phase 2, the smallest: 11,520); a smoke, test or
# SB3-sized run stays eager.
COMPILE_MIN_MINIBATCHES = 4000


def compiler_missing(device: torch.device) -> str | None:
    """Why `torch.compile` cannot run on `device` here, or None: Inductor builds C++ on the CPU (a compiler must
    be on PATH) and Triton kernels on CUDA."""
    if device.type == "cpu":
        compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c]
        return None if any(shutil.which(c) for c in compilers) else "no C++ compiler (g++, c++ or clang++) on PATH"
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed"
    return f"this code compiles for the CPU and CUDA only, not {device.type}"


def use_compile(choice: CompileChoice, minibatches: int, device: torch.device = CPU, log=None) -> bool:
    """`--compile`: "on", "off", or "auto": on when the run has at least `COMPILE_MIN_MINIBATCHES` minibatches
    and `device` can compile (else eager, with a warning in `log`). "on" where nothing can compile is an error."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"--compile {choice!r}: accepted auto, on or off")
    if choice == "off" or (choice == "auto" and minibatches < COMPILE_MIN_MINIBATCHES):
        return False
    missing = compiler_missing(device)
    if missing is None:
        return True
    if choice == "on":
        raise ValueError(f"--compile on: {missing} (--compile off, or auto, trains eager: the same algorithm)")
    if log is not None:
        log.warning("--compile auto: %s, so this run trains eager (the same algorithm, unfused)", missing)
    return False


def views(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """`flat` cut into views of the given shapes, in order (a flat weight tensor seen as its parameters)."""
    out, offset = [], 0
    for shape in shapes:
        out.append(flat[offset : offset + shape.numel()].view(shape))
        offset += shape.numel()
    return out


class _Holder(nn.Module):
    """The modules whose weights a function reads, under one root, so `functional_call` can swap them by name."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, fn: Callable, *args):
        return fn(*args)


class WeightsAsInputs:
    """A function of `modules` as a function of the weights of a `FlatAdam`'s groups: `call(fn, params, *args)`
    runs `fn(*args)` with every parameter of `modules` replaced by the tensor given for it (`params[group]`, one
    tensor per parameter in the group's order: views of the group's flat weights, `split`), so that
    `torch.func.grad` differentiates by them. `fn` uses the modules as usual (it holds them in its closure);
    their buffers (observation statistics) are read as they are.

    Why per parameter and not by the flat tensor itself: the gradient of a flat tensor cut into views is
    assembled, compiled, as one loop over all its elements that tests, for each, which of the dozen views it
    belongs to (Phase 1's Adam kernel took 0.36 ms of a 1.4 ms minibatch so); per-parameter gradients are
    concatenated by plain copies for Adam (`flat_cat`), and the clipping and the conflict projection reduce
    over each parameter as it is."""

    def __init__(self, modules: list[nn.Module], optimizer: FlatAdam):
        self.holder = _Holder(modules)
        name_of = {id(p): name for name, p in self.holder.named_parameters()}
        self.names = [[name_of[id(p)] for p in members] for members in optimizer.members]
        self.shapes = [[p.shape for p in members] for members in optimizer.members]

    def split(self, flat: torch.Tensor, group: int) -> list[torch.Tensor]:
        """Group `group`'s flat weights as its parameters (views, detached: the tensors to differentiate by)."""
        return views(flat.detach(), self.shapes[group])

    def call(self, fn: Callable, params: list[list[torch.Tensor]], *args):
        """`fn(*args)` with the parameters of each optimiser group replaced by `params[group]`."""
        weights = {}
        for tensors, names in zip(params, self.names, strict=True):
            weights.update(zip(names, tensors, strict=True))
        # no tied weights here; tracing the default's search over every buffer made Dynamo restart each phase's
        # compiled update once (at the observation count's float64 scalar), some 7 s more on each cold compile
        return torch.func.functional_call(self.holder, weights, (fn, *args), tie_weights=False)


class PPOUpdate:
    """A minibatch's update of the modules one optimiser group holds (Phases 1 and 2).

    `loss_fn(*minibatch) -> (loss, stats)` is the phase's loss on the minibatch tensors; `clip_fn(grads)` clips
    the per-parameter gradients in place (per specialist in Phase 1, whole in Phase 2): eager, each parameter's
    `.grad`; compiled, the gradient by each parameter's view of the flat weights (`WeightsAsInputs`).
    `update(mb, *rollout)` takes the minibatch's row indices and the flattened rollout tensors (rows along
    `batch_dim`: the gather happens inside the compiled graph) and returns `stats` (detached tensors, read once
    per iteration by the script's logging). On one process the compiled update is one graph; under torchrun
    two, around the all-reduce.
    """

    def __init__(self, modules: list[nn.Module], optimizer: FlatAdam, loss_fn: Callable, clip_fn: Callable,
                 world: distributed.World, compiled: bool, batch_dim: int = 0):  # fmt: skip
        if len(optimizer.param_groups) != 1:
            raise ValueError("PPOUpdate steps one parameter group; Phase 3 composes its two (phase3_joint.py)")
        self.optimizer, self.loss_fn, self.clip_fn, self.world = optimizer, loss_fn, clip_fn, world
        self.params, self.compiled, self.batch_dim = optimizer.members[0], compiled, batch_dim
        if compiled:
            self.weights = WeightsAsInputs(modules, optimizer)
            options = compile_options(self.params[0].device)
            self._step = torch.compile(self._step_of, options=options)
            self._gradients = torch.compile(self._gradients_of, options=options)
            self._apply = torch.compile(self._apply_of, options=options)

    def __call__(self, mb: torch.Tensor, *rollout: torch.Tensor):
        if not self.compiled:  # the reference: CleanRL's order
            self.optimizer.zero_grad()
            loss, stats = self.loss_fn(*(x.index_select(self.batch_dim, mb) for x in rollout))
            loss.backward()
            grads = [p.grad for p in self.params]
            distributed.average_(grads, self.world)
            self.clip_fn(grads)
            self.optimizer.step()
            return stats
        weights_and_state = self.optimizer.group_tensors(0)
        if not self.world.enabled:
            return self._step(mb, rollout, *weights_and_state)
        grads, stats = self._gradients(mb, rollout, weights_and_state[0])
        distributed.average_(grads, self.world)
        self._apply(grads, *weights_and_state)
        return stats

    def _step_of(self, mb, rollout, *weights_and_state):
        grads, stats = self._gradients_of(mb, rollout, weights_and_state[0])
        self._apply_of(grads, *weights_and_state)
        return stats

    def _gradients_of(self, mb, rollout, flat):
        minibatch = [x.index_select(self.batch_dim, mb) for x in rollout]
        params = self.weights.split(flat, 0)
        return torch.func.grad(lambda ps: self.weights.call(self.loss_fn, [ps], *minibatch), has_aux=True)(params)

    def _apply_of(self, grads, flat, exp_avg, exp_avg_sq, step, lr) -> None:
        self.clip_fn(grads)
        adam_(flat, exp_avg, exp_avg_sq, step, lr, flat_cat(grads), *self.optimizer.group_constants(0))


class JointUpdate:
    """A Phase 3 minibatch's update of both levels (two optimiser groups: the meta-controller, the specialists).

    `meta_loss_fn(*meta_minibatch) -> (loss, stats)`: the meta-controller's PPO loss.
    `policy_fn(*specialist_minibatch) -> (objectives [2], stats)`: the specialists' portfolio and own policy
    objectives (their actors); `value_fn(*specialist_minibatch) -> objective`: their value loss and entropy bonus
    (their critics). The three gradients stay apart until `coordination.coordinate_` projects, sums and clips
    them.
    `update(mb, meta_rollout, specialist_rollout, update_meta, update_specialists)` returns
    `(meta stats, specialist stats, coordination stats)`.

    Eager (the reference): the meta loss's backward pass and the specialists' three (`grads_of_each`, one of
    them on the second core). Compiled: the meta gradient and the critics' by `torch.func.grad`, the two policy
    gradients by one `torch.func.jacrev` (one batched backward pass through the actors for both), coordination
    and Adam in the same graph.
    """

    def __init__(self, meta: nn.Module, specialists: nn.Module, optimizer: FlatAdam, meta_loss_fn: Callable,
                 policy_fn: Callable, value_fn: Callable, max_norm: float, coordinate: bool, world: distributed.World,
                 compiled: bool):  # fmt: skip
        self.optimizer, self.world, self.compiled = optimizer, world, compiled
        self.meta_loss_fn, self.policy_fn, self.value_fn = meta_loss_fn, policy_fn, value_fn
        self.max_norm, self.coordinate = max_norm, coordinate
        self.meta_params, self.specialist_params = optimizer.members  # (the order of the groups)
        if compiled:
            self.weights = WeightsAsInputs([meta, specialists], optimizer)
            options = compile_options(self.meta_params[0].device)
            self._step = torch.compile(self._step_of, options=options)
            self._gradients = torch.compile(self._gradients_of, options=options)
            self._apply = torch.compile(self._apply_of, options=options)

    def __call__(self, mb, meta_rollout, specialist_rollout, update_meta: bool, update_specialists: bool):
        # (`index_select`: a third of advanced indexing's time on the CPU, 20-60 us a minibatch, the same rows)
        meta_batch = [x.index_select(0, mb) for x in meta_rollout]
        specialist_batch = [x.index_select(0, mb) for x in specialist_rollout] if update_specialists else None
        if self.compiled:
            return self._compiled(meta_batch, specialist_batch, update_meta)
        self.optimizer.zero_grad()
        meta_loss, meta_stats = self.meta_loss_fn(*meta_batch)
        meta_grads = objectives = specialist_stats = None
        if update_meta:
            meta_loss.backward()
            meta_grads = [p.grad for p in self.meta_params]
            distributed.average_(meta_grads, self.world)
        if update_specialists:
            policy, specialist_stats = self.policy_fn(*specialist_batch)
            losses = [*policy.unbind(), self.value_fn(*specialist_batch)]
            objectives = grads_of_each(losses, self.specialist_params)
            distributed.average_([g for grads in objectives for g in grads], self.world)  # one all-reduce
        specialist_grads, stats = coordinate_(meta_grads, objectives, self.max_norm, self.coordinate)
        for p, g in zip(self.specialist_params, specialist_grads or [], strict=False):
            p.grad = g
        self.optimizer.step()  # Adam skips the level that got no gradient
        return meta_stats, specialist_stats, stats

    def _compiled(self, meta_batch, specialist_batch, update_meta: bool):
        state = [self.optimizer.group_tensors(i) for i in (0, 1)]  # (flat weights, moments, step, rate) per group
        if not self.world.enabled:
            return self._step(meta_batch, specialist_batch, update_meta, state)
        meta_grads, objectives, meta_stats, specialist_stats = self._gradients(meta_batch, specialist_batch,
                                                                               update_meta, state)  # fmt: skip
        distributed.average_([*(meta_grads or []), *(g for grads in objectives or [] for g in grads)], self.world)
        stats = self._apply(meta_grads, objectives, state)
        return meta_stats, specialist_stats, stats

    def _step_of(self, meta_batch, specialist_batch, update_meta, state):
        meta_grads, objectives, meta_stats, specialist_stats = self._gradients_of(meta_batch, specialist_batch,
                                                                                  update_meta, state)  # fmt: skip
        return meta_stats, specialist_stats, self._apply_of(meta_grads, objectives, state)

    def _gradients_of(self, meta_batch, specialist_batch, update_meta, state):
        call = self.weights.call
        meta, specialists = (self.weights.split(state[i][0], i) for i in (0, 1))
        meta_grads = objectives = specialist_stats = None
        if update_meta:
            meta_grads, meta_stats = torch.func.grad(
                lambda ps: call(self.meta_loss_fn, [ps, specialists], *meta_batch), has_aux=True
            )(meta)
        else:
            meta_stats = call(self.meta_loss_fn, [meta, specialists], *meta_batch)[1]
        if specialist_batch is not None:  # both policy objectives' gradients in one batched pass: [2, K, ...] each
            policy_grads, specialist_stats = torch.func.jacrev(
                lambda ps: call(self.policy_fn, [meta, ps], *specialist_batch), has_aux=True
            )(specialists)
            value_grads = torch.func.grad(lambda ps: call(self.value_fn, [meta, ps], *specialist_batch))(specialists)
            objectives = [[g[0] for g in policy_grads], [g[1] for g in policy_grads], value_grads]
        return meta_grads, objectives, meta_stats, specialist_stats

    def _apply_of(self, meta_grads, objectives, state) -> dict:
        specialists, stats = coordinate_(meta_grads, objectives, self.max_norm, self.coordinate)
        if meta_grads is not None:
            adam_(*state[0], flat_cat(meta_grads), *self.optimizer.group_constants(0))
        if specialists is not None:
            adam_(*state[1], flat_cat(specialists), *self.optimizer.group_constants(1))
        return stats
