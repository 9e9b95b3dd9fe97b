"""Who this process is under ``torchrun``, and joining the process group (a single process without it)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Processes:
    """This process's place among the training processes (rank 0 of 1 without ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that validates, logs and writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_processes(device: torch.device) -> tuple[Processes, torch.device]:
    """Join the process group when started by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set).

    NCCL on CUDA (each process takes GPU ``LOCAL_RANK``), gloo on CPU.

    Returns:
        this process's :class:`Processes` and its device (``cuda:LOCAL_RANK`` on GPUs, else ``device``).
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes(), device
    procs = Processes(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return procs, device
