"""What several test modules share besides the fixtures of conftest.py: the repository root, the team's
data folder beside it, a free TCP port for 2-rank gloo rendezvous, and opt.py's tiny-size flags."""
import os
import socket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")  # ../shared/data: the real models and data sets
# opt.py at a size the tiny checkpoints of tests.lm_fixtures afford
OPT_FAST = ["--nsamples", "4", "--seqlen", "32", "--device", "cpu"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
