"""torchrun-native data parallelism: one process per device, gloo on CPU, nccl on GPU (nanoGPT's pattern)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Context", "setup", "teardown", "all_sum"]


@dataclass(frozen=True)
class Context:
    """Where this process runs: its rank among ``world`` processes and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no GPU is visible; use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device(choice)


def setup(device: str = "auto") -> Context:
    """Join the process group torchrun describes in the environment, or run alone when there is none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = _device(device, local_rank)
    if world == 1:
        return Context(0, 1, target)
    if not dist.is_initialized():
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), target)


def teardown(context: Context) -> None:
    """Leave the process group (after every rank is done)."""
    if context.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_sum(context: Context, *values: float) -> list[float]:
    """Sum numbers over every process (float64, so counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if context.world > 1:
        tensor = tensor.to(context.device)
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def barrier(context: Context) -> None:
    """Wait for every process."""
    if context.world > 1:
        dist.barrier()
