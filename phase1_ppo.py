"""Phase 1: train the forex, commodities and equity specialists at once with PPO (CleanRL style).

    python phase1_ppo.py --config config/agents.yaml --timesteps 500000 \\
        --output-dir models/checkpoints/phase1 --log-dir logs/phase1 --device cuda

Each specialist is one Gaussian actor-critic that trades one instrument at a time; all specialists'
rows step in one batched `SpecialistEnv` (rows grouped by specialist) and their networks are stacked
weights (`mtq_common.agents.nets.SpecialistAgents`), so the rollout and the update are single batched passes
over all specialists. The action is a target in [-1, 1] (the clipped sample) that the position moves
towards by `--position-rate` each bar (partial adjustment, in every phase and the evaluation alike).
`--timesteps` counts environment steps per specialist (CleanRL's global_step).
Episodes end by truncation only (data end or `episode_length`): GAE bootstraps from the value of the
final observation. Outputs: `latest.pt`, `best.pt` (each specialist's slice from its best validation
Sharpe; a slice that keeps its start rule carries the last iterate's observation normaliser and critic, the same
actions: `nets.start_with_learned_estimates`), rotating `step_*.pt` and `metrics.json` in `--output-dir`;
`training.log` and TensorBoard events in `--log-dir`.

Data-parallel on N processes or GPUs (`mtq_common.training.distributed`): `torchrun --nproc_per_node N
phase1_ppo.py ...`. Each rank steps `--num-envs` rows per specialist with its own seed, gradients are
averaged over ranks, rank 0 validates and writes; `--timesteps` is the total over ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from mtq_common.agents.coordination import clip_components_
from mtq_common.agents.nets import SpecialistAgents, start_with_learned_estimates
from mtq_common.agents.ppo import (
    DivergenceGuard,
    FlatAdam,
    at_truncations,
    clipped_surrogate,
    gae,
    minibatches,
    normalise,
    update_scalars,
)
from mtq_common.agents.update import CompileChoice, PPOUpdate, use_compile
from mtq_common.data.features import FEATURE_NAMES
from mtq_common.data.market import iso_time
from mtq_common.data.splits import load_splits
from mtq_common.data.tables import build_tables, cost_rates
from mtq_common.envs.engine import POSITION_RATE
from mtq_common.envs.trading_env import SpecialistEnv, position_column, specialist_rows
from mtq_common.evaluation.rules import fit_scaled_trend, fit_trend_for
from mtq_common.evaluation.specialist_eval import evaluate_specialists, format_specialist_table
from mtq_common.training import checkpoint as ckpt
from mtq_common.training import distributed
from mtq_common.training.checkpoint import parameter_fingerprint
from mtq_common.training.compiling import compile_options
from mtq_common.training.config import ConfigError
from mtq_common.training.plumbing import (
    Run,
    autocast,
    cli,
    iterations,
    out_of_patience,
    restore,
    resume,
    seed_everything,
    start_run,
)

ALIASES = {"timesteps": "training.phase_1_timesteps"}


@dataclass
class Args:
    config: str | None = None
    """YAML config (defaults for every flag below that names a config key)."""
    timesteps: int = 500_000
    """Environment steps per specialist, all ranks together (config: training.phase_1_timesteps)."""
    output_dir: str = "models/checkpoints/phase1"
    """Where checkpoints and metrics.json go."""
    log_dir: str = "logs/phase1"
    """Where training.log and the TensorBoard events go."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    seed: int = 1
    """Seed of the weights, the action noise and the environments (rank r: seed + 7919 r, weights from rank 0)."""
    data_dir: str | None = None
    """Folder of <SYMBOL>.csv files; unset: the built-in synthetic market."""
    instruments: list[str] = field(default_factory=list)
    """Instruments traded (default: config data.instruments)."""
    num_envs: int = 64
    """Environment rows per specialist, on each rank (config: training.n_envs)."""
    specialists: list[str] = field(default_factory=list)
    """Train only these specialists (default: every specialist that owns a traded instrument)."""
    num_steps: int = 128
    """Rollout length per iteration."""
    learning_rate: float = 3e-4
    """Adam learning rate."""
    minibatch_size: int = 256
    """PPO minibatch size per specialist."""
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
    """Gradient-norm clip, applied to each specialist separately."""
    anneal_lr: bool = True
    """Anneal the learning rate linearly to 0."""
    norm_adv: bool = True
    """Normalise advantages per minibatch."""
    target_kl: float | None = None
    """Stop an iteration's epochs early above this approximate KL (unset: never)."""
    hidden_size: int = 64
    """Width of the two hidden layers."""
    position_rate: float = POSITION_RATE
    """Partial adjustment: each bar the position moves this share of the way to the policy's target (1: all)."""
    start_rule: bool = True
    """Start each specialist at the scaled trend rule (picked on the training split) and learn a residual over it."""
    eval_interval: int = 10
    """Validate (and update `best.pt`) every this many iterations, and at the end."""
    patience: int = 0
    """Stop once this many validations in a row have moved no specialist in best.pt (0: never, the whole --timesteps
    budget). On seeds 1-10 of the default job no specialist beat its start at any validation, so 3 would halve Phase
    1; it stays off: with the critic of iteration 30 instead of 61, seed 2's Phase 3 kept a later iterate that traded
    above momentum on test (docs/benchmarks.md)."""
    eval_segments: int = 16
    """Validation split pieces run in parallel (see mtq_common.evaluation.specialist_eval)."""
    keep_checkpoints: int = 3
    """Rotating step_*.pt files kept."""
    resume: bool = False
    """Continue from latest.pt in --output-dir."""
    force: bool = False
    """Resume even if the config differs from the checkpoint's."""
    stop_after: int | None = None
    """Stop after this many iterations in this invocation (time-sliced jobs; continue with --resume)."""
    next_return_diagnostic: bool = False
    """TEST AID ONLY: observe the next bar's return (look-ahead) to check that PPO learns at all."""
    progress: bool = True
    """Show a progress bar (only on a terminal)."""
    torch_threads: int = 1
    """torch intra-op threads on the CPU (0: torch's default); small-batch PPO is fastest with 1."""
    compile: CompileChoice = "auto"
    """torch.compile the PPO update and each rollout bar (agents/update.py): on, off, or auto (on for runs of 4,000
    minibatches or more)."""
    amp: bool = False
    """bf16 autocast in the PPO update (CUDA only; refused on the CPU)."""


def build_agents(args: Args, cfg, train, specialists: list[str], obs_size: int, log=None) -> SpecialistAgents:
    """The specialists as Phase 1 starts them. With `--start-rule`, at the scaled trend fit on the training split
    `train`: their actor's output layer is zero, so each trades the rule until training moves it (pipeline.py
    builds the same in its helper, to fit Phase 2's start beside Phase 1)."""
    start_rule = None
    if args.start_rule:  # the scaled trend, read by the specialists from its feature `trend_z_h`
        rule = fit_scaled_trend(train, cost_rates(train, cfg, "cpu").double().numpy(), args.position_rate)
        start_rule = {**dataclasses.asdict(rule), "index": FEATURE_NAMES.index(f"trend_z_{rule.half_life}")}
        if log is not None:
            log.info("start rule: scaled trend, half-life %d, scale %g (training split Sharpe %.2f)", rule.half_life,
                     rule.scale, rule.train_sharpe)  # fmt: skip
    return SpecialistAgents(specialists, obs_size, args.hidden_size, position_rate=args.position_rate,
                            position_index=position_column(train.num_instruments), start_rule=start_rule)  # fmt: skip


def check_args(args: Args) -> None:
    """This script's own flags, refused before any work (pipeline.py checks them before its first phase too)."""
    if args.patience < 0:
        raise ConfigError(f"--patience {args.patience}: accepted 0 (never stop early) or more validations")


def main(args: Args) -> dict:
    check_args(args)
    cfg, world, device, log = start_run(args, ALIASES, "phase1")  # config, ranks, log file, threads
    out_dir = Path(args.output_dir)
    specialists = args.specialists or cfg.active_specialists()
    for name in cfg.specialists:
        if name not in cfg.active_specialists():
            log.info("specialist %s skipped: no instrument of its sector in %s", name, cfg.data.instruments)
    unknown = [s for s in specialists if s not in cfg.active_specialists()]
    if unknown:
        raise ConfigError(f"--specialists {unknown}: not among the active specialists {cfg.active_specialists()}")
    rows_per_iteration = args.num_envs * args.num_steps  # per specialist, on this rank
    num_iterations = iterations(args, rows_per_iteration, world)  # (a minibatch never exceeds the rollout)
    minibatches_per_run = num_iterations * args.n_epochs * -(-rows_per_iteration // args.minibatch_size)
    compiled = use_compile(args.compile, minibatches_per_run, device, log)  # the update and each rollout bar

    # TRY NOT TO MODIFY: seeding (each rank its own environments and noise; rank 0's initial weights)
    seed = seed_everything(world.seed(args.seed))

    # ENV SETUP: one batched environment, rows grouped by specialist
    splits = load_splits(cfg)
    train, val = splits["train"], splits["val"]
    row_instrument, _ = specialist_rows(train, specialists, args.num_envs)
    # (not compiled on its own: at these 192 rows that saved about what tracing it cost; under --compile the whole
    # rollout bar is one graph instead, `trade_bar`, the specialists' samples with the step: docs/benchmarks.md)
    envs = SpecialistEnv(
        train, cfg, row_instrument, device=device, seed=seed, torch_mode=True,
        next_return_diagnostic=args.next_return_diagnostic, check_actions=False,
    )  # fmt: skip
    val_tables = build_tables(val, cfg, device)
    trend = fit_trend_for(train, cfg)  # the trend_filter rule's parameters, from the training split

    def validate(agent) -> dict:
        """Each specialist's backtests on the validation split (`eval_segments` pieces per instrument)."""
        return evaluate_specialists(
            agent, val, cfg, trend, device, args.eval_segments, val_tables, args.next_return_diagnostic
        )

    num_specialists, rows_per_specialist, obs_size = len(specialists), args.num_envs, envs.obs_size

    agent = build_agents(args, cfg, train, specialists, obs_size, log).to(device)
    distributed.broadcast_module(agent, world)
    optimizer = FlatAdam(agent.parameters(), lr=args.learning_rate, eps=1e-5)  # Adam, stepped as one tensor

    def ppo_loss(mb_obs, mb_actions, mb_logprobs, mb_advantages, mb_returns):
        """PPO's loss on one minibatch `[K, rows, ...]` (each specialist's mean, summed, so that the specialists'
        gradients stay apart) and its statistics."""
        with autocast(args.amp, device):
            _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb_obs, mb_actions)
            if args.norm_adv:
                mb_advantages = normalise(mb_advantages, dim=1)  # each specialist's own
            pg_loss, approx_kl, clipfrac = clipped_surrogate(
                newlogprob, mb_logprobs, mb_advantages, args.clip_range, dim=1
            )
            v_loss = 0.5 * ((newvalue - mb_returns) ** 2).mean(1)
            entropy_loss = entropy.mean(1)
            loss = (pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef).sum()
        return loss, (pg_loss.detach(), v_loss.detach(), entropy_loss.detach(), approx_kl, clipfrac)

    def clip(grads):  # each specialist's gradient norm on its own: one's large gradient must not shrink the others'
        clip_components_(grads, args.max_grad_norm)

    update = PPOUpdate([agent], optimizer, ppo_loss, clip, world, compiled, batch_dim=1)  # [K, rows]

    # ALGO LOGIC: storage setup, (num_steps, specialists, rows per specialist, ...)
    obs = torch.zeros((args.num_steps, num_specialists, rows_per_specialist, obs_size), device=device)
    final_obs = torch.zeros_like(obs)
    actions = torch.zeros((args.num_steps, num_specialists, rows_per_specialist), device=device)
    logprobs, rewards, values, truncs = (torch.zeros_like(actions) for _ in range(4))

    row_specialist = torch.arange(num_specialists, device=device).view(1, -1, 1).expand_as(truncs)

    def trade_bar(envs, obs, noise):
        """One bar up to the autoreset: every specialist's sample (from the standard normal `noise` the script drew:
        the generator's stream of `dist.sample()`), its position (the clipped target, partially adjusted) and the
        env's step (`SpecialistEnv.trade`). Pure tensor work: with `--compile` one graph, one call a bar."""
        action, logprob, _, value = agent.get_action_and_value(obs, noise=noise)
        position = agent.to_position(action, obs)
        return action, logprob, value, position, envs.trade(position.reshape(-1, 1))

    step_bar = torch.compile(trade_bar, options=compile_options(device, narrow_vectors=True)) if compiled else trade_bar

    def stalled(iteration: int) -> bool:  # --patience: rank 0's best.pt decides for every rank
        return out_of_patience(args.patience, args.eval_interval, iteration, num_iterations, newest(best), world,
                               device)  # fmt: skip

    def final_value(obs, specialist):  # V of truncated rows' final observations, each with its specialist's critic
        return agent.value_per_slot(obs.unsqueeze(0), specialist).squeeze(0)

    start_iteration, global_step, early_stop = 1, 0, None
    best = {"sharpe": {name: -float("inf") for name in specialists}, "iteration": {}, "model": None}
    next_obs, _ = envs.reset(seed=seed)
    if args.resume:
        state, mine = resume(args, "phase1", cfg, world)
        if state["specialists"] != specialists or state["obs_size"] != obs_size:
            raise ckpt.CheckpointError(f"{args.output_dir}/latest.pt trained {state['specialists']} on another layout")
        start_iteration, global_step, best = restore(
            state, mine, log, {"model": agent, "optimizer": optimizer}, {"env": envs}
        )
        next_obs = envs.observe()
        if stalled(start_iteration - 1):  # it had stopped early
            early_stop, start_iteration = start_iteration - 1, num_iterations + 1
    log.info("phase 1: %s on %d rank(s) x %d rows x %d steps, %d iterations, device %s", specialists, world.size,
             rows_per_specialist, args.num_steps, num_iterations, device)  # fmt: skip

    own_steps = state["step_files"] if args.resume else None  # pruning counts only this run's step files
    run = Run(
        args, "phase1", world, device, log, num_iterations, rows_per_iteration, start_iteration, global_step, own_steps
    )
    evaluation = None
    if world.is_main and not args.resume:  # the starting point is a candidate for best.pt (a start rule's worth)
        start = validate(agent)
        best = update_best(best, agent, start, 0)
        best["start_sharpe"] = {name: v["mean_sharpe"] for name, v in start.items()}
        log.info("start (iteration 0) val sharpe %s", {n: round(v, 3) for n, v in best["start_sharpe"].items()})
    guard = DivergenceGuard("phase 1", device)
    for iteration in range(start_iteration, num_iterations + 1):
        # Annealing the rate if instructed to do so.
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

        ep_return_sum = torch.zeros((), device=device)
        ep_count = torch.zeros((), device=device)
        for step in range(args.num_steps):
            global_step += rows_per_specialist * world.size
            step_obs = next_obs.view(num_specialists, rows_per_specialist, obs_size)
            obs[step] = step_obs
            with torch.no_grad():
                noise = torch.randn(num_specialists, rows_per_specialist, device=device)  # (outside the compiled bar)
                action, logprob, value, position, stepped = step_bar(envs, step_obs, noise)
            guard.watch(position.reshape(-1, 1), global_step)
            values[step], actions[step], logprobs[step] = value, action, logprob
            next_obs, reward, _, truncated, info = envs.finish_step(*stepped)  # the autoreset (eager)
            rewards[step] = reward.view(num_specialists, rows_per_specialist)
            truncs[step] = truncated.view(num_specialists, rows_per_specialist).float()
            final_obs[step] = info["final_obs"].view(num_specialists, rows_per_specialist, obs_size)
            ep_return_sum += (info["episode"]["r"] * info["_episode"]).sum()
            ep_count += info["_episode"].sum()
        guard.raise_if_diverged()
        run.watch.lap("rollout")

        # bootstrap value if not done: a truncated row continues from V(final obs), not from zero
        with torch.no_grad():
            final_values = at_truncations(final_value, truncs, final_obs, row_specialist)
            next_value = agent.get_value(next_obs.view(num_specialists, rows_per_specialist, obs_size))
            advantages = gae(rewards, values, final_values, next_value, truncs, args.gamma, args.gae_lambda)
            returns = advantages + values

        # flatten the batch per specialist: [K, num_steps * rows, ...]
        b_obs = obs.transpose(0, 1).reshape(num_specialists, -1, obs_size)
        b_logprobs, b_actions, b_advantages, b_returns, b_values = (
            x.transpose(0, 1).reshape(num_specialists, -1) for x in (logprobs, actions, advantages, returns, values)
        )

        # Optimizing the policy and value network
        clipfracs = []
        for _epoch in range(args.n_epochs):
            for mb in minibatches(rows_per_iteration, args.minibatch_size, device):  # a fresh shuffle each epoch
                run.watch.minibatches += 1
                pg_loss, v_loss, entropy_loss, approx_kl, clipfrac = update(
                    mb, b_obs, b_actions, b_logprobs, b_advantages, b_returns
                )
                clipfracs.append(clipfrac)
            if args.target_kl is not None and bool(distributed.mean(approx_kl, world).max() > args.target_kl):
                break  # (on every rank at once: the decision uses the KL averaged over ranks)

        # Observation statistics move only between iterations, so a rollout and its update agree.
        distributed.update_running_norm(agent.norm, b_obs, world)
        y_pred, y_true = b_values, b_returns
        explained_var = 1 - (y_true - y_pred).var(1) / y_true.var(1).clamp_min(1e-8)

        run.watch.lap("update")  # GAE, the PPO epochs and the statistics

        # TRY NOT TO MODIFY: record rewards for plotting purposes (one host sync per iteration)
        sps = run.sps(global_step)
        scalars = update_scalars(
            optimizer.param_groups[0]["lr"], sps, v_loss, pg_loss, entropy_loss, approx_kl, clipfracs, explained_var
        )
        if ep_count.item() > 0:
            scalars["charts/episodic_return"] = (ep_return_sum / ep_count).item()
        for i, name in enumerate(specialists):
            scalars[f"specialists/{name}/explained_variance"] = explained_var[i].item()
            scalars[f"specialists/{name}/action_std"] = agent.log_std[i].exp().item()
        run.log_scalars(scalars, global_step)

        # VALIDATION: per-instrument backtests; each specialist's best slice goes into best.pt
        if world.is_main and (iteration % args.eval_interval == 0 or iteration == num_iterations):
            evaluation = validate(agent)
            best = update_best(best, agent, evaluation, iteration)
            log_validation(run.writer, evaluation, global_step)
            log.info("iteration %d/%d step %d SPS %d val sharpe %s", iteration, num_iterations, global_step, sps,
                     {n: round(v["mean_sharpe"], 3) for n, v in evaluation.items()})  # fmt: skip
            ckpt.save_checkpoint(out_dir / "best.pt", model_payload(best["model"], agent, cfg, specialists, val))
        run.save_latest(iteration, global_step, best, model_payload(agent.state_dict(), agent, cfg, specialists, val),
                        {"optimizer": optimizer}, {"env": envs})  # fmt: skip
        if stalled(iteration):
            log.info("no specialist moved in best.pt in %d validations (newest: iteration %d): stopping at iteration "
                     "%d of %d (--patience)", args.patience, newest(best), iteration, num_iterations)  # fmt: skip
            early_stop = iteration
            break
        if run.stop_here(iteration):
            return {"stopped_at_iteration": iteration, "global_step": global_step}
    timing, ranks = run.finish(global_step, parameter_fingerprint(agent))  # (every rank: the weights must agree)
    if not world.is_main:
        return {"rank": world.rank, "global_step": global_step}
    kept = [i for i, name in enumerate(specialists) if best["iteration"].get(name) == 0]
    if kept and agent.start_rule is not None:  # starts kept: they go on with the normaliser and critic learned
        best["model"] = start_with_learned_estimates(best["model"], agent.state_dict(), kept)
        ckpt.save_checkpoint(out_dir / "best.pt", model_payload(best["model"], agent, cfg, specialists, val))
        log.info("best.pt: %s at the start rule (iteration 0), with the last iterate's observation normaliser and "
                 "critic", [specialists[i] for i in kept])  # fmt: skip

    # FINAL EVALUATION: the best specialists (what Phase 2 loads) on the validation split
    facts = {"global_step": global_step, "config_hash": cfg.hash(), "seed": args.seed, "data": data_summary(val),
             "trend_filter": dataclasses.asdict(trend), "start_rule": agent.start_rule,
             "start_sharpe": best.get("start_sharpe"), "patience": args.patience, "early_stop_iteration": early_stop,
             "timing": timing, "ranks": ranks}  # fmt: skip
    result = final_evaluation(args, agent, best, evaluation, validate, val, facts, log)
    run.writer.close()
    return result


def final_evaluation(
    args: Args, agent: SpecialistAgents, best: dict, evaluation: dict | None, validate, val, facts: dict, log
) -> dict:
    """The best specialists (what `best.pt` holds) on the validation split, next to the last iterate;
    writes `metrics.json` (with the run's `facts`) and prints the table."""
    final_iterate = evaluation or validate(agent)
    agent.load_state_dict(best["model"])
    best_eval = validate(agent)
    result = {
        "phase": 1,
        "split": "val",
        "specialists": best_eval,
        "final_iterate": final_iterate,
        "best_iteration": best["iteration"],
        **facts,
    }
    ckpt.atomic_write_json(Path(args.output_dir) / "metrics.json", result)
    table = format_specialist_table(best_eval)
    log.info("validation (best.pt, %s bars):\n%s", val.num_bars, table)
    print(f"Phase 1 validation, best specialists ({val.split} split, {val.num_bars} bars):\n{table}")
    return result


def newest(best: dict) -> int:
    """The newest iteration a specialist in best.pt comes from (0: every one is at its start)."""
    return max(best["iteration"].values(), default=0)


def update_best(best: dict, agent: SpecialistAgents, evaluation: dict, iteration: int) -> dict:
    """Copy each specialist whose validation Sharpe improved into the best model's stacked weights."""
    state = {key: value.clone() for key, value in agent.state_dict().items()}
    model = best["model"] or state
    for i, name in enumerate(agent.names):
        sharpe = evaluation[name]["mean_sharpe"]
        if sharpe > best["sharpe"][name]:
            best["sharpe"][name], best["iteration"][name] = sharpe, iteration
            for key, value in state.items():
                if key == "norm.count":
                    continue  # shared count: the per-specialist mean and var are what matter
                model[key][i] = value[i]
    best["model"] = model
    return best


def model_payload(model_state: dict, agent: SpecialistAgents, cfg, specialists: list[str], market) -> dict:
    """What Phase 2 needs to rebuild and check the specialists."""
    return {
        "kind": "phase1",
        "model": model_state,
        "specialists": specialists,
        **agent.describe(),
        "symbols": market.symbols,
        "sectors": market.sectors,
        "bars_per_year": market.bars_per_year,
        "config_hash": cfg.hash(),
        "config": cfg.to_dict(),
    }


def data_summary(market) -> dict:
    return {
        "source": market.source,
        "split": market.split,
        "start": iso_time(market.timestamps[0], market.bars_per_day),
        "end": iso_time(market.timestamps[-1], market.bars_per_day),
        "bars": market.num_bars,
        "instruments": market.symbols,
    }


def log_validation(writer: SummaryWriter, evaluation: dict, global_step: int) -> None:
    """`trading/*` tags: means over all instruments, and each specialist's mean Sharpe."""
    rows = [row for table in evaluation.values() for key, row in table.items() if key != "mean_sharpe"]
    for key in ("sharpe", "sortino", "max_drawdown", "win_rate", "total_return"):
        writer.add_scalar(f"trading/{key}", float(np.mean([row[key] for row in rows])), global_step)
    for name, table in evaluation.items():
        writer.add_scalar(f"trading/sharpe_{name}", table["mean_sharpe"], global_step)


if __name__ == "__main__":
    cli(main, Args, ALIASES, "phase1_ppo.py")
