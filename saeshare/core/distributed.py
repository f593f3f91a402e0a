"""Several processes under torchrun (docs/design.md#scale): `torchrun --nproc_per_node G wmppc.py ...`.

Every rank runs the same command; the correlation engine gives each rank a share of the layer-pair
work (longest first, balanced by cost), each rank writes its pairs to the disk cache, and all read the
whole result from it after a barrier, so every rank ends with what one process computes. Only rank 0
prints. Without torchrun (WORLD_SIZE unset or 1) nothing here does anything.
"""
from __future__ import annotations

import datetime
import heapq
import os
import sys

import torch
import torch.distributed as dist

from errors import OptionError

TIMEOUT = datetime.timedelta(hours=12)
"""How long a rank waits for the others at a barrier: a share of a paper-scale matrix takes hours. A rank
that fails does not make the others wait: torchrun stops them all."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_device(device: torch.device) -> torch.device:
    """One device per rank: cuda becomes cuda:LOCAL_RANK under torchrun."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def resolve_device(device: str) -> torch.device:
    """`auto` is cuda when present, else cpu; under torchrun, `cuda` is this rank's GPU (LOCAL_RANK)."""
    if device == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OptionError("device", f"unknown {{opt}} {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", f"{{opt}} {device} asked for but no CUDA GPU is available; use {{opt}} cpu")
    return local_device(dev)


def init(device: torch.device) -> None:
    """Join the process group when launched by torchrun with more than one process: gloo for CPU, NCCL
    for CUDA. Ranks other than 0 print nothing on stdout (errors still reach stderr)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=local_device(device))
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")


def assign(costs: list[float]) -> list[int]:
    """The rank of each item: longest first, each to the least loaded rank (ties to the lowest rank), the
    same on every rank."""
    loads = [(0.0, r) for r in range(world_size())]
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return owner


def share(costs: list[float]) -> list[int]:
    """The indices of the items this rank computes (see assign)."""
    return [i for i, r in enumerate(assign(costs)) if r == rank()]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def from_rank0(*values):
    """Rank 0's values, on every rank (pickled)."""
    objs = list(values)
    dist.broadcast_object_list(objs, src=0)
    return objs
