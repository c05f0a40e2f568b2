"""lm/ imports one way, bottom to top: its modules' imports of each other (module-level and inside
functions alike) form no circle, lm.checkpoint imports only the shipped loader (lm.rlo_loader, which imports
nothing of the toolkit at import time), and every module imports on its own (a fresh copy of the repo's modules),
without the package's __init__ (which imports them all) having run first."""
import ast
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT
LM = os.path.join(ROOT, "lm")
MODULES = sorted(f[:-3] for f in os.listdir(LM) if f.endswith(".py") and f != "__init__.py")


def lm_imports(module):
    """The lm modules that lm/<module>.py imports anywhere in its code ("__init__" for the package itself)."""
    with open(os.path.join(LM, f"{module}.py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name == "lm" or a.name.startswith("lm.")]
            found |= {n.split(".")[1] if "." in n else "__init__" for n in names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 or node.module == "lm" or (node.module or "").startswith("lm."):
                target = (node.module or "").removeprefix("lm.").removeprefix("lm") if node.level == 0 else node.module
                if target:
                    found.add(target.split(".")[0])
                else:  # from . import a, b / from lm import a, b: submodules or names of __init__
                    found |= {a.name if a.name in MODULES else "__init__" for a in node.names}
    return found


# Copied into every packed directory, the loader imports the toolkit it belongs to only when transformers calls
# it (RloConfig.from_dict imports lm.hf_quantizer): a run-time edge the graph leaves out.
SHIPPED = "rlo_loader"
GRAPH = {m: lm_imports(m) - ({"hf_quantizer"} if m == SHIPPED else set()) for m in MODULES}


def closure(module):
    seen, todo = set(), [module]
    while todo:
        for dep in GRAPH.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_lm_import_graph_has_no_circle():
    order, done = [], set()
    while len(done) < len(GRAPH):
        ready = [m for m in GRAPH if m not in done and GRAPH[m] <= done]
        left = {m: sorted(GRAPH[m]) for m in GRAPH if m not in done}
        assert ready, f"import circle among {sorted(left)}: {left}"
        done.update(ready)
        order += sorted(ready)
    assert all("__init__" not in deps for deps in GRAPH.values())  # nothing inside lm/ imports the whole package
    assert GRAPH[SHIPPED] == set() and GRAPH["checkpoint"] == {SHIPPED}  # the bottom layer
    assert closure("load") >= {"checkpoint", "hf_quantizer", "quantized", "gguf", "llama2c"}


def test_the_shipped_loader_needs_only_transformers_to_import():
    with open(os.path.join(LM, f"{SHIPPED}.py")) as f:
        tree = ast.parse(f.read())
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert top == {"transformers"}


# For each module named in argv[3:]: forget every module of the repo (argv[1]; torch and transformers stay
# loaded, which is what makes one interpreter affordable), import lm.<module> under a bare `lm` package (its
# __init__ not run) and record the lm modules that got loaded, or the error.
ISOLATED = """
import importlib, json, os, sys, traceback, types
root, path = sys.argv[1], sys.argv[2]
venv = os.path.realpath(sys.prefix) + os.sep  # a virtual environment inside the repo holds torch: kept


def ours(mod):
    file = os.path.realpath(getattr(mod, "__file__", None) or "/")
    return file.startswith(root + os.sep) and not file.startswith(venv)


loaded = {}
for module in sys.argv[3:]:
    for name in [m for m, mod in sys.modules.items() if m == "lm" or m.startswith("lm.") or ours(mod)]:
        del sys.modules[name]
    package = types.ModuleType("lm")
    package.__path__ = [path]
    sys.modules["lm"] = package
    try:
        importlib.import_module("lm." + module)
        loaded[module] = sorted(m[3:] for m in sys.modules if m.startswith("lm."))
    except Exception:
        loaded[module] = traceback.format_exc()
print(json.dumps(loaded))
"""


@pytest.fixture(scope="module")
def isolated_imports():
    proc = subprocess.run([sys.executable, "-c", ISOLATED, os.path.realpath(ROOT), LM, *MODULES], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MODULES)
def test_each_lm_module_imports_alone(isolated_imports, module):
    loaded = isolated_imports[module]
    assert isinstance(loaded, list), loaded  # else the traceback of its import
    # what it loaded is what the import graph says it may load (function-level imports run later, if ever)
    assert module in loaded and set(loaded) - {module} <= closure(module), loaded
