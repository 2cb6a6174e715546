"""Several GPUs or machines with PyTorch's own DistributedDataParallel (DDP): shared by the five scripts.

`torchrun --nproc_per_node=4 script.py` starts the script four times, one process per GPU, and tells each its
place in environment variables: RANK (0..WORLD_SIZE-1 over all machines), LOCAL_RANK (its GPU on this machine),
WORLD_SIZE, and where process 0 listens (MASTER_ADDR, MASTER_PORT). `setup()` reads them, joins the process group
(NCCL between GPUs, gloo on CPUs) and returns the process's device. Each process then trains on its own shard
of the training data (`train_sampler`) with the same model, DDP averages the gradients at every step so the
copies stay identical, validation cases are split between the processes (`shard`) and their scores summed or
gathered (`all_sum`, `gather`, `gather_dice`) so every process sees the same metric and picks the same best
epoch. Only process 0 writes files and prints (`is_main`; `setup` silences the others).

`python script.py` and a notebook are one process: WORLD_SIZE is unset, no process group is joined, and every
function here does nothing (`shard` returns the whole list, `gather` a one-item list, `wrap` the model itself),
so the scripts run exactly as they would without this module.
"""

from __future__ import annotations

import atexit
import os
import sys
import traceback
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler


def is_distributed() -> bool:
    """True in a process that joined a process group (under torchrun with more than one process)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's number, 0..world_size()-1 (0 in one process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes training together (1 in one process)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True in the one process that writes files and prints: process 0."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher setting its variables) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def usable_cores() -> int:
    """The CPU cores this process may use (its affinity where the system has one, e.g. under a job scheduler)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads() -> int:
    """Threads for torch on the CPU, where OMP_NUM_THREADS does not say: half the cores this process may use (the
    other half feeds it: decoding, augmentation, the OS), split between torchrun's processes, at least 1. torch's
    default, every core, was 2.6x (lung) and 5x (nerve) slower for the quick runs on a shared 2-core machine."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, usable_cores() // 2 // processes)


def device() -> torch.device:
    """The device of this process: under torchrun its own GPU (LOCAL_RANK) on this machine, else the GPU if there is
    one, else the CPU. More processes than GPUs (e.g. two sharing one GPU to measure) share them round robin.
    On the CPU it also sets torch's thread count (cpu_threads), unless OMP_NUM_THREADS is set."""
    if not torch.cuda.is_available():
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(cpu_threads())
        return torch.device("cpu")
    if "LOCAL_RANK" not in os.environ:
        return torch.device("cuda")  # the current GPU, as CUDA_VISIBLE_DEVICES makes it; never a fixed cuda:0
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())


def setup() -> torch.device:
    """Join the process group when torchrun started this process, silence every process but 0, and return the
    device; the group is left when the process exits. In one process (python script.py, a notebook) only returns
    the device. Safe to call twice."""
    here = device()
    if launched_by_torchrun() and not is_distributed():
        if here.type == "cuda":
            torch.cuda.set_device(here)
            # NCCL talks GPU to GPU; it refuses two processes on one GPU, where gloo (slower) still works.
            shared = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > torch.cuda.device_count()
            dist.init_process_group("gloo" if shared else "nccl", device_id=None if shared else here)
        else:
            dist.init_process_group("gloo")
        silence_other_processes()
        atexit.register(shutdown)  # leave the group when the script ends, whichever cell it ends in
    return here


def silence_other_processes() -> None:
    """Every process but 0: prints, warnings and progress bars go nowhere (tqdm hides its bars on a stream that
    is not a terminal), so a run prints what one process would. An error still shows, named by its process."""
    if is_main():
        return
    sys.stdout = sys.stderr = open(os.devnull, "w")  # open for the life of the process
    number = rank()

    def excepthook(kind, value, trace):
        sys.__stderr__.write(f"[process {number}] " + "".join(traceback.format_exception(kind, value, trace)))

    sys.excepthook = excepthook


def shutdown() -> None:
    """Leave the process group (nothing to do in one process). Processes may leave at different times: process 0
    goes on alone to predict and write while the others are done, so there is no barrier here."""
    if is_distributed():
        dist.destroy_process_group()


@contextmanager
def main_first():
    """Process 0 runs the block first (e.g. writing the synthetic sample), the others after it (reading it)."""
    if is_distributed() and not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if is_distributed() and is_main():
            dist.barrier()


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model in DistributedDataParallel, which averages the gradients of all processes in backward(), when
    there are several processes; the model itself in one. Move the model to its device first."""
    if not is_distributed():
        return model
    here = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[here] if here.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel (the model itself otherwise): save its state_dict, so that the
    checkpoint's keys have no "module." prefix and load in one process."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def train_sampler(dataset, seed: int) -> DistributedSampler | None:
    """This process's shard of `dataset`, shuffled with `seed` and reshuffled every epoch by `set_epoch`: the
    shards are disjoint and of equal length (a few items repeat when the length does not divide), so every
    process takes the same number of steps. None in one process, where the DataLoader shuffles as usual."""
    if not is_distributed():
        return None
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)


def set_epoch(loader, epoch: int) -> None:
    """Reshuffle the shards for `epoch` (otherwise every epoch sees the same order); nothing in one process."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


def shard(items: list, part: int | None = None, parts: int | None = None) -> list:
    """This process's share of a list of cases: every world_size-th from its rank on (all of them in one process).
    The shares are disjoint, cover the list, and differ in length by at most one; a share may be empty. `part`
    and `parts` default to rank() and world_size()."""
    return items[rank() if part is None else part :: world_size() if parts is None else parts]


def train_shard(items: list) -> list:
    """This process's fixed share of the training cases, for a dataset that caches what it is given (MONAI's
    CacheDataset): each process then caches only its own cases, not all of them. Every world_size-th case from its
    rank on, the list first padded (cyclically) with its first cases to a multiple of world_size, so that every
    share has the same length (a few cases repeat) and every process takes the same number of steps. The shares
    stay the same for the whole run (shuffle within the share); `items` itself in one process."""
    if not is_distributed():
        return items
    length = -(-len(items) // world_size()) * world_size()  # rounded up to a multiple of world_size
    return shard([items[i % len(items)] for i in range(length)])


def _collective_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(*numbers: float) -> tuple[float, ...]:
    """Each number summed over the processes (in float64), the same on every process; unchanged in one process.
    E.g. a validation loss: `total, count = all_sum(total, count)` then `total / count`."""
    if not is_distributed():
        return tuple(numbers)
    values = torch.tensor(numbers, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(values)
    return tuple(values.tolist())


def average(value: torch.Tensor) -> torch.Tensor:
    """A tensor averaged over the processes (the tensor itself in one process): e.g. each step's loss, so that
    every process sees a loss that is not finite at the same step, and stops there with the others."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


def gather(obj) -> list:
    """Every process's `obj` (anything that pickles: a few numbers per case, not images), in rank order, on every
    process; `[obj]` in one process."""
    if not is_distributed():
        return [obj]
    parts = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def gather_shards(share: list, total: int) -> list:
    """The whole list of which each process holds its `shard()` (e.g. the predictions for its share of the
    validation cases), in the list's own order, on every process: the inverse of `shard`. `total` is the length of
    the whole list. `share` itself in one process."""
    if not is_distributed():
        return list(share)
    parts = gather(share)
    whole = [None] * total
    for part_rank, part in enumerate(parts):
        whole[part_rank :: world_size()] = part
    return whole


def average_buffers(model: torch.nn.Module) -> None:
    """Average the model's floating-point buffers over the processes, in place (nothing in one process): e.g.
    batch-norm statistics that each process recomputed on its own shard of the training data, so that every process
    evaluates with the same ones."""
    if not is_distributed():
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            value = buffer.detach().to(_collective_device(), torch.float64)
            dist.all_reduce(value)
            buffer.copy_(value / world_size())


def gather_dice(acc):
    """A dice.DiceAccumulator with the images every process scored (each its own share of the validation cases),
    the same on every process: its mean() and global_dice() are those of the whole validation set. `acc` itself
    in one process."""
    return type(acc).merge(gather(acc)) if is_distributed() else acc
