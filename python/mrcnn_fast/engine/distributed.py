"""Multi-process training with torchrun: process-group set-up from the environment and small helpers.

    torchrun --nproc_per_node=8 -m mrcnn_fast train ...

Every helper works unchanged in a single process (world size 1, rank 0), so the trainer never branches
on whether it runs distributed. Backend: nccl when the process owns a GPU, gloo otherwise.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: str = "auto") -> DistContext:
    """Joins the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Without those variables (or WORLD_SIZE=1) this returns a single-process context and creates no group.
    Calling it again after the group exists returns the same context.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = _resolve_device(device, local_rank)
    if world_size <= 1:
        return DistContext(0, 1, 0, dev)
    if dev.type == "cuda":
        # Set before the group exists so nccl's communicators bind to this process's GPU.
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_gather_object(obj: Any) -> list:
    """Every rank's obj, in rank order (picklable objects; [obj] in a single process)."""
    if not is_dist():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """src's obj on every rank."""
    if not is_dist():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of t over ranks (a new tensor; t itself in a single process)."""
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copies src's buffers (e.g. BatchNorm running statistics) to every rank, in place.

    DDP syncs buffers at the start of each forward, so after the last training step every rank holds
    running statistics of its own last batch; evaluation and checkpoints want rank 0's.
    """
    if not is_dist():
        return
    for b in unwrap(module).buffers():
        dist.broadcast(b.data, src=src)


def cleanup() -> None:
    """Leaves the process group. The barrier first: a rank tearing down gloo while a peer still talks to it
    can abort the peer ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def exit_after_cleanup(code: int = 0):
    """Leaves the process group (if any) and exits the process with code.

    In a distributed process this skips interpreter finalisation (os._exit after flushing stdio): gloo's
    worker threads can still be releasing finished work objects that hold Python references while the
    interpreter shuts down, which aborts the process ("terminate called without an active exception",
    torch 2.x) and turns a successful run into a failed one. Single-process runs exit normally.
    """
    was_dist = dist.is_available() and dist.is_initialized()
    cleanup()
    if not was_dist:
        raise SystemExit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper."""
    wrapped = isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel))
    return model.module if wrapped else model
