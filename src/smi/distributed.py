"""torchrun support: which process this is, and the collectives smi needs (barrier, a flag, a mean)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Dist", "from_env"]


@dataclass(frozen=True)
class Dist:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"  # this process's device: the one asked for, or cuda:LOCAL_RANK under nccl

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True on every process if ``ok`` is true on every process (a tensor all-reduce, no pickling)."""
        if not self.active:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(flag)
        return int(flag.item()) == 0

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` over the processes, in place (one all-reduce of their concatenation)."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def from_env(device: str = "cpu") -> Dist:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend=backend)
    return Dist(rank, world, local, f"cuda:{local}" if backend == "nccl" else device)
