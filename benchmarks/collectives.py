"""Cost of one gradient exchange between ranks: all-reduce against all-gather, at Phase 1's gradient size.

    torchrun --standalone --nproc_per_node 2 -m benchmarks.collectives [--calls 1000] [--numel N]

PPO exchanges gradients once per minibatch (Phase 1's defaults: 320 times per iteration), so this
latency, not bandwidth, is what limits data-parallel training on a small CPU machine. The default
size is the parameter count of Phase 1's stacked specialists on the default config. Rank 0 prints
the mean time per call of each collective, after `--warmup` untimed calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import tyro


@dataclass
class Args:
    calls: int = 1000
    """Timed calls per collective."""
    warmup: int = 50
    """Untimed calls before each measurement."""
    numel: int | None = None
    """Floats exchanged per call (default: Phase 1's parameter count on the default config)."""


def phase1_parameter_count() -> int:
    from mtq_common.agents.nets import SpecialistAgents
    from mtq_common.data.splits import load_splits
    from mtq_common.envs.trading_env import SpecialistEnv, specialist_rows
    from mtq_common.training.settings import load_config

    cfg = load_config(None)
    train = load_splits(cfg)["train"]
    names = cfg.active_specialists()
    env = SpecialistEnv(train, cfg, specialist_rows(train, names, 1)[0], seed=0, torch_mode=True)
    return sum(p.numel() for p in SpecialistAgents(names, env.obs_size).parameters())


def main(args: Args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    numel = args.numel or phase1_parameter_count()
    flat = torch.randn(numel)
    gathered = [torch.empty_like(flat) for _ in range(world)]

    def all_reduce() -> None:
        dist.all_reduce(flat)

    def all_gather() -> None:
        dist.all_gather(gathered, flat)
        torch.stack(gathered).sum(0)

    for name, fn in (("all_reduce", all_reduce), ("all_gather + sum", all_gather)):
        for _ in range(args.warmup):
            fn()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.calls):
            fn()
        seconds = (time.perf_counter() - start) / args.calls
        if rank == 0:
            print(f"{name:<18} {numel:,} floats, {world} ranks (gloo): {1e3 * seconds:.2f} ms per call")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(tyro.cli(Args))
