"""Networks that checkpoints store: the stacked specialists (Phase 1) and the meta-controller (Phase 2).

`SpecialistAgents` holds the K specialists' actor-critics as stacked weights (one `[K, in, out]`
tensor per layer), so a single batched matmul evaluates all of them:

* grouped: `obs [K, R, F]` (R rows per specialist, Phase 1's row layout) -> `torch.bmm`;
* per slot: `obs [B, N, F]` with `owner [N]` (the specialist of each instrument; Phase 2/3 and the
  evaluation) -> the owner's weights are gathered per instrument and applied with one `torch.baddbmm`.

Each specialist has its own observation normaliser (`RunningNorm`), stored with the weights and
used at evaluation. The policy is a Gaussian over the action in [-1, 1] (the environment clips the
sample, as in CleanRL's continuous PPO); `deterministic` evaluation uses the clipped mean.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from mtq_common.envs.engine import partial_adjustment
from mtq_common.envs.trading_env import instrument_obs_size
from mtq_common.training.checkpoint import CheckpointError, load_checkpoint, parameter_fingerprint


def tanh(x: torch.Tensor) -> torch.Tensor:
    """The hidden layers' activation: tanh(x), computed as 2 sigmoid(2x) - 1 (the same function; the two differ
    by float32 rounding, at most 2e-7).

    Why: torch's CPU tanh kernel costs about 2.6 ns an element, its sigmoid 0.45 ns (one AVX-512 core, torch
    2.13): on a `[2048, 64]` hidden layer 344 us against 59 us, more than the layer's matmul (182 us); compiled
    by Inductor, 65 us against 30 us on `[512, 64]` (what it does to the phases: docs/benchmarks.md, *Throughput*)."""
    return 2.0 * torch.sigmoid(2.0 * x) - 1.0


class Tanh(nn.Module):
    """`tanh` as a module (in `nn.Sequential`, where `nn.Tanh` would stand; it holds no weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tanh(x)


class RunningNorm(nn.Module):
    """Per-group running mean and variance of observations (Welford/Chan merge), clipped z-scores.

    `shape = (K, F)`: one normaliser per specialist. Statistics update only when `update` is called
    on training batches, so evaluation never moves them.
    """

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, eps: float = 1e-8):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("count", torch.tensor(eps, dtype=torch.float64))
        self.clip = clip
        self.eps = eps

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch `x [K, M, F]` (M samples per group) into the running statistics."""
        self.merge(x.mean(1), x.var(1, unbiased=False), x.shape[1])

    @torch.no_grad()
    def merge(self, batch_mean: torch.Tensor, batch_var: torch.Tensor, m: int) -> None:
        """Merge the moments `[K, F]` of m samples per group (Chan et al.'s parallel update)."""
        total = self.count + m
        delta = batch_mean - self.mean
        self.mean += delta * (m / total).float()
        m2 = self.var * self.count.float() + batch_var * m + delta.pow(2) * (self.count * m / total).float()
        self.var.copy_(m2 / total.float())
        self.count.copy_(total)

    def forward(self, x: torch.Tensor, group_mean=None, group_var=None) -> torch.Tensor:
        mean = self.mean if group_mean is None else group_mean
        var = self.var if group_var is None else group_var
        return ((x - mean) / torch.sqrt(var + self.eps)).clamp(-self.clip, self.clip)


def affine(bias: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`bias + x @ weight` for stacked layers: x [G, R, in], weight [G, in, out], bias [G, 1, out].

    A single output (the actors' and critics' last layers) is a dot product per row, computed as one: torch's
    CPU `bmm` is 3-5x slower at out = 1 than a multiply-and-sum (at `[3, 256, 64]`: 44 against 13 us; at
    `[8, 512, 64]`: 251 against 55 us), and compiled, Inductor fuses the sum into its loops instead of calling
    the matmul (Phase 1's compiled update: 1.12 -> 1.05 ms a minibatch; docs/benchmarks.md)."""
    if weight.shape[-1] == 1:
        return (x * weight.transpose(-1, -2)).sum(-1, keepdim=True) + bias
    return torch.baddbmm(bias, x, weight)


class StackedLinear(nn.Module):
    """K independent linear layers stored as one `[K, in, out]` weight (orthogonal init per group)."""

    def __init__(self, groups: int, in_features: int, out_features: int, std: float = math.sqrt(2)):
        super().__init__()
        weight = torch.empty(groups, in_features, out_features)
        for k in range(groups):  # initialisation only, not a hot path
            w = torch.empty(out_features, in_features)
            nn.init.orthogonal_(w, std)
            weight[k] = w.T
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(groups, 1, out_features))

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x [K, R, in] -> [K, R, out]."""
        return affine(self.bias, x, self.weight)

    def per_slot(self, x: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """x [..., N, in] with owner [N] -> [..., N, out], slot j using group owner[j]'s weights.

        One batched matmul over the slots, `[N, rows, in] x [N, in, out]` (`affine`; measured about twice as fast
        on the CPU as the equivalent einsum at 64 rows)."""
        lead = x.shape[:-2]  # (sizes spelled out, not -1: rows or slots may be 0)
        slots = x.reshape(math.prod(lead), *x.shape[-2:]).transpose(0, 1)  # [N, rows, in]
        out = affine(self.bias[owner], slots, self.weight[owner])  # [N, rows, out]
        return out.transpose(0, 1).reshape(*lead, x.shape[-2], out.shape[-1])


class SpecialistAgents(nn.Module):
    """K specialist actor-critics (two tanh hidden layers each, CleanRL's layout) in stacked weights.

    The action is a *target* in [-1, 1] (the Gaussian sample, clipped): the position moves towards it by
    `position_rate` each bar (`engine.partial_adjustment`, the execution every policy trades through, the
    rules included), from the own position the observation carries at `position_index`. The same map
    serves Phase 1, Phases 2-3 and the evaluation (`to_position`), and the rate is stored with the weights:
    an evaluation trades its rule baselines at the same rate.

    `start_rule` (optional, stored with the weights): the action mean is the scaled trend rule's target
    `clip(scale * obs[..., feature], -1, 1)` (`rules.scaled_trend_positions`, read from the raw observation)
    plus the actor's output, a residual that starts at 0 (the last layer's weights and bias are zero). So a
    specialist starts exactly as the rule and training moves it only where its reward pays, as the
    meta-controller starts at the volatility-managed allocation.
    """

    def __init__(self, names: list[str], obs_size: int, hidden: int = 64, init_log_std: float = -1.0,
                 position_rate: float = 1.0, position_index: int | None = None,
                 start_rule: dict | None = None):  # fmt: skip
        super().__init__()
        if not 0.0 < position_rate <= 1.0:
            raise ValueError(f"position_rate {position_rate} (--position-rate): accepted 0 < rate <= 1")
        if position_rate < 1.0 and position_index is None:
            raise ValueError("a position_rate below 1 needs the observation's position_index")
        self.names = list(names)
        k = len(names)
        self.obs_size, self.hidden = obs_size, hidden
        self.position_rate, self.position_index = position_rate, position_index
        self.start_rule = None if start_rule is None else dict(start_rule)  # {"index", "scale", ...}
        self.norm = RunningNorm((k, obs_size))
        self.critic = nn.ModuleList(
            [StackedLinear(k, obs_size, hidden), StackedLinear(k, hidden, hidden), StackedLinear(k, hidden, 1, 1.0)]
        )
        self.actor = nn.ModuleList(
            [StackedLinear(k, obs_size, hidden), StackedLinear(k, hidden, hidden), StackedLinear(k, hidden, 1, 0.01)]
        )
        self.log_std = nn.Parameter(torch.full((k, 1, 1), init_log_std))
        if self.start_rule is not None:  # start exactly at the rule: the residual is 0 until training moves it
            with torch.no_grad():
                self.actor[-1].weight.zero_()

    def _normalised(self, obs: torch.Tensor, owner: torch.Tensor | None = None) -> torch.Tensor:
        """Observations z-scored with each row's specialist's statistics: grouped rows `[K, R, F]` (owner None)
        or per slot `[B, N, F]` (slot j: specialist owner[j])."""
        if owner is None:
            return self.norm(obs, self.norm.mean.unsqueeze(1), self.norm.var.unsqueeze(1))
        return self.norm(obs, self.norm.mean[owner], self.norm.var[owner])

    @staticmethod
    def _mlp(layers, x: torch.Tensor, owner: torch.Tensor | None = None) -> torch.Tensor:
        """One of the two MLPs on normalised inputs, grouped (owner None) or per slot; the output squeezed."""
        for i, layer in enumerate(layers):
            x = layer.grouped(x) if owner is None else layer.per_slot(x, owner)
            if i < len(layers) - 1:
                x = tanh(x)
        return x.squeeze(-1)

    # -- Phase 1: grouped rows ---------------------------------------------------------------
    def forward_grouped(self, obs: torch.Tensor):
        """obs [K, R, F] -> (action mean [K, R], log std [K, 1], value [K, R])."""
        x = self._normalised(obs)
        return self._mlp(self.actor, x) + self.start(obs), self.log_std.squeeze(-1), self._mlp(self.critic, x)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        """CleanRL's interface on grouped rows: the critic alone, value [K, R] (a bootstrap needs no action)."""
        return self._mlp(self.critic, self._normalised(obs))

    def get_action_and_value(self, obs: torch.Tensor, action: torch.Tensor | None = None,
                             noise: torch.Tensor | None = None):  # fmt: skip
        """CleanRL's interface on grouped rows: (action, log_prob, entropy, value), each [K, R]. `noise` [K, R]:
        the sample's standard normal draw, `action = mean + std * noise` (what `dist.sample()` draws from the same
        generator), for a caller that draws it outside a compiled region (Phase 1's rollout)."""
        mean, log_std, value = self.forward_grouped(obs)
        std = log_std.exp().expand_as(mean)
        dist = torch.distributions.Normal(mean, std, validate_args=False)
        if action is None:
            action = dist.sample() if noise is None else mean + std * noise
        return action, dist.log_prob(action), dist.entropy(), value

    # -- Phase 2/3 and evaluation: one specialist per instrument slot --------------------------
    def forward_per_slot(self, obs: torch.Tensor, owner: torch.Tensor):
        """obs [B, N, F], owner [N] -> (action mean [B, N], log std [N], value [B, N])."""
        x = self._normalised(obs, owner)
        mean = self._mlp(self.actor, x, owner) + self.start(obs)
        return mean, self.log_std[owner, 0, 0], self._mlp(self.critic, x, owner)

    def mean_per_slot(self, obs: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """The action mean alone, [B, N]: the actor without the critic, half the work, for callers that only
        trade (the same values as `forward_per_slot`'s mean)."""
        return self._mlp(self.actor, self._normalised(obs, owner), owner) + self.start(obs)

    def value_per_slot(self, obs: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """The value alone, [B, N]: the critic without the actor, for bootstraps (the same values as
        `forward_per_slot`'s value)."""
        return self._mlp(self.critic, self._normalised(obs, owner), owner)

    def start(self, obs: torch.Tensor) -> torch.Tensor | float:
        """The start rule's target [...] from the raw observation `obs` [..., F], or 0 without one."""
        if self.start_rule is None:
            return 0.0
        return (self.start_rule["scale"] * obs[..., self.start_rule["index"]]).clamp(-1.0, 1.0)

    def to_position(self, action: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """The position to trade for `action` [...] given the raw observation `obs` [..., F] (class docstring)."""
        target = action.clamp(-1.0, 1.0)
        if self.position_rate == 1.0:
            return target
        return partial_adjustment(obs[..., self.position_index], target, self.position_rate)

    @torch.no_grad()
    def positions(self, obs: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Deterministic positions in [-1, 1] (the mean action, through `to_position`) for obs [B, N, F]."""
        return self.to_position(self.mean_per_slot(obs, owner), obs)

    @classmethod
    def from_spec(cls, spec: dict) -> SpecialistAgents:
        """A network of the shape `describe()` recorded (checkpoints store it beside the weights)."""
        return cls(spec["names"], spec["obs_size"], spec["hidden"], position_rate=spec.get("position_rate", 1.0),
                   position_index=spec.get("position_index"), start_rule=spec.get("start_rule"))  # fmt: skip

    @classmethod
    def from_checkpoint(cls, phase1_dir, market, device) -> SpecialistAgents:
        """The trained specialists of `phase1_dir/best.pt`, frozen (Phase 2 trains the meta-controller only)
        and checked against `market`: missing, partial or incompatible Phase 1 output (another instrument
        set, another observation layout, a corrupted file) raises `CheckpointError` naming the file and
        what to run."""
        path = Path(phase1_dir) / "best.pt"
        rerun = f"Run `python phase1_ppo.py --output-dir {phase1_dir}` with this config and these instruments first."
        state = load_checkpoint(path, "phase1", hint=rerun)
        if list(state["symbols"]) != list(market.symbols):
            raise CheckpointError(
                f"{path} was trained on instruments {state['symbols']} but this run trades {market.symbols}. {rerun}"
            )
        expected = instrument_obs_size(market.num_instruments)
        if state["obs_size"] != expected:
            raise CheckpointError(
                f"{path} expects observations of size {state['obs_size']} but this run's layout has {expected} "
                f"(another feature set or a diagnostic run). {rerun}"
            )
        names = list(state["specialists"])
        missing = sorted({s for s in market.sectors if s not in names})
        if missing:
            raise CheckpointError(f"{path} is partial: it has no specialist for {missing} (it holds {names}). {rerun}")
        agents = cls.from_spec({**state, "names": names})
        try:
            agents.load_state_dict(state["model"])
        except (RuntimeError, KeyError) as exc:
            msg = f"{path}: the stored weights do not fit the specialists' network ({exc}). {rerun}"
            raise CheckpointError(msg) from None
        agents.to(device).eval()
        return agents.requires_grad_(False)

    def trades_start_rule(self, spec: dict) -> bool:
        """Whether these specialists trade exactly as freshly built ones of `spec` (`describe()`) with a start rule:
        the same rule and position map, and an actor whose output layer is still zero, so its residual adds exactly
        0 and the positions are the rule's, whatever the normaliser and hidden layers hold. (Phase 1 keeps a start
        that no validation beat, with the normaliser and critic it learned: `start_with_learned_estimates`.)"""
        head = self.actor[-1]
        zero = not (head.weight.any() or head.bias.any())
        return spec.get("start_rule") is not None and self.describe() == spec and zero

    def describe(self) -> dict:
        """What a loader must match and rebuild: names, sizes, the action-to-position map."""
        return {"names": self.names, "obs_size": self.obs_size, "hidden": self.hidden,
                "position_rate": self.position_rate, "position_index": self.position_index,
                "start_rule": self.start_rule}  # fmt: skip


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    """CleanRL's orthogonal initialisation."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


LEARNED_ESTIMATES = ("norm.", "critic.")
"""The state-dict keys of an actor-critic here that never move a starting point's actions: the observation
normaliser and the critic. A start's actor ends in a layer of zero weights (`SpecialistAgents` with a
`start_rule`, `MetaController`), so what reaches that layer, whatever its scale, leaves the mean action as it is."""


def start_with_learned_estimates(start: dict, trained: dict, rows: list[int] | None = None) -> dict:
    """The state dict `start` (a starting point's weights) with `trained`'s normaliser and critic
    (`LEARNED_ESTIMATES`): the same policy, with the estimates a run learned. `rows`: only these specialists'
    slices of `SpecialistAgents`' stacked weights (the shared count of observations stays `start`'s).

    What `best.pt` holds where Phase 1 (per specialist) or Phase 2 keeps its start. Why: the next phases fine-tune
    from it, and from the untouched start's identity normaliser and random critic Phase 3 gained nothing on seed 3
    of the built-in market (explained variance 0.01 at its first iteration, against 0.37 where Phase 2 had moved);
    with the last iterate's it gained +0.42 [+0.24, +0.60] on validation (docs/benchmarks.md)."""
    out = {key: value.clone() for key, value in start.items()}
    for key in [key for key in out if key.startswith(LEARNED_ESTIMATES)]:
        if rows is None:
            out[key] = trained[key].clone()
        elif out[key].dim() > 0:
            out[key][rows] = trained[key][rows]
    return out


class MetaController(nn.Module):
    """The meta-controller's actor-critic: observation -> Gaussian over `u` in R^(K+1).

    `hierarchy.split_action` maps u to the allocation (`softmax(u[:K])`, a point of the simplex over the
    specialists) and the risk appetite. PPO's ratio uses the density of `u` itself: the deterministic maps
    after it are the same under the old and new policy.

    Two forms of the appetite:
    * without `timing`: `clamp(u[K], 0, 1)`, starting at the equal allocation at full appetite (the actor's
      last layer has zero weights and the bias (0, ..., 0, 1));
    * with `timing` (`hierarchy.timing_spec`: the training split's volatility levels and the validation
      split's choice of the volatility-managed rule): a residual over that rule, `min(1, a_t * exp(u[K]))`
      with `a_t` the rule's appetite at the bar, and the volatility evidence in the observation
      (`hierarchy.risk_features`). The bias is 0, so it starts exactly at `vol_managed_equal_allocation`;
      the exponent keeps every appetite below 1 reachable with a gradient.
    With an `allocation_rule` (`evaluation.allocation_fit`: a linear map of the specialists' recent sleeve
    returns, fit on the training split) the allocation is `softmax(u[:K] + rule logits)`, so it starts at the
    rule's allocation instead of 1/K. Either way its mean action is the starting point whatever it observes;
    Phase 2 can only learn a move away from it where it pays. `allocation_rate` is the partial adjustment of
    the held allocation towards the action (`hierarchy.MetaTracker`); it, `timing` and `allocation_rule` are
    stored with the weights.

    `instrument_scale` (Phase 3's joint sizing, `evaluation.allocation_fit.fit_joint_sizing`; None: none) is a
    factor per instrument of the market, in its order, on the specialists' positions in the composed book
    (`hierarchy.compose_weights`): what neither level can express alone, since a specialist sees its own sector
    and the allocation scales whole specialists. It is stored with the weights.
    """

    def __init__(self, obs_size: int, num_specialists: int, hidden: int = 64, init_log_std: float = -0.5,
                 allocation_rate: float = 1.0, timing: dict | None = None,
                 allocation_rule: dict | None = None, instrument_scale: list[float] | None = None):  # fmt: skip
        super().__init__()
        if not 0.0 < allocation_rate <= 1.0:
            raise ValueError(f"allocation_rate {allocation_rate} (--allocation-rate): accepted 0 < rate <= 1")
        self.obs_size, self.num_specialists, self.hidden = obs_size, num_specialists, hidden
        self.allocation_rate, self.timing, self.allocation_rule = allocation_rate, timing, allocation_rule
        self.instrument_scale = None if instrument_scale is None else [float(x) for x in instrument_scale]
        self.norm = RunningNorm((1, obs_size))
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_size, hidden)), Tanh(),
            layer_init(nn.Linear(hidden, hidden)), Tanh(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )  # fmt: skip
        head = nn.Linear(hidden, num_specialists + 1)
        with torch.no_grad():  # the mean action of the starting point (class docstring)
            head.weight.zero_()
            head.bias.zero_()
            head.bias[-1] = 0.0 if timing is not None else 1.0
        self.actor_mean = nn.Sequential(
            layer_init(nn.Linear(obs_size, hidden)), Tanh(),
            layer_init(nn.Linear(hidden, hidden)), Tanh(),
            head,
        )  # fmt: skip
        self.actor_log_std = nn.Parameter(torch.full((1, num_specialists + 1), init_log_std))

    def normalise(self, obs: torch.Tensor) -> torch.Tensor:
        return self.norm(obs, self.norm.mean[0], self.norm.var[0])

    def heads(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs [B, D] -> (mean of u [B, K+1], value [B]): the network's pure tensor part."""
        x = self.normalise(obs)
        return self.actor_mean(x), self.critic(x).squeeze(-1)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.normalise(obs)).squeeze(-1)

    def action_mean(self, obs: torch.Tensor) -> torch.Tensor:
        """The actor alone: mean of u [B, K+1], the same values as `heads`' mean without the critic's work."""
        return self.actor_mean(self.normalise(obs))

    def get_action_and_value(self, obs: torch.Tensor, action: torch.Tensor | None = None,
                             noise: torch.Tensor | None = None):  # fmt: skip
        """CleanRL's interface: (u, log_prob, entropy, value) for obs [B, D]. `noise` [B, K+1]: the sample's
        standard normal draw, `u = mean + std * noise` (what `dist.sample()` draws from the same generator, bit
        for bit), for a caller that draws it outside a compiled region (Phase 3's rollout)."""
        mean, value = self.heads(obs)
        std = self.actor_log_std.expand_as(mean).exp()
        dist = torch.distributions.Normal(mean, std, validate_args=False)
        if action is None:
            action = dist.sample() if noise is None else mean + std * noise
        return action, dist.log_prob(action).sum(-1), dist.entropy().sum(-1), value

    @torch.no_grad()
    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """The mean action u (evaluation)."""
        return self.action_mean(obs)

    def sizing(self, device) -> torch.Tensor | None:
        """`instrument_scale` as a float32 tensor [N] on `device` (None without one)."""
        if self.instrument_scale is None:
            return None
        return torch.tensor(self.instrument_scale, dtype=torch.float32, device=device)

    @classmethod
    def from_spec(cls, spec: dict) -> MetaController:
        """A network of the shape `describe()` recorded (checkpoints store it beside the weights)."""
        return cls(spec["obs_size"], spec["num_specialists"], spec["hidden"], allocation_rate=spec["allocation_rate"],
                   timing=spec.get("timing"), allocation_rule=spec.get("allocation_rule"),
                   instrument_scale=spec.get("instrument_scale"))  # fmt: skip

    @classmethod
    def from_checkpoint(cls, phase2_dir, specialists: SpecialistAgents, device) -> MetaController:
        """The Phase 2 meta-controller of `phase2_dir/best.pt`, checked against the specialists it was
        trained over (their names and weights)."""
        path = Path(phase2_dir) / "best.pt"
        hint = f"Run `python phase2_meta.py --output-dir {phase2_dir}` over these specialists first."
        state = load_checkpoint(path, "phase2", hint=hint)
        if list(state["specialists"]) != list(specialists.names):
            raise CheckpointError(f"{path} allocates over {state['specialists']}, not {specialists.names}. {hint}")
        if state["specialists_fingerprint"] != parameter_fingerprint(specialists):
            raise CheckpointError(f"{path} was trained over other Phase 1 specialists than the ones loaded. {hint}")
        meta = cls.from_spec(state)
        meta.load_state_dict(state["model"])
        return meta.to(device)

    def describe(self) -> dict:
        spec = {"obs_size": self.obs_size, "num_specialists": self.num_specialists, "hidden": self.hidden,
                "allocation_rate": self.allocation_rate}  # fmt: skip
        optional = {"timing": self.timing, "allocation_rule": self.allocation_rule,
                    "instrument_scale": self.instrument_scale}  # fmt: skip
        return {**spec, **{key: value for key, value in optional.items() if value is not None}}
