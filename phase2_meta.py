"""Phase 2: train the meta-controller over the frozen Phase 1 specialists with PPO (CleanRL style).

    python phase2_meta.py --config config/agents.yaml --timesteps 300000 \\
        --output-dir models/checkpoints/phase2 --log-dir logs/phase2

The specialists are loaded from `--specialists-dir/best.pt` (with their observation normalisers),
frozen and run without gradients. Each bar the meta-controller sees the portfolio, the specialists'
signals and their recent performance and the market's volatility evidence, and outputs an allocation over
the specialists (softmax of Gaussian logits) and a risk appetite; `compose_weights` turns that and the
specialists' positions into proposed weights, and `PortfolioEnv`'s risk manager maps them to weights
within every hard limit before costs, returns and the portfolio reward. With `--risk-timing` (default) the
appetite is a learned factor over the volatility-managed rule's `min(1, (sigma* / sigma_t)^p)` (levels from
the training split, half-life and p picked on the validation split), and the meta-controller starts exactly
at `vol_managed_equal_allocation`; without it, at the equal allocation at full appetite. With
`--allocation-rule` (default) it starts instead at a linear map fit on the training split
(`mtq_common.evaluation.allocation_fit`): from the specialists' recent sleeve returns to the allocation and,
with risk timing, from those and the volatility ratios to a factor on the rule's appetite. The starting point
is validated as iteration 0, its held allocation moves a share `--allocation-rate` of the way to its action
each bar, and its reward is scored against a twin env that trades that starting point on the same path
(`--paired-baseline`: a control variate that leaves the optimal policy unchanged). The reward (`meta_reward`,
`--sharpe-reward`, default on) is the increment of the book's Sharpe ratio over the whole training split
(`mtq_common.agents.sharpe_reward`, moments held at the starting point's book there), as in Phase 3; an iterate
replaces the start in `best.pt` only with a confident validation gain and within momentum's turnover per unit of
volatility there, where the start is (`selection.turnover_against_momentum`, DESIGN 14's T); where the start is
kept, `best.pt` is the start with the last iterate's observation normaliser and critic, the same actions
(`nets.start_with_learned_estimates`: what Phase 3 fine-tunes from). `--timesteps` counts
environment steps of the meta-controller. Outputs as in Phase 1: `latest.pt`, `best.pt` (by validation
portfolio Sharpe), `step_*.pt`, `metrics.json`; `training.log` and TensorBoard events.
Runs data-parallel under `torchrun --nproc_per_node N` as Phase 1 does (`mtq_common.training.distributed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtq_common.agents.coordination import clip_component_
from mtq_common.agents.hierarchy import (
    MetaTracker,
    compose_weights,
    load_specialists,
    meta_observation_size,
    risk_features,
    timing_spec,
)
from mtq_common.agents.nets import MetaController, start_with_learned_estimates
from mtq_common.agents.ppo import (
    DivergenceGuard,
    FlatAdam,
    at_truncations,
    clipped_surrogate,
    explained_variance,
    gae,
    minibatches,
    normalise,
    update_scalars,
)
from mtq_common.agents.rollout_stats import PortfolioRolloutStats, log_validation
from mtq_common.agents.sharpe_reward import SharpeIncrement
from mtq_common.agents.update import CompileChoice, PPOUpdate, use_compile
from mtq_common.data.splits import load_splits
from mtq_common.data.tables import build_tables
from mtq_common.data.volatility import fit_vol_levels
from mtq_common.envs.portfolio_env import PortfolioEnv
from mtq_common.evaluation.allocation_fit import fit_allocation_rule, start_backtests
from mtq_common.evaluation.portfolio_eval import evaluate_portfolio, validation_timings
from mtq_common.evaluation.report_text import format_report
from mtq_common.evaluation.rules import fit_trend_for
from mtq_common.evaluation.selection import check_replace_confidence, gain_over_start, turnover_against_momentum
from mtq_common.training import checkpoint as ckpt
from mtq_common.training import distributed
from mtq_common.training.checkpoint import clone_state, parameter_fingerprint
from mtq_common.training.compiling import compile_options
from mtq_common.training.plumbing import Run, autocast, cli, iterations, restore, resume, seed_everything, start_run

ALIASES = {"timesteps": "training.phase_2_timesteps"}


@dataclass
class Args:
    config: str | None = None
    """YAML config (defaults for every flag below that names a config key)."""
    timesteps: int = 300_000
    """Environment steps of the meta-controller, all ranks together (config: training.phase_2_timesteps)."""
    output_dir: str = "models/checkpoints/phase2"
    """Where checkpoints and metrics.json go."""
    log_dir: str = "logs/phase2"
    """Where training.log and the TensorBoard events go."""
    specialists_dir: str = "models/checkpoints/phase1"
    """Phase 1 output folder (its best.pt is loaded and frozen)."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    seed: int = 1
    """Seed of the weights, the action noise and the environments (rank r: seed + 7919 r, weights from rank 0)."""
    data_dir: str | None = None
    """Folder of <SYMBOL>.csv files; unset: the built-in synthetic market."""
    instruments: list[str] = field(default_factory=list)
    """Instruments traded (default: config data.instruments)."""
    num_envs: int = 64
    """Portfolio environment rows, on each rank (config: training.n_envs)."""
    num_steps: int = 128
    """Rollout length per iteration."""
    learning_rate: float = 3e-4
    """Adam learning rate."""
    minibatch_size: int = 256
    """PPO minibatch size."""
    batch_size: int | None = None
    """Deprecated alias of --minibatch-size (SB3's name; CleanRL's batch_size is the whole rollout)."""
    n_epochs: int = 10
    """PPO epochs per iteration."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """PPO clipping coefficient."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    anneal_lr: bool = True
    """Anneal the learning rate linearly to 0."""
    norm_adv: bool = True
    """Normalise advantages per minibatch."""
    target_kl: float | None = None
    """Stop an iteration's epochs early above this approximate KL (unset: never)."""
    hidden_size: int = 64
    """Width of the two hidden layers."""
    allocation_rate: float = 0.1
    """Partial adjustment of the held allocation towards the meta-controller's action each bar (1: jump)."""
    risk_timing: bool = True
    """Start at the volatility-managed equal allocation and learn a factor over its appetite, with the market's
    volatility in the observation (DESIGN 14); --no-risk-timing: the equal allocation at full appetite."""
    allocation_rule: bool = True
    """Start at a linear map fit on the training split (evaluation/allocation_fit.py): the allocation from the
    specialists' recent sleeve returns and, with risk timing, a factor on its appetite from those and the
    volatility ratios; --no-allocation-rule: at 1/K and the rule's appetite."""
    check_allocation_rule: bool = True
    """Keep the fitted rule only where its start beats the start without it on the validation split, with the
    paired interval at --replace-confidence above 0 as an iterate needs (it is fit on train alone);
    --no-check-allocation-rule: keep it always."""
    sharpe_reward: bool = True
    """Train on the increment of the book's Sharpe ratio over the whole training split (`meta_reward`; off: the
    env's portfolio reward)."""
    paired_baseline: bool = True
    """Score each bar against the starting point on the same path (a twin env): less noise, same optimum."""
    eval_interval: int = 10
    """Validate (and update best.pt) every this many iterations, and at the end."""
    replace_confidence: float = 0.9
    """best.pt leaves the starting point (the rule the meta-controller starts from) only for an iterate whose
    validation Sharpe beats it with the paired bootstrap interval at this confidence above 0 (0: any higher Sharpe
    replaces it; the same rule as phase3_joint.py's)."""
    eval_segments: int = 16
    """Validation split pieces run in parallel, each starting flat (see mtq_common.evaluation.specialist_eval)."""
    keep_checkpoints: int = 3
    """Rotating step_*.pt files kept."""
    resume: bool = False
    """Continue from latest.pt in --output-dir."""
    force: bool = False
    """Resume even if the config differs from the checkpoint's."""
    stop_after: int | None = None
    """Stop after this many iterations in this invocation (time-sliced jobs; continue with --resume)."""
    progress: bool = True
    """Show a progress bar (only on a terminal)."""
    torch_threads: int = 1
    """torch intra-op threads on the CPU (0: torch's default); small-batch PPO is fastest with 1."""
    compile: CompileChoice = "auto"
    """torch.compile the PPO update and each rollout bar (agents/update.py): on, off, auto (on from 4,000
    minibatches)."""
    amp: bool = False
    """bf16 autocast in the PPO update (CUDA only; refused on the CPU)."""


def start_fits(args: Args, cfg, specialists, splits: dict, val_tables, trend, vol_levels, device) -> dict:
    """What the meta-controller starts from, fit on the frozen specialists' positions: `timings`, the
    volatility-managed baselines' choices picked on the validation split (`--risk-timing`; None without), and
    `allocation_rule`, the map fit on the training split over that timing (`--allocation-rule`; None without).
    Both read the specialists only through what they trade, so specialists that trade the same positions get the
    same fits (`main`'s `ahead`)."""
    timings = None
    if args.risk_timing:
        timings = validation_timings(specialists, splits["val"], cfg, trend, vol_levels, device, args.eval_segments,
                                     val_tables)  # fmt: skip
    rule = None
    if args.allocation_rule:
        timing = None if timings is None else timing_spec(vol_levels, timings["vol_managed_equal_allocation"])
        rule = fit_allocation_rule(specialists, splits["train"], cfg, timing, device)
    return {"timings": timings, "allocation_rule": rule}


def check_args(args: Args) -> None:
    """This script's own flags, refused before any work (pipeline.py checks them before its first phase too)."""
    check_replace_confidence(args.replace_confidence)


def meta_reward(reward: torch.Tensor, info: dict, book: SharpeIncrement | None) -> torch.Tensor:
    """The meta-controller's reward [B] for one bar of a `PortfolioEnv` (its step's `reward` and `info`: the
    executed weights, net return, cost, VaR, ...). The one place to change what it learns: the script applies
    it to the env and to the twin alike, and `charts/episodic_return` logs its episode sums. Built in: the
    increment of the book's Sharpe ratio over the whole training split, `book(net_return)`
    (`agents.sharpe_reward`: the differential Sharpe ratio with its moments held at the starting point's there);
    with `--no-sharpe-reward` (`book` None) the env's portfolio reward (the differential Sharpe ratio of the last
    hundred bars with its terms, docs/design.md section 4)."""
    return reward if book is None else book(info["net_return"])


def main(args: Args, ahead: dict | None = None) -> dict:
    """Train the meta-controller. `ahead`: `start_fits` computed beforehand for the specialists of `ahead["spec"]`
    (pipeline.py fits them beside Phase 1, over the specialists as Phase 1 starts them); used only if the loaded
    specialists trade exactly as those (`SpecialistAgents.trades_start_rule`), else fit here."""
    check_args(args)
    cfg, world, device, log = start_run(args, ALIASES, "phase2")  # config, ranks, log file, threads
    out_dir = Path(args.output_dir)
    steps_per_iteration = args.num_envs * args.num_steps  # on this rank
    num_iterations = iterations(args, steps_per_iteration, world)  # (a minibatch never exceeds the rollout)
    minibatches_per_run = num_iterations * args.n_epochs * -(-steps_per_iteration // args.minibatch_size)
    compiled = use_compile(args.compile, minibatches_per_run, device, log)  # the update and each rollout bar

    # TRY NOT TO MODIFY: seeding (each rank its own environments and noise; rank 0's initial weights)
    seed = seed_everything(world.seed(args.seed))

    # THE FROZEN SPECIALISTS and the environment
    splits = load_splits(cfg)
    train, val = splits["train"], splits["val"]
    specialists, owner = load_specialists(args.specialists_dir, train, device)
    fingerprint_at_load = parameter_fingerprint(specialists)
    num_specialists = len(specialists.names)
    envs = PortfolioEnv(train, cfg, args.num_envs, device=device, seed=seed, torch_mode=True, check_actions=False)
    # The twin: the same rows (same seed, so the same start bars and episode ends) trading the starting point.
    # Its reward does not depend on the meta-controller's actions (the market path and the specialists' own
    # books are the same), so subtracting it leaves the optimal policy unchanged and cancels the market noise
    # both books share: a control variate that makes a small tilt of the allocation measurable.
    twin = PortfolioEnv(train, cfg, args.num_envs, device=device, seed=seed, torch_mode=True, check_actions=False)
    for note in envs.limit_notes:
        log.warning("risk limit: %s", note)
    val_tables = build_tables(val, cfg, device)
    trend = fit_trend_for(train, cfg)  # the trend_filter baseline's parameters, from the training split
    vol_levels = fit_vol_levels(train)  # the volatility-managed baselines' levels, from the training split
    references: dict = {}  # the baselines' validation backtests, computed once

    def validation(meta) -> tuple[dict, dict]:
        """The hierarchy and every baseline on the validation split (`eval_segments` pieces in parallel): the
        report and the backtests (the system's returns for its paired difference to the starting point, its
        turnover against momentum's)."""
        return evaluate_portfolio(specialists, meta, val, cfg, trend, device, args.eval_segments, val_tables, 2,
                                  references, specialists_frozen=True, vol_levels=vol_levels)  # fmt: skip

    def validate(meta) -> dict:
        """`validation`'s report alone (the final evaluation's)."""
        return validation(meta)[0]

    def gain(ran: dict) -> dict:
        """An iterate's validation gain over the starting point, the meta-controller as it was built: its mean
        action is the start whatever it observes (`MetaController`), the fitted rule's where there is one, not
        the report's plain `vol_managed_equal_allocation` (`selection.gain_over_start`)."""
        return gain_over_start(ran["system"].net_return, start_returns, val.bars_per_year,
                               cfg.reward.risk_free_rate, args.replace_confidence)  # fmt: skip

    def turnover_check(ran: dict) -> dict:
        """A validation's turnover per unit of volatility against momentum's (`selection.turnover_against_momentum`:
        DESIGN 14's T, at the confidence of the gain; within also at no more than the start's)."""
        return turnover_against_momentum(ran, args.replace_confidence, start_turnover)

    # the risk-timing choice and the allocation rule: fit ahead where they hold for these specialists, else here
    if ahead is not None and specialists.trades_start_rule(ahead["spec"]):
        fits = ahead["fits"]
        log.info("risk timing and allocation rule: fit beside Phase 1 over the start rules it kept")
    else:
        fits = start_fits(args, cfg, specialists, splits, val_tables, trend, vol_levels, device)
    start_rule = None  # risk timing: the rule the meta-controller starts from, picked on the validation split
    if fits["timings"] is not None:  # (picked once, for the starting point and every validation's baselines)
        references["timings"] = fits["timings"]
        start_rule = timing_spec(vol_levels, references["timings"]["vol_managed_equal_allocation"])
        log.info("risk timing: a factor over vol_managed_equal_allocation (half-life %d, power %d, picked on val)",
                 start_rule["half_life"], start_rule["power"])  # fmt: skip
    allocation_rule = fits["allocation_rule"]  # where the allocation starts: fit on train (1/K without it)
    if allocation_rule is not None:
        log.info("allocation rule: fit on the training split, Sharpe there %.3f (the start without it) -> %.3f",
                 allocation_rule["equal_sharpe"], allocation_rule["fit_sharpe"])  # fmt: skip
    num_rows = args.num_envs
    meta_obs_size = meta_observation_size(envs.portfolio_obs_size, num_specialists, timed=start_rule is not None)

    def build(rule):
        return MetaController(meta_obs_size, num_specialists, args.hidden_size, allocation_rate=args.allocation_rate,
                              timing=start_rule, allocation_rule=rule).to(device)  # fmt: skip

    meta, rule_check, start_validation = build(allocation_rule), None, None
    if allocation_rule is not None and args.check_allocation_rule:  # fit on train alone: it must win on val too
        # (every rank: deterministic, so every rank takes the same decision; kept, it is iteration 0's validation)
        start_validation = validation(meta)
        checked = start_validation[0]
        plain_name = "vol_managed_equal_allocation" if args.risk_timing else "equal_allocation"
        plain = checked["baselines"][plain_name] if args.risk_timing else checked[plain_name]
        ran = start_validation[1]
        over_plain = gain_over_start(ran["system"].net_return, ran[plain_name].net_return, val.bars_per_year,
                                     cfg.reward.risk_free_rate, args.replace_confidence)  # fmt: skip
        rule_check = {"val_sharpe": checked["portfolio"]["sharpe"], "plain_val_sharpe": plain["sharpe"],
                      "gain": {k: over_plain[k] for k in ("difference", "low", "high")}}  # fmt: skip
        rule_check["kept"] = over_plain["replaces"] and rule_check["val_sharpe"] > rule_check["plain_val_sharpe"]
        log.info("allocation rule: validation Sharpe %.3f against %.3f without it, %+.3f [%+.3f, %+.3f]: %s",
                 rule_check["val_sharpe"], rule_check["plain_val_sharpe"], over_plain["difference"], over_plain["low"],
                 over_plain["high"], "kept" if rule_check["kept"] else "dropped")  # fmt: skip
        if not rule_check["kept"]:
            allocation_rule, start_validation = None, None
            meta = build(None)
    risk = None if start_rule is None else risk_features(start_rule, train, device)  # [T, H + 1], training market
    distributed.broadcast_module(meta, world)
    book = None  # the reward's reference: the starting point's book on the training split (its mean action)
    if args.sharpe_reward:
        cash = cfg.reward.risk_free_rate / train.bars_per_year
        start = start_backtests(specialists, meta, train, cfg, device, momentum=False)["system"]  # (no momentum cap)
        book = SharpeIncrement.of(start.net_return, cash)
    optimizer = FlatAdam(meta.parameters(), lr=args.learning_rate, eps=1e-5)  # Adam, stepped as one tensor

    def meta_loss(mb_obs, mb_actions, mb_logprobs, mb_advantages, mb_returns):
        """The meta-controller's PPO loss on one minibatch and its statistics."""
        with autocast(args.amp, device):
            _, newlogprob, entropy, newvalue = meta.get_action_and_value(mb_obs, mb_actions)
            if args.norm_adv:
                mb_advantages = normalise(mb_advantages)
            pg_loss, approx_kl, clipfrac = clipped_surrogate(newlogprob, mb_logprobs, mb_advantages, args.clip_range)
            v_loss = 0.5 * ((newvalue - mb_returns) ** 2).mean()
            entropy_loss = entropy.mean()
            loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
        return loss, (pg_loss.detach(), v_loss.detach(), entropy_loss.detach(), approx_kl, clipfrac)

    def clip(grads):  # clip_grad_norm_'s rule
        clip_component_(grads, args.max_grad_norm)

    update = PPOUpdate([meta], optimizer, meta_loss, clip, world, compiled)
    max_position = cfg.environment.max_position_size

    # ALGO LOGIC: storage setup
    meta_obs = torch.zeros((args.num_steps, num_rows, meta_obs_size), device=device)
    final_portfolio = torch.zeros((args.num_steps, num_rows, envs.portfolio_obs_size), device=device)
    final_held = torch.zeros((args.num_steps, num_rows, 2 * num_specialists + 1), device=device)  # the tracker's part
    final_risk = None if risk is None else torch.zeros((args.num_steps, num_rows, risk.shape[1]), device=device)
    final_inst_obs = torch.zeros(
        (args.num_steps, num_rows, *envs.single_observation_space["instruments"].shape), device=device
    )
    meta_actions = torch.zeros((args.num_steps, num_rows, num_specialists + 1), device=device)
    meta_logprobs, meta_values, rewards, truncs = (
        torch.zeros((args.num_steps, num_rows), device=device) for _ in range(4)
    )

    start_iteration, global_step = 1, 0
    best = {"sharpe": -float("inf"), "iteration": 0, "model": None}
    next_obs, _ = envs.reset(seed=seed)
    twin.reset(seed=seed)
    # the meta-controller's observation and held allocation; the rollout's TensorBoard tags
    tracker = MetaTracker(owner, num_specialists, num_rows, device, meta.allocation_rate, allocation_rule)

    def final_value(inst_obs, portfolio, held, *evidence):  # V of final observations, from their stored parts
        positions = specialists.positions(inst_obs, owner)
        return meta.get_value(tracker.assemble(portfolio, positions, held, *evidence))

    def trade_bar(envs, twin, inst_obs, portfolio_obs, evidence, tracker, meta_noise):
        """One bar up to the environments' autoresets: the frozen specialists' positions, the meta-controller's
        sample (from the standard normal `meta_noise` the script drew: the generator's stream of `dist.sample()`),
        the env trading the proposal and the twin the starting point with the same positions
        (`PortfolioEnv.trade`), both rewards, the tracker booking the bar. Pure tensor work: with `--compile`
        one graph, one call a bar."""
        positions = specialists.positions(inst_obs, owner)
        obs = tracker.observe(portfolio_obs, positions, evidence)
        meta_action, meta_logprob, _, meta_value = meta.get_action_and_value(obs, noise=meta_noise)
        allocation, appetite = tracker.act(meta_action, evidence)
        proposal = compose_weights(allocation, appetite, positions, owner, max_position)
        stepped = envs.trade(proposal, positions)
        _, env_reward, truncated, info = stepped
        reward, twin_reward, twin_stepped = meta_reward(env_reward, info, book), None, None
        if args.paired_baseline:  # the starting point (allocation and appetite), same positions, same path
            twin_proposal = compose_weights(*tracker.start, positions, owner, max_position)  # (this bar's start)
            twin_stepped = twin.trade(twin_proposal, positions, observe=False)
            twin_reward = meta_reward(twin_stepped[1], twin_stepped[3], book)
        held = tracker.after_step(positions, info["bar_returns"], truncated)
        return (obs, (meta_action, meta_logprob, meta_value), allocation, appetite, proposal, stepped, twin_stepped,
                reward, twin_reward, held)  # fmt: skip

    step_bar = torch.compile(trade_bar, options=compile_options(device, narrow_vectors=True)) if compiled else trade_bar

    rollout = PortfolioRolloutStats(specialists.names, envs.limits.max_var, device, num_rows)
    start_returns = None  # the starting point's validation returns (rank 0): what an iterate must beat
    start_turnover = None  # (rank 0) the start's turnover per unit of volatility over momentum's on validation
    if args.resume:
        if world.is_main:  # (the meta-controller is still the start, before the resumed weights replace it)
            ran = (start_validation or validation(meta))[1]
            start_returns, start_turnover = ran["system"].net_return, turnover_check(ran)["ratio"]
        state, mine = resume(args, "phase2", cfg, world)
        other = f"{args.output_dir}/latest.pt was trained over other specialists than {args.specialists_dir} holds now"
        ckpt.check_inputs_unchanged(state, "specialists_fingerprint", fingerprint_at_load, other, args.force)
        for key, flag, ours in (("timing", "--risk-timing", start_rule), ("allocation_rule", "--allocation-rule",
                                                                          allocation_rule)):  # fmt: skip
            if (key in state) != (ours is not None):  # the policies would not even start from the same point
                was = "with" if key in state else "without"
                raise ckpt.CheckpointError(f"{args.output_dir}/latest.pt was trained {was} {flag}: resume with "
                                           f"the same setting (or start a new run)")  # fmt: skip
        start_iteration, global_step, best = restore(
            state, mine, log, {"model": meta, "optimizer": optimizer}, {"env": envs, "twin": twin, "tracker": tracker}
        )
        next_obs = envs.observe()
        if "rollout" in mine:  # (latest.pt files from before the episode sums were kept have none)
            rollout.load_state_dict(mine["rollout"])
    log.info("phase 2: meta-controller over %s, %d rank(s) x %d rows x %d steps, %d iterations, device %s",
             specialists.names, world.size, num_rows, args.num_steps, num_iterations, device)  # fmt: skip

    own_steps = state["step_files"] if args.resume else None  # pruning counts only this run's step files
    run = Run(
        args, "phase2", world, device, log, num_iterations, steps_per_iteration, start_iteration, global_step, own_steps
    )
    report = None
    if not args.resume and world.is_main:  # the starting point is a candidate for best.pt
        report, ran = start_validation or validation(meta)
        start_returns, start_turnover = ran["system"].net_return, turnover_check(ran)["ratio"]
        best = {"sharpe": report["portfolio"]["sharpe"], "iteration": 0, "model": clone_state(meta)}
        ckpt.save_checkpoint(out_dir / "best.pt", model_payload(best["model"], meta, specialists, cfg, args))
    # (rank 0) an iterate must be within momentum's turnover where the start is
    turnover_gate = start_turnover is not None and start_turnover <= 1.0
    run.watch.lap("validation")  # the starting point's
    guard = DivergenceGuard("phase 2", device)
    for iteration in range(start_iteration, num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

        rollout.reset()
        for step in range(args.num_steps):
            global_step += num_rows * world.size
            with torch.no_grad():
                meta_noise = torch.randn(num_rows, num_specialists + 1, device=device)  # (outside the compiled bar)
                bar = envs.bar
                evidence = None if risk is None else risk.index_select(0, bar)  # volatility at the rows' bars
                bar_out = step_bar(envs, twin, next_obs["instruments"], next_obs["portfolio"], evidence, tracker,
                                   meta_noise)  # fmt: skip
            meta_obs[step], meta_out, allocation, appetite, proposal, stepped, twin_stepped = bar_out[:7]
            reward, twin_reward, held = bar_out[7:]
            guard.watch(proposal, global_step)
            meta_actions[step], meta_logprobs[step], meta_values[step] = meta_out
            next_obs, _, _, truncated, info = envs.finish_step(*stepped)  # the autoresets (eager)
            if twin_stepped is not None:
                twin.finish_step(*twin_stepped)
            rewards[step] = reward if twin_reward is None else reward - twin_reward
            truncs[step] = truncated.float()
            # the final observation bootstraps a truncated row's value: its parts now, assembled after the rollout
            final_inst_obs[step] = info["final_obs"]["instruments"]
            final_portfolio[step] = info["final_obs"]["portfolio"]
            final_held[step] = held
            if risk is not None:  # a truncated row's final observation is of the next bar
                final_risk[step] = risk.index_select(0, (bar + 1).clamp_max(len(risk) - 1))
            rollout.add(info, reward, allocation, twin_reward, appetite, None if evidence is None else evidence[:, 0])
        guard.raise_if_diverged()
        run.watch.lap("rollout")

        # bootstrap value if not done: a truncated row continues from V(final obs), not from zero
        with torch.no_grad():
            final_parts = (final_inst_obs, final_portfolio, final_held, *([] if risk is None else [final_risk]))
            final_meta_values = at_truncations(final_value, truncs, *final_parts)
            next_positions = specialists.positions(next_obs["instruments"], owner)
            next_evidence = None if risk is None else risk.index_select(0, envs.bar)
            next_meta_value = meta.get_value(tracker.observe(next_obs["portfolio"], next_positions, next_evidence))
            meta_adv = gae(
                rewards, meta_values, final_meta_values, next_meta_value, truncs, args.gamma, args.gae_lambda
            )
            meta_returns = meta_adv + meta_values

        # flatten the batch
        b_meta_obs = meta_obs.reshape(-1, meta_obs_size)
        b_meta_actions = meta_actions.reshape(-1, num_specialists + 1)
        b_meta_logprobs, b_meta_adv, b_meta_returns = (x.reshape(-1) for x in (meta_logprobs, meta_adv, meta_returns))

        # Optimizing the policy and value network
        clipfracs = []
        meta_rollout = (b_meta_obs, b_meta_actions, b_meta_logprobs, b_meta_adv, b_meta_returns)
        for _epoch in range(args.n_epochs):
            for mb in minibatches(steps_per_iteration, args.minibatch_size, device):  # a fresh shuffle each epoch
                run.watch.minibatches += 1
                meta_pg, meta_v_loss, meta_entropy, approx_kl, clipfrac = update(mb, *meta_rollout)
                clipfracs.append(clipfrac)
            if args.target_kl is not None and bool(distributed.mean(approx_kl, world) > args.target_kl):
                break  # (on every rank at once: the decision uses the KL averaged over ranks)

        # statistics move only between iterations (pooled over ranks)
        distributed.update_running_norm(meta.norm, b_meta_obs.unsqueeze(0), world)

        run.watch.lap("update")  # GAE, the PPO epochs and the statistics

        # TRY NOT TO MODIFY: record rewards for plotting purposes (one host sync per iteration)
        sps = run.sps(global_step)
        scalars = update_scalars(optimizer.param_groups[0]["lr"], sps, meta_v_loss, meta_pg, meta_entropy, approx_kl,
                                 clipfracs, explained_variance(meta_values.reshape(-1), b_meta_returns))  # fmt: skip
        scalars.update(rollout.scalars())  # episodes, the risk layer, the allocation
        run.log_scalars(scalars, global_step)

        # VALIDATION: the whole hierarchy on the validation split, next to the baselines (rank 0)
        if world.is_main and (iteration % args.eval_interval == 0 or iteration == num_iterations):
            report, ran = validation(meta)
            over_start, moved = gain(ran), turnover_check(ran)
            log_validation(run.writer, report, global_step)
            sharpe = report["portfolio"]["sharpe"]
            if sharpe > best["sharpe"] and over_start["replaces"] and (moved["within"] or not turnover_gate):
                best = {"sharpe": sharpe, "iteration": iteration, "model": clone_state(meta),
                        "gain": {k: over_start[k] for k in ("difference", "low", "high")}}  # fmt: skip
                ckpt.save_checkpoint(out_dir / "best.pt", model_payload(best["model"], meta, specialists, cfg, args))
            log.info("iteration %d/%d step %d SPS %d val sharpe %.3f (start %+.3f [%+.3f, %+.3f]) turnover/vol "
                     "%.3fx momentum's [%.3f, %.3f] (gate %s)", iteration, num_iterations, global_step, sps, sharpe,
                     over_start["difference"], over_start["low"], over_start["high"], moved["ratio"], moved["low"],
                     moved["high"], "on" if turnover_gate else "off")  # fmt: skip
        run.save_latest(iteration, global_step, best, model_payload(clone_state(meta), meta, specialists, cfg, args),
                        {"optimizer": optimizer}, {"env": envs, "twin": twin, "tracker": tracker,
                                                   "rollout": rollout})  # fmt: skip
        if run.stop_here(iteration):
            return {"stopped_at_iteration": iteration, "global_step": global_step}
    timing, ranks = run.finish(global_step, parameter_fingerprint(meta))  # (every rank: the weights must agree)
    if not world.is_main:
        return {"rank": world.rank, "global_step": global_step}
    if best["iteration"] == 0:  # the start kept: it goes on with the normaliser and critic the run learned
        best["model"] = start_with_learned_estimates(best["model"], meta.state_dict())
        ckpt.save_checkpoint(out_dir / "best.pt", model_payload(best["model"], meta, specialists, cfg, args))
        log.info("best.pt: the start (iteration 0), with the last iterate's observation normaliser and critic")

    # FINAL EVALUATION: the best meta-controller (what Phase 3 loads) on the validation split
    fingerprints = {"at_load": fingerprint_at_load, "at_end": parameter_fingerprint(specialists)}
    facts = {"global_step": global_step, "config_hash": cfg.hash(), "seed": args.seed, "timing": timing,
             "ranks": ranks, "specialists_fingerprint": fingerprints, "allocation_rule_check": rule_check,
             "turnover_gate": bool(turnover_gate), "start_with_learned_estimates": best["iteration"] == 0,
             "sharpe_reward": None if book is None else book.as_dict()}  # fmt: skip
    result = final_evaluation(args, meta, best, report, validate, val, facts, log)
    run.writer.close()
    return result


def final_evaluation(
    args: Args, meta: MetaController, best: dict, report: dict | None, validate, val, facts: dict, log
) -> dict:
    """The best meta-controller (what `best.pt` holds) on the validation split; writes `metrics.json`
    (with the run's `facts`) and prints the report."""
    if report is None:  # resumed after the last iteration's checkpoint: validate the final iterate again
        report = validate(meta)
    meta.load_state_dict(best["model"])
    best_report = validate(meta)
    result = {
        **best_report,
        "phase": 2,
        "best_iteration": best["iteration"],
        "best_gain_over_start": best.get("gain"),  # (None: best.pt is the starting point)
        "replace_confidence": args.replace_confidence,
        "final_iterate": {"portfolio": report["portfolio"], "allocation_efficiency": report["allocation_efficiency"]},
        **facts,
    }
    ckpt.atomic_write_json(Path(args.output_dir) / "metrics.json", result)
    text = format_report(best_report)
    log.info("validation (best.pt):\n%s", text)
    print(f"Phase 2 validation, best meta-controller ({val.split} split, {val.num_bars} bars):\n{text}")
    return result


def model_payload(model_state: dict, meta: MetaController, specialists, cfg, args: Args) -> dict:
    """What Phase 3 and the evaluation need to rebuild and check the meta-controller."""
    return {
        "kind": "phase2",
        "model": model_state,
        **meta.describe(),
        "specialists": specialists.names,
        "specialists_fingerprint": parameter_fingerprint(specialists),
        "specialists_dir": str(args.specialists_dir),
        "config_hash": cfg.hash(),
        "config": cfg.to_dict(),
    }


if __name__ == "__main__":
    cli(main, Args, ALIASES, "phase2_meta.py")
