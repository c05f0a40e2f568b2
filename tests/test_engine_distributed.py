"""engine.distributed under 2 gloo ranks: a run's ranks leave `distributed()` together."""
import os
import time

import torch.distributed as dist
import torch.multiprocessing as mp

from engine.distributed import distributed
from tests.ports import free_port


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
