"""Shared test setup: the repo root on sys.path, no network, one intra-op thread, and the tiny offline
models and data files that many modules read (session fixtures, built once per process: under
pytest-xdist once per worker)."""
import os
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Tests never reach a hub: any accidental download fails fast instead of hanging.
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
# One thread per test process, and the same for the scripts tests start: the matrices are tiny (threads cost
# more than they give), `make test` runs one process per core, and in-process results that are compared bit
# for bit with a subprocess's need the same thread count on both sides. Set before torch/numpy load.
os.environ["OMP_NUM_THREADS"] = "1"
# quant.kernels' C++ extensions, built once per checkout: in torch's default cache (shared by every checkout
# and venv of a user) a build from another checkout's paths or sources makes the next process here rebuild.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".pytest_cache", "torch_extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The modules that hold `slow` tests first (in collection order), each with its slow tests first, the
    order otherwise kept: under pytest-xdist (make test: whole modules per worker, in collection order) the
    longest modules start first, instead of one running alone at the end while the other workers idle. A
    module's tests stay together, so its module-scoped fixtures are built once also without pytest-xdist.

    A run that holds the `kernel` tests (the whole suite, tests/quant) also starts building the C++ kernels
    now, in a thread beside the tests, instead of inside whichever test needs one first; under pytest-xdist
    worker gw0 builds one extension and gw1 the other (torch's file lock makes any other user wait for it)."""
    rank = {path: i for i, path in enumerate(dict.fromkeys(item.path for item in items if item.get_closest_marker("slow")))}
    items.sort(key=lambda item: (rank.get(item.path, len(rank)), item.get_closest_marker("slow") is None))
    if any(item.get_closest_marker("kernel") for item in items):
        _start_kernel_builds()


_builds = []


def _start_kernel_builds():
    from quant import kernels

    if not kernels.ENABLED:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    names = {"gw0": ["packed"], "gw1": ["trellis"]}.get(worker, [] if worker else list(kernels.SOURCES))
    for name in names:
        _builds.append(threading.Thread(target=kernels.extension, args=(name,), daemon=True))
        _builds[-1].start()


def pytest_sessionfinish():
    """A build still running is waited for, not cut off at exit (the next run would build it again)."""
    for build in _builds:
        build.join()


@pytest.fixture(autouse=True)
def _restore_thread_count():
    """Scripts called in-process (regression.py, gan.py, --threads) set torch's thread count; the next test
    gets the one thread back."""
    yield
    torch.set_num_threads(1)


# --- tiny offline models and data (tests.lm_fixtures), shared read-only by every module ------------------
# Tests write their outputs elsewhere (tmp_path, a module's own tmp_path_factory folder); never into these.

@pytest.fixture(scope="session")
def wikitext_dir(tmp_path_factory):
    """wiki.{train,valid,test}.raw of generated text (lm_fixtures.write_wikitext defaults)."""
    from tests.lm_fixtures import write_wikitext
    return write_wikitext(str(tmp_path_factory.mktemp("wikitext")))


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory):
    """A random 2-layer OPT (hidden 64) + BPE tokenizer saved like a hub checkpoint (lm_fixtures.save_tiny_lm)."""
    from tests.lm_fixtures import save_tiny_lm
    return save_tiny_lm(str(tmp_path_factory.mktemp("tiny_opt")), "opt")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random 2-layer Llama (hidden 64) + BPE tokenizer saved like a hub checkpoint (lm_fixtures.save_tiny_lm)."""
    from tests.lm_fixtures import save_tiny_lm
    return save_tiny_lm(str(tmp_path_factory.mktemp("tiny_llama")), "llama")


@pytest.fixture(scope="session")
def tiny_lm_assets(tiny_opt_dir, tiny_llama_dir, wikitext_dir):
    """{'opt', 'llama', 'data'}: the three fixtures above, in the dict shape the LM test modules use."""
    return {"opt": tiny_opt_dir, "llama": tiny_llama_dir, "data": wikitext_dir}


@pytest.fixture(scope="module")
def assets(tiny_lm_assets, tmp_path_factory, request):
    """tiny_lm_assets plus 'root': a folder of the module's own for what its tests write."""
    return dict(tiny_lm_assets, root=tmp_path_factory.mktemp(request.module.__name__))
