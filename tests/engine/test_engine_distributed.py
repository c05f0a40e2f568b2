"""engine.distributed under 2 gloo ranks: a run's ranks leave `distributed()` together, and an FSDP run
leaves no process group (nor its threads) behind."""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.distributed import distributed, full_state, fully_shard_blocks
from tests.helpers import free_port


def _rank(rank, port, marker, seen):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with distributed("cpu") as (r, world, _):
        assert (r, world) == (rank, 2)
        if rank == 0:  # rank 0's final evaluation and save, while rank 1 has nothing left to do
            time.sleep(1.0)
            open(marker, "w").close()
    seen[rank] = (os.path.exists(marker), dist.is_initialized())


def test_every_rank_waits_for_rank_0_to_finish_before_tearing_the_group_down(tmp_path):
    port = free_port()
    seen = mp.get_context("spawn").Manager().dict()
    mp.spawn(_rank, args=(port, str(tmp_path / "saved"), seen), nprocs=2)
    assert dict(seen) == {0: (True, False), 1: (True, False)}


class _Block(torch.nn.Linear):
    pass


class _Model(torch.nn.Module):
    _no_split_modules = ["_Block"]

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(_Block(8, 8), _Block(8, 8))

    def forward(self, x):
        return self.blocks(x)


def _gloo_threads():
    """Names of this process's threads that gloo started (its TCP loop, the group's workers)."""
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n)


def _fsdp_rank(rank, port, seen):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))

    def train():  # the sharded model and its optimizer are dropped when this returns, as ft_opt's run()
        torch.manual_seed(0)
        model = _Model()
        root, _ = fully_shard_blocks(model, model)
        optimizer = torch.optim.AdamW(model.parameters())
        root(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        full_state(model, optimizer)
        return _gloo_threads()

    with distributed("cpu"):
        during = train()
    seen[rank] = (during, _gloo_threads())


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc")
def test_fsdp_teardown_destroys_the_gloo_group_and_joins_its_threads():
    # DTensor's caches keep FSDP's device mesh; without release_meshes the group, and its threads, would
    # outlive destroy_process_group() and still run while the interpreter shuts down
    port = free_port()
    seen = mp.get_context("spawn").Manager().dict()
    mp.spawn(_fsdp_rank, args=(port, seen), nprocs=2)
    for rank in (0, 1):
        during, after = seen[rank]
        assert "gloo_tcp_loop" in during and "pt_gloo_runloop" in during
        assert after == []
