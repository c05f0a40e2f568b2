"""What several test modules share besides the fixtures of conftest.py: the repository root, the team's
data folder beside it, a free TCP port for 2-rank gloo rendezvous, ft_opt.py under torchrun, and opt.py's
tiny-size flags."""
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")  # ../shared/data: the real models and data sets
# opt.py at a size the tiny checkpoints of tests.lm_fixtures afford
OPT_FAST = ["--nsamples", "4", "--seqlen", "32", "--device", "cpu"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_ft_opt(args, timeout=600):
    """ft_opt.py `args` in 2 processes under torchrun (one thread each); its standard output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", f"--master_port={free_port()}",
           "ft_opt.py", *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("perplexity after finetuning") == 1  # only rank 0 evaluates and writes
    return res.stdout
