# advlens: `make all-layers` runs the main job, `make test` runs the tests.
# Both set everything up on first use (a virtual environment in .venv and the dataset).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/default.toml
GPUS   ?=
WORKERS ?=
ARGS   ?=
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
# The CPU build of torch lies on this kind of machine's disk; on a machine with a GPU pip
# takes the default (CUDA) build instead.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.2" || echo "torch==2.13.0")

.PHONY: robust-vs-standard all-layers test test-long test-all setup data browser lint bench gpu-check gpu-wheels clean help

help:
	@echo "make all-layers   set up, train (once) and run the default layer analysis -> runs/default/"
	@echo "make test         set up and run the tests, about 2 minutes (test-long: CI's rest; test-all: all)"
	@echo "make robust-vs-standard  adversarially trained vs standard small CNN -> runs/robust-vs-standard/"
	@echo "make lint         ruff (check and format) and mypy on pipeline/ and kernels/"
	@echo "make bench        the CPU benchmarks -> benchmarks/results/"
	@echo "make gpu-wheels   fetch the wheels a bare GPU machine lacks -> .whl/ (needs PyPI)"
	@echo "make gpu-check    on one GPU, offline: pytest -m gpu + GPU benchmarks (dry run without one)"
	@echo "options: CONFIG=file.toml GPUS=0,1 WORKERS=N ARGS='--set data.n=200'"

setup: $(VENV)/.installed data

# torchattacks is a test-only reference, installed with --no-deps: it declares torchvision,
# which it does not import and which breaks beside the CPU build of torch.
$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "advlens: $(PYTHON) not found; install Python 3.11+ (apt-get install python3 python3-venv)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { echo "advlens: could not create $(VENV); run: apt-get install python3-venv"; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip || true
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" && \
	$(BIN)/python -m pip install -q -e ".[test]" && \
	$(BIN)/python -m pip install -q --no-deps "torchattacks==3.5.1" || { \
	  echo "advlens: pip could not install the dependencies (is PyPI reachable?). Fix that, then run:"; \
	  echo "  $(BIN)/python -m pip install '$(TORCH_SPEC)' && $(BIN)/python -m pip install -e '.[test]' && make setup"; \
	  exit 1; }
	touch $@

data: $(FMNIST)

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then \
	  echo "advlens: installing Debian's dataset-fashion-mnist"; \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null \
	  || { echo "advlens: could not install dataset-fashion-mnist; run as root: apt-get update && apt-get install dataset-fashion-mnist"; exit 1; }; \
	else \
	  echo "advlens: Fashion-MNIST is missing ($(FMNIST)). Run: sudo apt-get install dataset-fashion-mnist"; \
	  echo "         or set data.path to a folder holding the four *-ubyte.gz files."; exit 1; \
	fi

all-layers: setup
	$(BIN)/advlens run --config $(CONFIG) \
	  $(if $(GPUS),--gpus $(GPUS)) $(if $(WORKERS),--workers $(WORKERS)) $(ARGS)

# The robust model (Madry PGD training, cached once) and the standard one, same attack, compared.
robust-vs-standard: setup
	$(BIN)/advlens train --adversarial pgd-linf --eps 0.1 --steps 7
	$(BIN)/advlens run --config configs/robust-vs-standard.toml $(ARGS)
	$(BIN)/advlens run --config configs/robust-vs-standard.toml --set model.adversarial=none \
	  --set output.name=standard $(ARGS)
	$(BIN)/advlens compare runs/robust runs/standard --metric calibrated --out runs/robust-vs-standard

# Three tiers (markers in pyproject.toml): `make test` is the two-minute loop; `make test-long`
# adds what takes seconds each (whole runs, real processes; CI runs both); `make test-all` also
# runs the minute-long reference comparisons. One pytest-xdist worker per core, a test file per
# worker (its module fixtures are built once).
JOBS   ?= auto
PYTEST := OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n $(JOBS) --dist loadfile

test: setup browser
	$(PYTEST) -m "not slow and not long" $(ARGS)

test-long: setup browser
	$(PYTEST) -m "long and not slow" $(ARGS)

test-all: setup browser
	$(PYTEST) $(ARGS)

# Headless Chromium for the report's browser test (skipped, with the reason, without it).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "advlens: installing Debian's chromium for the report test"; \
	    (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) >/dev/null \
	    || echo "advlens: could not install chromium; the browser test will be skipped"; \
	  else echo "advlens: chromium is missing (sudo apt-get install chromium); the browser test will be skipped"; fi; }

# ruff and mypy come with the test extras (pinned in pyproject.toml); mypy's settings are
# [tool.mypy] there, and .ci/typecheck.py hands it pipeline/ as advlens, kernels/ as advlens.kernels.
LINTED := pipeline kernels tests benchmarks .ci

lint: $(VENV)/.installed
	$(BIN)/python -m ruff check $(LINTED)
	$(BIN)/python -m ruff format --check $(LINTED)
	$(BIN)/python .ci/typecheck.py

bench: setup
	$(BIN)/python benchmarks/overlap_kernel.py --small
	$(BIN)/python benchmarks/store_throughput.py
	$(BIN)/python benchmarks/schedule_scaling.py
	$(BIN)/advlens bench tsne --engines sklearn,opentsne --n 2000 --out benchmarks/results/tsne_engines_small.json

# The GPU machine (torch 2.11 CUDA 13, CuPy 14, SciPy, scikit-learn, dask's and foolbox's small
# shared deps, Python 3.12, no network) lacks these: the versions this venv runs, one of each.
GPU_WHEELS := zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 donfig==0.8.1.post1 \
  dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 \
  tornado==6.6.1 zict==3.0.0 openTSNE==1.0.4 foolbox==3.3.4 eagerpy==0.30.0 \
  GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3
GPU_PLATFORMS := $(foreach n,1 2014 _2_17 _2_27 _2_28,--platform manylinux$(n)_x86_64)

gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp $(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	@du -sh .whl

gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf runs .pytest_cache .hypothesis
