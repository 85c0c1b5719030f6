"""The little the trainer needs to know about the process group."""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .logs import printed_to_log


@dataclass(frozen=True)
class RankInfo:
    rank: int  # global
    local_rank: int  # on this node
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_info() -> RankInfo:
    """Ranks as the launcher (deepspeed, torchrun, Slurm via our sbatch) set them; 0/0/1 alone."""
    return RankInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("WORLD_SIZE", 1)))


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_rank_env() -> None:
    """The environment of a one-process group without a launcher (tools, benchmarks); what is
    already set is kept."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init(info: RankInfo, timeout=None) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and pick this rank's device. ``timeout``: how long a
    collective may wait (a ``timedelta``; the default is the process group's own)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cuda":
        torch.cuda.set_device(info.local_rank)
    init_process_group(acc.communication_backend_name(), timeout)
    return torch.device(acc.device_name(info.local_rank) if acc.device_name() == "cuda" else "cpu")


def init_process_group(backend: str, timeout=None) -> None:
    """``deepspeed.init_distributed``, without leaking DeepSpeed's CPU shared memory.

    On CPUs DeepSpeed gives each rank a shared-memory all-reduce buffer,
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>`` (69 MB), and
    never removes it: every CPU run used to leave 69 MB of memory per rank behind until reboot (a
    test suite, tens of GB). All ranks have mapped each other's buffer when the call returns, so
    after one barrier each rank removes its buffer's name; the mappings live on until the process
    exits, however it exits."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    with printed_to_log("deepspeed"):  # on CPUs it prints that it built its shared-memory op
        deepspeed.init_distributed(dist_backend=backend, **({"timeout": timeout} if timeout is not None else {}))
    if get_accelerator().device_name() != "cpu":
        return
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    dist.barrier()
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # no shared-memory op was built (other DeepSpeed builds)
        pass


def _reduce(value: float, op, device) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.item()


def any_rank(flag: bool, device) -> bool:
    """True on every rank if ``flag`` is true on any (so that all ranks take the same branch)."""
    return _reduce(float(flag), dist.ReduceOp.MAX, device) > 0


def sum_over_ranks(floats: torch.Tensor, ints: torch.Tensor) -> tuple[list[float], list[int]]:
    """Two small 1-D tensors on this rank's device — ``float64`` and ``int64`` — summed over the ranks and read
    back to the host as Python numbers in one copy (one all-reduce each, queued on the device; one host
    synchronisation)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        floats, ints = floats.clone(), ints.clone()
        dist.all_reduce(floats, op=dist.ReduceOp.SUM)
        dist.all_reduce(ints, op=dist.ReduceOp.SUM)
    host = torch.cat([floats.view(torch.int64), ints]).tolist()  # the float64 bits travel as int64
    n = len(floats)
    return list(struct.unpack(f"<{n}d", struct.pack(f"<{n}q", *host[:n]))), host[n:]


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` (a 1-D float tensor on this rank's device, the same length on every rank) of every rank, as a
    [world_size, n] CPU tensor, row r from rank r. Collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values.detach().cpu()[None]
    out = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(out, values.detach().contiguous())
    return torch.stack(out).cpu()


def max_over_ranks(value: float, device) -> float:
    """The largest ``value`` of any rank (on every rank)."""
    return _reduce(value, dist.ReduceOp.MAX, device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
