"""The distributed environment under ``torchrun`` (or none): ranks, device, process group, sharding.

``torchrun --standalone --nproc_per_node P -m theorylab ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``LOCAL_WORLD_SIZE``; :func:`init_distributed` reads them and joins the process group (nccl when the ranks run on
CUDA, gloo on CPU; a one-machine job with fewer GPUs than processes falls back to CPU under ``--device auto``).
Without them it is a single process and nothing is initialised. Across machines the same command runs with
torchrun's rendezvous flags (``--nnodes N --node_rank i --rdzv_backend c10d --rdzv_endpoint HOST:PORT``) in place
of ``--standalone``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from ..env import available_cores as available_cores  # re-exported: the CLI and the tests import it from here

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0, the one that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group was started (a backend is set), i.e. gradients are all-reduced."""
        return self.backend is not None


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def job_rank_world() -> tuple[int, int]:
    """(this process's rank, the number of processes) from torchrun's environment, usable before any
    initialisation; (0, 1) unless both ``RANK`` and ``WORLD_SIZE`` are set, as :func:`init_distributed` decides
    (``RANK`` alone, left by another tool, had made a single process act as a silent non-main rank without the
    output folder's lock). ValueError naming the values unless they are integers with 0 <= rank < world."""
    if not launched_by_torchrun():
        return 0, 1
    raw_rank, raw_world = os.environ["RANK"], os.environ["WORLD_SIZE"]
    try:
        rank, world = int(raw_rank), int(raw_world)
    except ValueError:
        rank = world = -1
    if not 0 <= rank < world:
        raise ValueError(f"invalid torchrun environment: RANK={raw_rank!r}, WORLD_SIZE={raw_world!r} (need integers "
                         "with 0 <= RANK < WORLD_SIZE)")
    return rank, world


def device_plan(device: str = "auto") -> tuple[bool, str | None]:
    """(whether this process trains on CUDA, the warning to give when a torchrun job falls back to the CPU), or a
    ValueError for a device it cannot have. Reads only the environment, so the CLI checks it before it makes the
    output folder (a refused device had left an empty one behind); :func:`init_distributed` follows it.

    ``device``: "auto" (CUDA when present, else CPU), "cpu" or "cuda". Under torchrun each local process needs a
    GPU of its own (NCCL refuses two ranks on one GPU). Too few GPUs: with "auto" a one-machine job trains on CPU
    (gloo), with the warning; otherwise (``device="cuda"``, or a job over several machines, whose nodes would each
    decide alone and could pick different backends) it is a ValueError.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not use_cuda or not launched_by_torchrun():
        return use_cuda, None
    _, world = job_rank_world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count()
    if local_world <= gpus and local_rank < gpus:  # LOCAL_WORLD_SIZE may be missing (not torchrun)
        return True, None
    # every rank of a one-machine job sees the same counts, so all of them fall back together
    one_machine = "LOCAL_WORLD_SIZE" in os.environ and local_world == world
    shortage = f"{max(local_world, local_rank + 1)} processes on this machine but {gpus} GPU(s)"
    advice = f"run torchrun with --nproc_per_node {gpus}{'' if one_machine else ' on every node'}"
    if device == "cuda" or not one_machine:
        raise ValueError(f"device {device!r}: {shortage}, and each process needs its own; {advice}, or pass "
                         "--device cpu")
    return False, f"{shortage}: training on CPU (gloo); {advice} to train on the GPU"


def init_distributed(device: str = "auto", threads: int | None = None) -> DistEnv:
    """Join the torchrun process group if there is one and pick this rank's device (:func:`device_plan`) and CPU
    threads. On CPU each process gets an equal share of the cores (``threads`` overrides): the ranks of one
    machine must not oversubscribe it.
    """
    use_cuda, fallback = device_plan(device)
    if not launched_by_torchrun():
        if threads is not None:
            torch.set_num_threads(threads)
        return DistEnv(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, world = job_rank_world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if fallback and local_rank == 0:  # once per machine
        warnings.warn(fallback, stacklevel=2)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    torch.set_num_threads(threads if threads is not None else max(1, available_cores() // local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, local_world, dev, backend)


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(env: DistEnv, values: Sequence[float]) -> list[float]:
    """Sum a few numbers over the ranks (float64); the identity in a single process."""
    if not env.distributed:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def shard_items(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share of ``items`` (every ``world_size``-th, starting at ``rank``): e.g. the points of a
    sweep grid spread over the ranks of a torchrun job. The shards are disjoint and cover ``items``."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return list(items[rank::world_size])
