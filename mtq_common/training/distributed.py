"""Data-parallel training under `torchrun` (CleanRL's multi-GPU recipe), and a no-op without it.

    torchrun --standalone --nproc_per_node 2 phase1_ppo.py --timesteps 500000 --device cpu

Every rank runs the whole script: it steps its own environments (seeded `seed + RANK_SEED_STRIDE *
rank`), starts from rank 0's initial weights, and averages gradients with the other ranks (one
exchange of one flat buffer per minibatch) before clipping, so every rank takes the same optimiser
step and holds the same weights after every update. Rank 0 alone validates, logs and writes checkpoints; a
checkpoint carries every rank's environment and RNG state so that a resumed run continues exactly.
`--timesteps` stays the total across ranks. gloo on the CPU, NCCL on CUDA (one GPU per local rank).

A plain `python phase1_ppo.py` sees no `WORLD_SIZE` and runs as the single rank 0 of a world of one:
every function here then returns at once and the script behaves exactly as without this module.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mtq_common.training import checkpoint as ckpt

RANK_SEED_STRIDE = 7919
"""Rank r seeds its environments and action noise with `seed + 7919 r` (a prime: seeds 1, 2, 3 of a
seed sweep never collide with another seed's rank)."""


DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")
"""The device names accepted (`--device`, `training.device`): auto, cpu, cuda or cuda:N."""


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA when present; an unavailable CUDA request or another name is a clear error."""
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        raise ValueError(f"--device {name!r}: accepted auto, cpu, cuda or cuda:N (N a GPU's index)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    return device


@dataclass(frozen=True)
class World:
    """Where this process stands in the job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 validates, logs and writes every file."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def seed(self, seed: int) -> int:
        """This rank's seed for its environments and its action noise."""
        return seed + RANK_SEED_STRIDE * self.rank


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun), readable before `setup`."""
    return int(os.environ.get("RANK", "0"))


def setup(device_name: str) -> tuple[World, torch.device]:
    """Read torchrun's variables, join the process group (world size > 1 only) and pick the device.

    On CUDA each local rank takes its own GPU, `cuda:LOCAL_RANK`. Calling it again in the same
    process returns the group already joined.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = launch_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if world_size == 1:
        return World(), device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, world_size, local_rank), device


def shutdown(wait: bool = False) -> None:
    """Leave the process group (a no-op when none was joined).

    `wait=True` after a run that finished normally: every rank first waits for the others, so no
    rank tears its connections down while another still talks to it. After an error, do not wait
    (the other ranks may be stuck elsewhere; torchrun stops them when this process exits).
    """
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def iterations(timesteps: int, steps_per_rank_iteration: int, world: World) -> int:
    """PPO iterations for `timesteps` steps in total across ranks (at least one)."""
    return max(1, timesteps // (steps_per_rank_iteration * world.size))


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, world: World) -> None:
    """Copy rank 0's parameters and buffers to every rank: the same initial weights everywhere."""
    if not world.enabled:
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


@torch.no_grad()
def average_(tensors: Iterable[torch.Tensor], world: World) -> None:
    """Replace each tensor by its mean over ranks, in place, with one exchange of one flat buffer."""
    if not world.enabled:
        return
    tensors = list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if flat.device.type == "cpu":
        # gloo: an all-gather and a local sum in rank order (the same result on every rank). For
        # Phase 1's 34k gradients on the 2-core CPU it took 0.7-0.8 ms a call against the all-reduce's
        # 0.9-1.0 ms (benchmarks/collectives.py) and 2-rank training ran about 10% faster; on GPUs
        # NCCL's all-reduce is the right tool.
        gathered = [torch.empty_like(flat) for _ in range(world.size)]
        dist.all_gather(gathered, flat)
        flat = torch.stack(gathered).sum(0)
    else:
        dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a tensor over ranks (a new tensor; the input is left alone)."""
    value = value.detach().clone()
    average_([value], world)
    return value


@torch.no_grad()
def update_running_norm(norm, x: torch.Tensor, world: World) -> None:
    """Merge the observation batch `x [K, M, F]` of every rank into `norm` (a `RunningNorm`).

    Each rank holds M samples per group; the pooled moments are the mean of the rank means and the
    mean of the rank variances plus the spread of the rank means (equal counts), so every rank merges
    the same statistics and the normalisers stay identical.
    """
    batch_mean, batch_var = x.mean(1), x.var(1, unbiased=False)
    if world.enabled:
        pooled_mean = mean(batch_mean, world)
        batch_var = mean(batch_var + (batch_mean - pooled_mean).pow(2), world)
        batch_mean = pooled_mean
    norm.merge(batch_mean, batch_var, x.shape[1] * world.size)


def broadcast_value(value: float, world: World, device: torch.device) -> float:
    """Rank 0's number, on every rank (one host sync: used once per validation)."""
    if not world.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def to_cpu(obj: Any) -> Any:
    """A copy of nested dicts, lists and tuples with every tensor moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(value) for value in obj)
    return obj


def rank_states(local: dict, world: World) -> dict | None:
    """Every rank's resumable state (environments, RNG, ...), gathered on rank 0 for its checkpoint.

    Rank 0 gets `{**its own state, "world_size": W, "other_ranks": [rank 1's, ...]}`; the other
    ranks get None (they write nothing). Collective: every rank must call it.
    """
    if not world.enabled:
        return {**local, "world_size": 1, "other_ranks": []}
    gathered = [None] * world.size if world.is_main else None
    dist.gather_object(to_cpu(local), gathered, dst=0)
    if not world.is_main:
        return None
    return {**local, "world_size": world.size, "other_ranks": gathered[1:]}


def load_on_main(load: Callable[[], dict], world: World) -> dict:
    """Run `load` (read and check a checkpoint) on rank 0 and hand its result to every rank.

    Only rank 0 reads the file, so a multi-node job needs no shared file system; an error raised by
    `load` is raised again, with the same type and message, on every rank (none is left waiting).
    """
    if not world.enabled:
        return load()
    box: list[Any] = [None]
    if world.is_main:
        try:
            box[0] = ("ok", to_cpu(load()))
        except Exception as err:  # re-raised below on every rank, rank 0 included
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0)
    status, payload = box[0]
    if status == "error":
        raise payload
    return payload


def local_state(state: dict, world: World, path) -> dict:
    """This rank's part of a checkpoint written by `rank_states`; refuses another number of ranks."""
    saved = state.get("world_size", 1)
    if saved != world.size:
        raise ckpt.CheckpointError(
            f"{path} was written by a run on {saved} rank(s) and this run has {world.size}: each rank's "
            f"environments are in the checkpoint, so resume with the same number "
            f"({'python' if saved == 1 else f'torchrun --nproc_per_node {saved}'} ... --resume)"
        )
    return state if world.is_main else state["other_ranks"][world.rank - 1]


def weight_agreement(fingerprint: str, world: World) -> dict:
    """Every rank's weight fingerprint, gathered (collective): the ranks agree when all are equal.

    A run records this in its `metrics.json`; unequal fingerprints would mean the ranks diverged.
    """
    gathered: list[Any] = [fingerprint]
    if world.enabled:
        gathered = [None] * world.size
        dist.all_gather_object(gathered, fingerprint)
    identical = len(set(gathered)) == 1
    if not identical:
        logging.getLogger("mtq").error("the ranks' weights differ at the end of training: %s", gathered)
    return {"world_size": world.size, "fingerprints": gathered, "weights_identical": identical}
