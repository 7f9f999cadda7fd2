"""Gradient coordination between the meta-controller and the specialists (DESIGN section 6, Phase 3).

A *component* is one independently coordinated piece of the hierarchy, given as a list of gradient
tensors: the meta-controller is ``[p.grad for p in meta.parameters()]``; specialist ``k`` is
``[p.grad[k] for p in agents.parameters()]`` (`SpecialistAgents` stacks the K specialists along every
parameter's leading dimension, so these are *views* into the stacked ``.grad`` and every in-place
operation below lands in ``.grad``). `component_grads` builds either list.

The pieces, each a few lines:

* `clip_components_`: per-component gradient-norm clipping (``max_norm`` 1.0, DESIGN section 6), the same rule as
  `torch.nn.utils.clip_grad_norm_` applied to each component separately (Phase 1 clips each specialist so);
* `project_conflicts_`: PCGrad. Where two gradients point against each other (negative cosine), the first
  is projected onto the normal plane of the second; an agreeing pair is left untouched;
* `coordinate_`: all of it on one Phase 3 minibatch's gradients (the eager and the compiled update alike);
* `grads_of`: a loss's gradients without touching ``.grad`` (Phase 3 keeps the specialists' two
  objectives apart until the projection), `grads_of_each` for several losses of one graph (one of the passes
  on a second core); `coordination_scalars`: an update's statistics for TensorBoard;
* `UpdateSchedule`: which components step at an iteration (``meta_update_freq`` 1,
  ``specialist_update_freq`` 5);
* `AdaptiveLR`: per-component learning rates that fall when validation portfolio Sharpe falls and
  recover, within bounds, when it recovers.

The clipping and the projection take *stacked* components: every tensor's leading dimension indexes the
component, so the K specialists' stacked gradients are handled at once, in a few dozen tensor ops however
many specialists there are (a loop over specialists cost three times the ops). `clip_component_` and
`project_conflict_` are the same rules for one component (the meta-controller), as a stack of one.

Everything stays on the gradients' device and returns tensors (no ``.item()``), so a training loop can
stack the statistics and read them once per iteration.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

_EPS = 1e-12  # below this a norm counts as zero: no direction, no conflict


def component_grads(module: nn.Module, index: int | None = None) -> list[torch.Tensor]:
    """The gradients of `module`'s parameters as one component (a list of views into ``.grad``).

    With `index`, each gradient's slice ``[index]`` along the leading (stacked) dimension: specialist
    ``index`` of a `SpecialistAgents`. Parameters without a gradient are skipped.
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return grads if index is None else [g[index] for g in grads]


def _stacked(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """One component as a stack of one: a leading dimension of size 1 on every tensor (views)."""
    return [g.unsqueeze(0) for g in grads]


def _broadcast(per_group: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A `[K]` value per group, shaped to multiply a `[K, ...]` tensor."""
    return per_group.view(-1, *[1] * (like.dim() - 1))


def _dots(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Inner product of each group ``k`` of two stacked components (``[K]``, accumulated in float64):
    tensor by tensor over group ``k``'s slice, then over the tensors (``.double()`` of a float64 tensor is
    the tensor itself, not a copy)."""
    if len(a) != len(b):
        raise ValueError(f"components differ in length: {len(a)} and {len(b)} tensors")
    if not a:
        return torch.zeros(1, dtype=torch.float64)
    k = a[0].shape[0]
    per_tensor = [(x.double() * y.double()).reshape(k, -1).sum(1) for x, y in zip(a, b, strict=True)]
    return torch.stack(per_tensor, 1).sum(1)


def grad_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each group ``k`` of a stacked component (``[K]``; ``[0.]`` for no gradients)."""
    if not grads:
        return torch.zeros(1)
    k = grads[0].shape[0]
    per_tensor = [torch.linalg.vector_norm(g.reshape(k, -1), dim=1) for g in grads]
    return torch.linalg.vector_norm(torch.stack(per_tensor, 1), dim=1)


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of a whole component (a 0-d tensor; 0 for no gradients)."""
    return grad_norms(_stacked(grads))[0]


@torch.no_grad()
def clip_components_(grads: list[torch.Tensor], max_norm: float = 1.0) -> torch.Tensor:
    """Scale each group ``k`` of a stacked component in place so that its norm is at most `max_norm`;
    return the ``[K]`` norms before.

    Same rule as `torch.nn.utils.clip_grad_norm_` (factor ``max_norm / (norm + 1e-6)``, capped at 1), per
    group, so a group already within the bound is multiplied by exactly 1 and left bit-identical.
    """
    norms = grad_norms(grads)
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(_broadcast(factor, g).to(g.dtype))
    return norms


def clip_component_(grads: list[torch.Tensor], max_norm: float = 1.0) -> torch.Tensor:
    """`clip_components_` for one component (the meta-controller): its norm before, as a 0-d tensor."""
    return clip_components_(_stacked(grads), max_norm)[0]


@torch.no_grad()
def coordinate_(meta: list[torch.Tensor] | None, objectives: list[list[torch.Tensor]] | None, max_norm: float,
                coordinate: bool) -> tuple[list[torch.Tensor] | None, dict]:  # fmt: skip
    """One Phase 3 minibatch's gradients made into the levels' steps (DESIGN section 6).

    `meta`: the meta-controller's gradients (None when it does not update); `objectives`: the specialists'
    stacked gradients of their three objectives, ``[portfolio PG, own PG, value and entropy]`` (None when they
    do not update). With `coordinate`: the meta-controller clipped as one component; each specialist's own
    gradient projected where it conflicts with its portfolio gradient (PCGrad), the three summed, each
    specialist clipped on its own. Without: the sum, and one clip over both levels (`clip_grad_norm_`'s rule).
    Returns the specialists' gradients (or None) and the statistics (tensors) for `coordination_scalars`.
    Modifies `meta` in place.
    """
    stats = {}
    if meta is not None and coordinate:
        stats["norm_meta"] = clip_component_(meta, max_norm)
    specialists = None
    if objectives is not None:
        portfolio, own, rest = objectives
        if coordinate:  # every specialist at once: specialist k is slice [k] of each stacked gradient
            stats["cosine"], conflicted = project_conflicts_(own, portfolio)
            stats["conflicts"] = conflicted.float()
        specialists = [gp + go + gr for gp, go, gr in zip(portfolio, own, rest, strict=True)]
        if coordinate:
            stats["norm_specialists"] = clip_components_(specialists, max_norm)
    if not coordinate:
        clip_component_([*(meta or []), *(specialists or [])], max_norm)
    return specialists, stats


@torch.no_grad()
def project_conflicts_(own: list[torch.Tensor], other: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """PCGrad, group by group: where group ``k`` of `own` points against group ``k`` of `other`, project it
    in place onto the normal plane of `other`'s group ``k``.

    With ``d = own . other`` (over the whole group), a conflict is ``d < 0`` (negative cosine); then
    ``own -= d / |other|^2 * other``, applied to each tensor of `own` (views: the change lands in
    ``.grad``), after which ``own . other = 0``. An agreeing or orthogonal pair is left bit-identical, and
    a zero gradient on either side has cosine 0 and is never a conflict. `other` is not modified.

    The arithmetic runs in float64 and is rounded once into the gradients' dtype, so after a projection
    the remaining cosine is at rounding level of the *projected* gradient (float32 arithmetic would leave
    errors of the size of the original one, which can be much larger).

    Returns ``(cosine before the projection, conflicted)``, one per group (``[K]``: the gradients' dtype,
    bool).
    """
    own64, other64 = [g.double() for g in own], [h.double() for h in other]  # converted once, used four times
    d = _dots(own64, other64)
    own_sq, other_sq = _dots(own64, own64), _dots(other64, other64)
    cosine = d / (own_sq.sqrt() * other_sq.sqrt()).clamp_min(_EPS)
    conflicted = (d < 0) & (own_sq > _EPS**2) & (other_sq > _EPS**2)
    # Branch-free: the coefficient is exactly 0 where there is no conflict, and x - 0 * y == x (the
    # float64 round trip of a float32 or bfloat16 value is exact), so an agreeing pair stays bit-identical.
    coef = torch.where(conflicted, d / other_sq.clamp_min(_EPS**2), torch.zeros_like(d))
    for g, g64, h64 in zip(own, own64, other64, strict=True):
        g.copy_(g64 - _broadcast(coef, g) * h64)
    return cosine.to(own[0].dtype if own else torch.float32), conflicted


def project_conflict_(own: list[torch.Tensor], other: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`project_conflicts_` for one pair of components: ``(cosine, conflicted)`` as 0-d tensors."""
    cosine, conflicted = project_conflicts_(_stacked(own), _stacked(other))
    return cosine[0], conflicted[0]


def grads_of(loss: torch.Tensor, params: list, retain: bool) -> list[torch.Tensor]:
    """Gradients of `loss` for `params` without touching `.grad` (zeros where unused)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


_SECOND_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtq-backward")


def grads_of_each(losses: list[torch.Tensor], params: list, concurrent: bool = True) -> list[list[torch.Tensor]]:
    """`grads_of` each of `losses` (backward passes through one shared forward graph); with `concurrent`, the
    first on a second thread while this one runs the others.

    Why: autograd runs a CPU backward pass on the thread that asks for it, so independent passes can use a
    second core; each op runs exactly as in sequence (single-threaded), so the gradients are the same, bit for
    bit. Concurrent passes through a shared graph must all retain it (PyTorch's autograd notes); it is freed
    with the losses. (A `torch.compile`d backward fails on the second thread: pass ``concurrent=False``.)
    """
    if not concurrent:
        return [grads_of(loss, params, retain=True) for loss in losses]
    first = _SECOND_THREAD.submit(grads_of, losses[0], params, True)
    rest = [grads_of(loss, params, retain=True) for loss in losses[1:]]
    return [first.result(), *rest]


def coordination_scalars(stats: dict) -> dict:
    """The update's coordination statistics, averaged over its minibatches, for TensorBoard (each only
    on the iterations that updated its component)."""
    scalars = {}
    if stats["pg"]:
        portfolio_pg, own_pg = torch.stack(stats["pg"]).mean(0).tolist()
        scalars["losses/specialist_portfolio_pg"], scalars["losses/specialist_own_pg"] = portfolio_pg, own_pg
    for key, name in (("conflicts", "conflict_rate"), ("cosine", "cosine"), ("norm_meta", "grad_norm_meta"),
                      ("norm_specialists", "grad_norm_specialists")):  # fmt: skip
        if stats[key]:
            scalars[f"coordination/{name}"] = torch.stack(stats[key]).mean().item()
    return scalars


class UpdateSchedule:
    """Which components step at an iteration: each every `freq` iterations, counted from 1.

    A component updates at iteration ``i`` when ``i % freq == 0``: with the defaults of DESIGN section 6 the
    meta-controller steps every iteration and the specialists at iterations 5, 10, 15, ...
    """

    def __init__(self, meta_update_freq: int = 1, specialist_update_freq: int = 5):
        for name, freq in (("meta_update_freq", meta_update_freq), ("specialist_update_freq", specialist_update_freq)):
            if int(freq) != freq or freq < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {freq!r}")
        self.meta_update_freq = int(meta_update_freq)
        self.specialist_update_freq = int(specialist_update_freq)

    def meta(self, iteration: int) -> bool:
        """Whether the meta-controller steps at `iteration` (1-based)."""
        return iteration % self.meta_update_freq == 0

    def specialists(self, iteration: int) -> bool:
        """Whether the specialists step at `iteration` (1-based)."""
        return iteration % self.specialist_update_freq == 0


class AdaptiveLR:
    """Per-component learning rates driven by validation portfolio Sharpe.

    Each component ``name`` has a base rate ``base[name]`` and a scale, starting at `max_scale`; its rate
    is ``base * scale``. After each validation, `step(val_sharpe)` compares the mean of the last `window`
    validations with the mean of the `window` before them (fewer while fewer exist):

    * a *fall* (the recent mean below the earlier one by more than `tolerance`, or a non-finite Sharpe)
      multiplies every scale by `decrease`, never below `min_scale`;
    * otherwise every scale is multiplied by `increase`, never above `max_scale`.

    Why a recent window and not the best Sharpe ever seen: against a running maximum, noise alone reads
    as a fall most of the time (a series drawn from N(2, 0.1) sits below its running maximum almost
    always), and the rates ratchet to their floor within a dozen validations. Comparing recent means
    with a tolerance of the order of the validation noise makes a flat noisy series neutral on average,
    while a real drop still cuts the rates. `increase = 1 / decrease` by default, so a rise and a fall
    undo each other. The first validation has nothing to compare with and counts as a recovery.

    The signal is the portfolio's, shared by all components, so the scales move together; they are kept
    per component so that each rate is logged (and can be set) by name.
    """

    def __init__(
        self,
        base: dict[str, float],
        decrease: float = 0.5,
        increase: float = 2.0,
        min_scale: float = 0.1,
        max_scale: float = 1.0,
        tolerance: float = 0.1,
        window: int = 3,
    ):
        if not 0.0 < decrease <= 1.0 or increase < 1.0:
            raise ValueError(f"need 0 < decrease <= 1 <= increase, got decrease={decrease}, increase={increase}")
        if not 0.0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale} and {max_scale}")
        if tolerance < 0.0 or window < 1:
            raise ValueError(f"need tolerance >= 0 and window >= 1, got {tolerance} and {window}")
        self.base = {name: float(rate) for name, rate in base.items()}
        self.decrease, self.increase = float(decrease), float(increase)
        self.min_scale, self.max_scale, self.tolerance = float(min_scale), float(max_scale), float(tolerance)
        self.window = int(window)
        self.scales = {name: self.max_scale for name in self.base}
        self.history: list[float] = []

    def fell(self) -> bool:
        """Whether the last `window` validations are, on average, below the `window` before them."""
        recent = self.history[-self.window :]
        earlier = self.history[-2 * self.window : -self.window] or self.history[:-1][-self.window :]
        if not math.isfinite(recent[-1]):
            return True
        if not earlier:
            return False
        return sum(recent) / len(recent) < sum(earlier) / len(earlier) - self.tolerance

    def step(self, val_sharpe: float) -> dict[str, float]:
        """Adapt the scales to one validation Sharpe; return the new rates."""
        self.history.append(float(val_sharpe))
        fell = self.fell()
        if not math.isfinite(self.history[-1]):
            self.history.pop()  # a non-finite value cuts the rates but never enters a mean
        for name, scale in self.scales.items():
            if fell:
                self.scales[name] = max(self.min_scale, scale * self.decrease)
            else:
                self.scales[name] = min(self.max_scale, scale * self.increase)
        return self.rates()

    def rates(self) -> dict[str, float]:
        """The current learning rate of each component (``base * scale``)."""
        return {name: self.base[name] * self.scales[name] for name in self.base}

    def apply(self, optimizer, group_names: Iterable[str] | None = None, factor: float = 1.0):
        """Write ``factor * rate`` into each param group of `optimizer` (a torch optimiser or `FlatAdam`: anything
        with `param_groups`) whose ``"name"`` is a component.

        `group_names` restricts the write to those components (default: all); `factor` carries a
        schedule such as linear annealing. Groups without a matching ``"name"`` are left alone.
        """
        names = set(self.base) if group_names is None else set(group_names)
        unknown = names - set(self.base)
        if unknown:
            raise KeyError(f"no adaptive rate for {sorted(unknown)}; components are {sorted(self.base)}")
        rates = self.rates()
        for group in optimizer.param_groups:
            if group.get("name") in names:
                group["lr"] = factor * rates[group["name"]]

    def state_dict(self) -> dict:
        """Plain Python values (for checkpoints): the scales and the validation history."""
        return {"scales": dict(self.scales), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; its components must match this instance's."""
        if set(state["scales"]) != set(self.base):
            raise KeyError(
                f"adaptive-rate state has components {sorted(state['scales'])}, expected {sorted(self.base)}"
            )
        self.scales = {name: float(scale) for name, scale in state["scales"].items()}
        self.history = [float(v) for v in state["history"]]
