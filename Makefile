# Quick start: `make demo` and `make test` each do the whole set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# torch is pinned by default (a CPU build lies on local disk); override e.g. TORCH_SPEC="torch==2.14.1".
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,bench,tensorboard,export
BIN := $(VENV)/bin

.PHONY: setup setup-core lint test test-slow demo bench gpu-suite foundation foundation-gpu clean

# setup-core: torch and fmct, all that the verbs (and so the demo) need; setup adds the extras of the
# tests, benchmarks, TensorBoard and ONNX export (about 30 s more on 2 cores).
setup-core: $(VENV)/.installed-core
setup: $(VENV)/.installed

# pip byte-compiles every file it installs, one after another: 37 of the set-up's 57 s on 2 cores. Python
# compiles a module itself the first time it is imported, unless PYTHONDONTWRITEBYTECODE forbids it; then
# every import would compile again, so the environment is compiled once, on every core (as under pip, a few
# files written for newer Pythons do not compile; they are never imported here).
$(VENV)/.installed-core: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile --upgrade pip
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q --no-compile -c $(VENV)/constraints.txt "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-compile -c $(VENV)/constraints.txt -e .
	if [ -n "$$PYTHONDONTWRITEBYTECODE" ]; then $(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true; fi
	touch $@

$(VENV)/.installed: $(VENV)/.installed-core
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# Lint and format are checked first: a change that breaks either fails CI before a test runs.
test: setup lint
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

demo: setup-core
	$(BIN)/fmct demo --out demo_out

# The shipped checkpoint fmct-synth-tiny from its committed recipe (configs/pretrain_synth_tiny.yaml):
# 800 synthetic heads of sites A and B (seed 1000; never site C, never an evaluation seed), a separate
# labelled validation cohort (seed 2000) for the online probe; the pretraining itself about 10 minutes on 2 CPU cores.
FOUNDATION ?= foundation_run
HEADS ?= 800
WORKERS ?= 2
RECIPE ?= pretrain_synth_tiny
CHECKPOINT ?= src/fmct/weights/fmct-synth-tiny
MACHINE ?= a 2-core CPU (fp32)
COMMAND ?= make foundation
GRID := 'canonical.shape=[64,64,64]' canonical.spacing_mm=3.0
foundation: setup
	$(BIN)/fmct synth --out $(FOUNDATION)/cohort --n $(HEADS) --sites A,B --format nifti --seed 1000 --workers $(WORKERS) --matrix 128
	$(BIN)/fmct ingest $(FOUNDATION)/cohort/nifti --out $(FOUNDATION)/store --workers $(WORKERS) $(GRID)
	$(BIN)/fmct synth --out $(FOUNDATION)/val_cohort --n 200 --sites A,B --format nifti --seed 2000 --workers $(WORKERS) --matrix 128
	$(BIN)/fmct ingest $(FOUNDATION)/val_cohort/nifti --out $(FOUNDATION)/val_store --workers $(WORKERS) $(GRID)
	$(BIN)/fmct pretrain --store $(FOUNDATION)/store --out $(FOUNDATION)/run --config $(RECIPE) \
		online_eval.store=$(FOUNDATION)/val_store online_eval.labels=$(FOUNDATION)/val_cohort/labels.csv
	$(BIN)/fmct release $(FOUNDATION)/run --out $(CHECKPOINT) --name $(notdir $(CHECKPOINT)) \
		--machine "$(MACHINE)" --command "$(COMMAND)" --data "$(HEADS) synthetic heads (\`fmct synth --n $(HEADS) \
	--sites A,B --seed 1000\`, NIfTI, matrix 128), ingested at 64^3 x 3 mm. Sites A and B only: site C, the held-out site \
	of \`fmct demo\`, is never seen. The demo's cohort (seed 0) and the label-efficiency benchmark's (seed 7) are other \
	draws, so no evaluation scan was seen. Online validation: 200 labelled heads of seed 2000, sites A and B."

# The same model and method on one GPU with 16 cores, in one command (a session lent a device; not for CI):
# 4,000 heads instead of 800, batch 64, about 10 minutes in all (configs/pretrain_synth_tiny_gpu.yaml).
foundation-gpu:
	$(MAKE) foundation FOUNDATION=foundation_gpu_run HEADS=4000 WORKERS=16 RECIPE=pretrain_synth_tiny_gpu \
		CHECKPOINT=foundation_gpu_run/fmct-synth-tiny-gpu MACHINE="one GPU (bf16)" COMMAND="make foundation-gpu"

bench: setup
	for script in benchmarks/*.py; do $(BIN)/python $$script || exit 1; done

# CUDA tests and GPU benchmarks, one JSON line each into gpu_suite.jsonl (a CPU fallback without a GPU).
gpu-suite: setup
	PYTHON=$(BIN)/python benchmarks/gpu_suite.sh gpu_suite.jsonl

clean:
	rm -rf $(VENV) demo_out $(FOUNDATION) foundation_gpu_run
