# make install: create/update .venv | make test: the self-contained suite | make demo: synthetic data + quickstart
# make test-server: the online suite against the ClearML server named by CLEARML_CONFIG_FILE or CLEARML_API_*
# make gpu-check: the GPU path end to end on one GPU (about 10 min); says "not measured" without a GPU
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DATA := data/synthetic
# Where the demo's run folder goes (shell syntax: expanded by each recipe line).
DEMO_OUT := $${CLEARML_OUTPUT_PATH:-$(CURDIR)/output/clearml}

.PHONY: install install-test lint format test test-slurm test-server demo bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(BIN)/python -m pip install --quiet -r requirements-test.txt
	touch $@

# Two pytest workers, a test file each at a time (its fixtures built once): most of a test's time is spent
# waiting on the training processes it starts, so two files share 2 cores well (883 s -> 388-458 s measured).
# TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 2
test: install-test lint
	$(BIN)/python -m pytest -ra --durations=10 -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# ruff's lint and format check (settings in pyproject.toml); `make format` rewrites the files.
lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The SLURM suite, against the cluster sinfo reaches; its several-node tests need two nodes (.ci/run starts
# ../shared/slurm-local with SLURM_LOCAL_NODES=2); it also runs the docs' SLURM and several-node commands
# (tests/slurm/test_docs_nodes.py, under 2 min). About 7 min on 2 idle cores (measured, docs commands included).
test-slurm: install-test
	$(BIN)/python -m pytest -ra tests/slurm $(PYTEST_ARGS)

# The online ClearML suite, against the server CLEARML_CONFIG_FILE or CLEARML_API_* name (.ci/run starts
# ../shared/clearml-server/clearml-local).
test-server: install-test
	$(BIN)/python -m pytest -ra tests/server $(PYTEST_ARGS)

$(DEMO_DATA)/VOCdevkit:
	$(BIN)/python code/scripts/make_synthetic_voc.py $(DEMO_DATA) --train 200 --val 40 --test 20 --size 128 128 --seed 0

demo: install $(DEMO_DATA)/VOCdevkit
	DATASET_PATH=$(CURDIR)/$(DEMO_DATA) SBD_DATASET_PATH=$(CURDIR)/$(DEMO_DATA)/SBD \
	CLEARML_OUTPUT_PATH=$(DEMO_OUT) \
	$(BIN)/python -m py_config_runner code/scripts/training.py configs/train/quickstart_cpu.py
	@run=$$(ls -d $(DEMO_OUT)/quickstart_cpu/*/ | sort | tail -n 1); \
	test -f "$${run}summary.png" || { echo "error: the demo run $$run wrote no summary.png" >&2; exit 1; }; \
	printf '\nrun summary:  %s\nTensorBoard:  %s\n' "$${run}summary.png" "$(BIN)/tensorboard --logdir $${run}tb"

bench: install
	$(BIN)/python benchmarks/run_all.py

# Preflights of both baselines, bf16 training resumed under fp16, evaluation with TTA, export, benchmarks/gpu.py,
# on synthetic data at VOC's image size; one table, exit 1 on any failure (docs/development.md#gpu-check).
# GPU_CHECK_ARGS=--tiny runs the same steps on the CPU at tiny sizes (tests/test_gpu_check.py).
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf output $(DEMO_DATA)
