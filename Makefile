# Quick start: `make demo` and `make test` each do the whole set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# torch is pinned by default (a CPU build lies on local disk); override e.g. TORCH_SPEC="torch==2.14.1".
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,bench,tensorboard,export
BIN := $(VENV)/bin

.PHONY: setup test test-slow demo bench gpu-suite foundation foundation-gpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

demo: setup
	$(BIN)/fmct demo --out demo_out

# The shipped checkpoint fmct-synth-tiny from its committed recipe (configs/pretrain_synth_tiny.yaml):
# 800 synthetic heads of sites A and B (seed 1000; never site C, never an evaluation seed), a separate
# labelled validation cohort (seed 2000) for the online probe; about 2 hours on 2 CPU cores.
FOUNDATION ?= foundation_run
GRID := 'canonical.shape=[64,64,64]' canonical.spacing_mm=3.0
foundation: setup
	$(BIN)/fmct synth --out $(FOUNDATION)/cohort --n 800 --sites A,B --format nifti --seed 1000 --workers 2 --matrix 128
	$(BIN)/fmct ingest $(FOUNDATION)/cohort/nifti --out $(FOUNDATION)/store --workers 2 $(GRID)
	$(BIN)/fmct synth --out $(FOUNDATION)/val_cohort --n 200 --sites A,B --format nifti --seed 2000 --workers 2 --matrix 128
	$(BIN)/fmct ingest $(FOUNDATION)/val_cohort/nifti --out $(FOUNDATION)/val_store --workers 2 $(GRID)
	$(BIN)/fmct pretrain --store $(FOUNDATION)/store --out $(FOUNDATION)/run --config pretrain_synth_tiny \
		online_eval.store=$(FOUNDATION)/val_store online_eval.labels=$(FOUNDATION)/val_cohort/labels.csv
	$(BIN)/python -m fmct.ssl.release $(FOUNDATION)/run src/fmct/weights/fmct-synth-tiny --name fmct-synth-tiny \
		--command "make foundation" --data "800 synthetic heads (\`fmct synth --n 800 --sites A,B --seed 1000\`, NIfTI, \
	matrix 128), ingested at 64^3 x 3 mm. Sites A and B only: site C, the held-out site of \`fmct demo\`, is never \
	seen. The demo's cohort (seed 0) and the label-efficiency benchmark's (seed 7) are other draws, so no \
	evaluation scan was seen. Online validation: 200 labelled heads of seed 2000, sites A and B."

# The same model and method on one GPU with 16 cores, in one command (a session lent a device; not for CI):
# 4,000 heads instead of 800, batch 64, about 10 minutes in all (configs/pretrain_synth_tiny_gpu.yaml).
foundation-gpu: setup
	$(BIN)/fmct synth --out $(FOUNDATION)/cohort --n 4000 --sites A,B --format nifti --seed 1000 --workers 16 --matrix 128
	$(BIN)/fmct ingest $(FOUNDATION)/cohort/nifti --out $(FOUNDATION)/store --workers 16 $(GRID)
	$(BIN)/fmct synth --out $(FOUNDATION)/val_cohort --n 200 --sites A,B --format nifti --seed 2000 --workers 16 --matrix 128
	$(BIN)/fmct ingest $(FOUNDATION)/val_cohort/nifti --out $(FOUNDATION)/val_store --workers 16 $(GRID)
	$(BIN)/fmct pretrain --store $(FOUNDATION)/store --out $(FOUNDATION)/run_gpu --config pretrain_synth_tiny_gpu \
		online_eval.store=$(FOUNDATION)/val_store online_eval.labels=$(FOUNDATION)/val_cohort/labels.csv
	$(BIN)/python -m fmct.ssl.release $(FOUNDATION)/run_gpu $(FOUNDATION)/fmct-synth-tiny-gpu --name fmct-synth-tiny-gpu --machine "one GPU (bf16)" \
		--command "make foundation-gpu" --data "4,000 synthetic heads (\`fmct synth --n 4000 --sites A,B --seed 1000\`, \
	NIfTI, matrix 128), ingested at 64^3 x 3 mm; sites A and B only (site C, the demo's held-out site, never \
	seen). Online validation: 200 labelled heads of seed 2000, sites A and B."

bench: setup
	for script in benchmarks/*.py; do $(BIN)/python $$script || exit 1; done

# CUDA tests and GPU benchmarks, one JSON line each into gpu_suite.jsonl (a CPU fallback without a GPU).
gpu-suite: setup
	PYTHON=$(BIN)/python benchmarks/gpu_suite.sh gpu_suite.jsonl

clean:
	rm -rf $(VENV) demo_out $(FOUNDATION)
