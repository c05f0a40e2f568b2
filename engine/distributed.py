"""torchrun glue shared by train.py and ft_opt.py: one process per device, rank 0 writes."""
import contextlib
import os

import torch
import torch.distributed as dist


def setup_distributed(device):
    """(rank, world size, device). torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; `device` is the
    script's --device ('cuda' gives each rank its local GPU, anything else runs gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu")


@contextlib.contextmanager
def distributed(device):
    """`setup_distributed` for the duration of a run, the process group torn down after."""
    try:
        yield setup_distributed(device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()
