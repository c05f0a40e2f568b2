# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv from requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench docs gpu-check llm-demo reproduce reproduce-quick clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo.py --overwrite

# The AISTATS pipeline on SmolLM2-135M + WikiText-2 from ../shared/data: one seed, CE and RLO, e8p at 2 bits, the
# learning rates fixed (the full run, `make reproduce`, chooses them on validation text).
llm-demo: $(STAMP)
	$(PY) llm_pipeline.py --amp --quant e8p --lr 3e-4 --qft-lr 1e-4 --jobs 2 --overwrite --out runs/llm_demo

# Every claim of both papers re-run with seeds, paired verdicts and their power: REPRODUCTION.md +
# reproduction/ (and the headline quoted in README.md); 217 core-minutes measured for the non-LLM sections,
# plus 603 for the 5-seed LLM pipeline (run into reproduction/cache/llm unless its
# results.csv holds the seeds). Every run's result is kept in reproduction/cache as it ends: a rerun resumes.
reproduce: $(STAMP)
	$(PY) reproduce.py --readme README.md

# Every section, table and figure at a tiny size (about 1 min on 2 cores; tests/reproduce/test_reproduce.py runs it).
reproduce-quick: $(STAMP)
	$(PY) reproduce.py --quick --out runs/reproduce_quick

# One pytest-xdist worker per core (one torch thread each). Each test module runs whole on one worker, so its
# module-scoped fixtures are built once; modules start in collection order, those with slow tests first
# (tests/conftest.py, which also starts building the C++ kernels at collection).
# The 20 slowest tests are listed at the end.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=20 tests

# The quick benchmarks (about a minute each on 2 cores); bench_quant.py has its own size flags.
bench: $(STAMP)
	$(PY) benchmarks/bench_loss.py
	$(PY) benchmarks/bench_lm_loss.py
	$(PY) benchmarks/bench_linear_loss.py --tokens 2048
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_e8p.py

# The documentation site (docs/, mkdocs.yml) into site/; --strict turns every warning into a failure.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): docs/requirements.txt $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q -r docs/requirements.txt
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

# On a machine with a CUDA GPU: the CUDA test tier (tests marked cuda; skipped without a GPU), then the
# GPU timings of the entry points, appended to benchmarks/results/gpu_check.csv (about a minute each).
gpu-check: $(STAMP)
	$(PY) -m pytest -m cuda -v tests
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis site
