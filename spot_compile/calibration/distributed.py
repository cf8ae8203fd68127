"""One process or many, through torch's own machinery: torchrun starts the processes and sets RANK, WORLD_SIZE and
LOCAL_RANK; `Processes.from_env` joins its process group (NCCL on GPUs, gloo on CPUs). Multi-node runs are torchrun's
rendezvous (`--nnodes`, `--rdzv-endpoint`): nothing here knows about nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spot_compile.errors import UsageError


def local_rank() -> int:
    """This process's index on its node, as torchrun numbers them (0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """`device` as given ("cpu", "cuda", "cuda:1"), or the GPU when one is visible, else the CPU; under torchrun each
    process takes the GPU of its local rank."""
    name = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but torch sees no CUDA GPU (torch.cuda.is_available() is False); use "
                             "--device cpu, or install a CUDA build of torch")
        if name == "cuda":
            name = f"cuda:{local_rank}"
        if torch.device(name).index >= torch.cuda.device_count():
            raise UsageError(f"{name} does not exist: torch sees {torch.cuda.device_count()} GPU(s); start at most that many "
                             "processes per node")
        torch.cuda.set_device(torch.device(name))
    elif name != "cpu":
        raise UsageError(f"unknown device {name!r}; use cpu, cuda or cuda:N")
    return torch.device(name)


def default_workers(device: torch.device) -> int:
    """Data loader processes per training process: none on the CPU, where the training threads use every core
    (shipped recipe, 2 cores: 61.1 images/s with none, 58.4 with two; docs/results/calibration_scaling/calibration_scaling.md); on a GPU
    up to 8, sharing the node's cores among the processes torchrun started on it."""
    if device.type == "cpu":
        return 0
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // per_node - 1))


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of one run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # joined here (not by the caller): left again by `close`

    @property
    def main(self) -> bool:
        """Rank 0 alone prints, validates' totals are read on it, and it alone writes files."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> Processes:
        """The processes torchrun started (its environment variables), their group joined (NCCL when `device` is a
        GPU, gloo otherwise); one process without them. A group the caller already joined is used as it is."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), local_rank())
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank(), owns_group=True)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """`values` averaged over the processes (the same on every process)."""
        if self.world_size > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world_size
        return values

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order (on every process)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def largest_difference(self, params: list[torch.Tensor]) -> float:
        """The largest absolute difference between any process's `params` and rank 0's: 0.0 when DistributedDataParallel
        kept the replicas identical, as it must."""
        if self.world_size == 1 or not params:
            return 0.0
        worst = torch.zeros((), device=params[0].device)
        for p in params:
            theirs = p.detach().clone()
            dist.broadcast(theirs, 0)
            worst = torch.maximum(worst, (p.detach() - theirs).abs().max())
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return float(worst)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leaves the process group if `from_env` joined it; a caller's own group stays theirs."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
