# Two commands on a fresh machine: `make serve` and `make test`. Both create .venv and install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu

.PHONY: install fashion-data serve test test-fast lint format bench fuzz models clean image image-test

$(STAMP): pyproject.toml deploy/client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: an unpinned torch, or plain PyPI's, is a multi-GB CUDA build.
	# PyTorch's CPU index beside pip's own (its 2.13.0+cpu outranks PyPI's 2.13.0); once without
	# retries, so that a machine that cannot reach it (one with the wheel at hand) is not kept
	# waiting, then with them.
	$(BIN)/pip install --quiet --retries 0 --extra-index-url $(TORCH_INDEX_URL) torch==2.13.0 \
	  || $(BIN)/pip install --quiet --extra-index-url $(TORCH_INDEX_URL) torch==2.13.0
	# The client's own distribution (deploy/client) with it: mcdrop depends on mcdrop-client.
	$(BIN)/pip install --quiet -e ./deploy/client -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST, which tests and benchmarks read, from Debian's package where it is missing and
# apt-get can install it (as root). Elsewhere the tests that read it fail, saying what to run.
FASHION := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
fashion-data:
	@if [ ! -f $(FASHION) ]; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
		else \
			echo "Fashion-MNIST is missing: run 'apt-get install dataset-fashion-mnist' as root"; \
		fi; \
	fi

serve: $(STAMP)
	$(BIN)/mcdrop serve --model-dir models --host $(HOST) --port $(PORT)

# mypy type-checks mcdrop, service and the client's mcdrop_client, not tests/ or benchmarks/
# ([tool.mypy] in pyproject.toml); its cache in .mypy_cache makes a re-run take seconds.
test: $(STAMP) fashion-data
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest --durations=10

# The edit loop (under 30 s): every test but those marked slow (benchmark smoke runs, training
# runs, fresh interpreters); `make test` runs them all. One torch thread: the tests' models are
# small, and on a busy machine spinning OpenMP workers made this loop 3x slower (147 s vs 53 s
# wall, 49 s vs 20 s CPU, at load 8 on 2 cores).
test-fast: $(STAMP) fashion-data
	OMP_NUM_THREADS=1 $(BIN)/pytest -m "not slow" --durations=10

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP) fashion-data
	$(BIN)/python -m benchmarks

# schemathesis, every check, against a real server: the test suite's run, longer and with a fresh
# seed (FUZZ_SEED=1 repeats the suite's; the seed of a failing run is in its output).
FUZZ_EXAMPLES ?= 300
FUZZ_SEED ?= random
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SEED=$(FUZZ_SEED) \
		$(BIN)/pytest tests/e2e/test_schemathesis.py -s --timeout 0

# The exact commands that produced the bundled models (reproducible: seeded, one thread).
models: $(STAMP)
	$(BIN)/mcdrop train digits --out models/digits --hidden 256 256 --dropout 0.3 \
		--weight-decay 1e-4 --epochs 60 --seed 0
	$(BIN)/mcdrop train diabetes --out models/diabetes --hidden 50 --dropout 0.05 --lr 3e-4 \
		--weight-decay 1e-3 --epochs 400 --batch-size 32 --seed 0
	# Needs Fashion-MNIST: apt-get install dataset-fashion-mnist (Debian).
	$(BIN)/mcdrop train fashion --out models/fashion --arch cnn --channels 16 32 32 --hidden 128 \
		--spatial-dropout 0.1 --dropout 0.3 --weight-decay 1e-4 --epochs 8 --batch-size 64 \
		--n-samples 50 --seed 0

# The service image, with podman or docker (deploy/container says how it picks and prepares).
image:
	deploy/container build

image-test:
	deploy/container test

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
