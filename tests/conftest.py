"""Shared test setup: the repo root on sys.path, no network, small thread count."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Tests never reach a hub: any accidental download fails fast instead of hanging.
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_thread_count():
    """Scripts called in-process (regression.py, gan.py) set torch's thread count; later tests that
    compare in-process results bit for bit with a subprocess need the default back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny matrices: extra threads cost more than they give, and a busy machine makes them spin."""
    torch.set_num_threads(1)
