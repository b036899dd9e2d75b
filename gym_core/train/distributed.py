"""Data parallelism with PyTorch's own engine: ``torchrun`` starts the processes,
``torch.distributed`` (gloo on CPU, NCCL on GPU) connects them, and DDP all-reduces the
gradients. One process (no ``WORLD_SIZE`` in the environment) is the same code with
``world == 1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs and the summary."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def all_reduce_max(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def all_reduce_mean_dict(self, d: dict[str, float]) -> dict[str, float]:
        """Average metrics over ranks (keys are the same on every rank)."""
        if not self.enabled:
            return d
        keys = sorted(d)
        summed = self.all_reduce_sum([float(d[k]) for k in keys])
        return {k: v / self.world for k, v in zip(keys, summed)}

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def scatter(self, objs: list[Any] | None) -> Any:
        """Rank 0's ``objs[r]`` (picklable) on rank ``r``; ``objs`` is read on rank 0 only."""
        if not self.enabled:
            return objs[0]
        out: list[Any] = [None]
        dist.scatter_object_list(out, list(objs) if self.main else None, src=0)
        return out[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of a (scalar) tensor over all ranks; itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over all ranks (elementwise); itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def setup(device_name: str) -> Dist:
    """Join the process group ``torchrun`` describes in the environment, if any."""
    from gym_core.base.errors import GymError

    if device_name == "cuda" and not torch.cuda.is_available():
        raise GymError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if world <= 1:
        return Dist(0, 1, torch.device("cuda" if want_cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return Dist(rank, world, device)


def teardown(synchronize: bool = False) -> None:
    """Destroy the process group. ``synchronize`` (a job that ended normally on every rank):
    wait for every rank first, so that no rank shuts gloo down while another still has
    work in flight (seen as a SIGABRT, "terminate called without an active exception", on
    a loaded machine). Not after an error: the other ranks may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
