"""torch.distributed in one place; every function also works in a plain single process."""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import time

import torch
import torch.distributed as dist

MAX = dist.ReduceOp.MAX
SUM = dist.ReduceOp.SUM
log = logging.getLogger(__name__)
_host_group = None  # a gloo group for flags on host memory when the default group is NCCL (see any_rank)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce(t: torch.Tensor, op=SUM) -> torch.Tensor:
    """In-place sum (by default) across ranks; returns ``t`` for chaining."""
    if is_dist():
        dist.all_reduce(t, op=op)
    return t


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(failure: str | None) -> str | None:
    """Every rank calls this at the same point with its own failure (None: none); all get the same answer:
    the first failing rank's message, prefixed with its rank, or None when no rank failed.

    It lets ranks that are fine join a failing one in a collective exit (a checkpoint, one error) instead of
    waiting in their next collective for a rank that is gone. The flag travels in host memory (through gloo
    when the default group is NCCL), so the common case costs one tiny all-reduce and no device sync.
    """
    if not is_dist():
        return failure
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=MAX, group=_host_group)
    if not flag.item():
        return None
    failures = all_gather_object(failure)
    first = next(k for k, f in enumerate(failures) if f is not None)
    return f"rank {first}: {failures[first]}"


def setup(device: str = "auto", attempts: int = 3) -> torch.device:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group: NCCL on CUDA, gloo on CPU.

    Joining is retried: after torchrun restarts a group, a gloo rendezvous sometimes fails to connect once,
    and a retry costs seconds where a failed process would burn one of torchrun's --max-restarts.

    torchrun's c10d rendezvous serves the same store to every restarted group, so the group's keys are
    prefixed with the restart count: otherwise a restarted rank can read a killed rank's address, fail to
    connect, and retry under a group name its peers never use.
    """
    global _host_group
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is available")
    dev = torch.device("cuda", local_rank()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_dist():
        backend = "nccl" if use_cuda else "gloo"
        timeout = datetime.timedelta(minutes=10)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        for attempt in range(1, attempts + 1):
            try:
                store, rank_, world = next(dist.rendezvous("env://", timeout=timeout))
                store = dist.PrefixStore(f"trainer/restart{restart}", store)
                dist.init_process_group(backend, store=store, rank=rank_, world_size=world, timeout=timeout,
                                        device_id=dev if use_cuda else None)
                break
            except (RuntimeError, dist.DistBackendError) as e:
                if attempt == attempts:
                    raise
                log.warning("process group failed to form (%s); retry %d/%d", e, attempt, attempts - 1)
                if is_dist():
                    dist.destroy_process_group()
                time.sleep(2.0 * attempt)
        _host_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    return dev


def cleanup() -> None:
    global _host_group
    if is_dist():
        dist.destroy_process_group()
    _host_group = None


def param_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name and bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()
