"""torchrun glue shared by train.py and ft_opt.py: one process per device, rank 0 writes; FSDP2 sharding
and full (unsharded) state dicts that one code path saves and loads with or without it."""
import contextlib
import datetime
import gc
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from .errors import UserError


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
    # The others wait at the run's last barrier while rank 0 evaluates and saves a model, which can take
    # longer than NCCL's 10-minute default.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))
    return dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu")


@contextlib.contextmanager
def distributed(device):
    """`setup_distributed` for the duration of a run, the process group torn down after. A run that ends
    normally waits for the other ranks first, so that every rank tears the group down at the same point
    (NCCL's teardown is collective) and no rank leaves while rank 0 still evaluates and saves. On an
    error there is no barrier: torchrun stops the other ranks."""
    try:
        yield setup_distributed(device)
        barrier()  # reached only when the run returned
    finally:
        if dist.is_initialized():
            release_meshes()
            dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


# The device meshes fully_shard_blocks sharded over, until `release_meshes` lets their process group go.
_meshes = []


def release_meshes():
    """Let the process group go of the meshes that FSDP sharded over, once the sharded model is no longer
    used, so that `dist.destroy_process_group()` frees the group. A DeviceMesh keeps its group
    (`_pg_registry`), DTensor's sharding and redistribution caches keep the mesh for the life of the
    process, and each FSDP unit's state keeps the group too, in reference cycles with the module that only
    the cyclic collector frees. Left so, the gloo group outlives `destroy_process_group()`, never
    destroyed: its worker threads and its TCP loop thread are still running when the interpreter and
    the C++ runtime shut down, and a rank can abort there ("terminate called without an active
    exception") after its results are written. Freed here, the group joins its threads."""
    if not _meshes:
        return
    gc.collect()  # the FSDP states of the modules the run has dropped
    for mesh in _meshes:
        registry = getattr(mesh, "_pg_registry", None)
        if registry is not None:
            registry.clear()
    _meshes.clear()


def fully_shard_blocks(root, model):
    """FSDP2: each transformer block of the HF `model` (the classes in its `_no_split_modules`, as
    accelerate wraps them) becomes one unit, gathered only while it runs; what remains (embeddings,
    head, final norm; a tied head stays with its embedding) belongs to `root`, the module whose
    forward is called. All units share one device mesh over the world, which `distributed()` releases
    before it tears the group down (`release_meshes`). Returns (root, number of blocks)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise UserError(f"--fsdp: {type(model).__name__} names no transformer block class (_no_split_modules)")
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    _meshes.append(mesh)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return root, len(blocks)


def full_state(model, optimizer=None):
    """(model state dict, optimizer state dict or {}), unsharded and on the CPU on rank 0 ({} on the
    other ranks), parameters named by their path: the same format with or without FSDP, so a
    checkpoint resumes under either. A collective under torchrun: every rank calls it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_state_dict(model, [], options=options)[0], {}
    return get_state_dict(model, optimizer, options=options)


def load_full_state(model, optimizer, model_state, optimizer_state):
    """Load `full_state`'s dicts (every rank passes the whole dicts; FSDP keeps each rank's shard)."""
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))
