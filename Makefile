# Two commands do all set-up: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint browser clean wheels accelerator-check

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lplgrad_jax.main --config=configs/digits.py --workdir=$${WORKDIR:-workdirs/demo} $(ARGS)

# The labeling page's browser test drives headless Chromium; without it (no root, no Debian
# packages) the test is skipped with its reason and the HTTP tests still run.
# The tests whose results depend on float32 rounding run a second time with XLA's code
# generation limited to AVX2, as on a CPU without AVX-512 (docs/cpu_numerics.md).
test: $(STAMP) lint
	-@$(MAKE) --no-print-directory browser
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)
	XLA_FLAGS="--xla_cpu_max_isa=AVX2 $$XLA_FLAGS" $(BIN)/python -m pytest -n 2 --dist loadfile \
	  --no-loadscope-reorder -m "numerics and not slow" $(PYTEST_ARGS)

# The code base stays clean under the linter and the formatter (pyproject.toml [tool.ruff]);
# `$(BIN)/ruff format . && $(BIN)/ruff check --fix .` repairs most of what this reports.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# A bare GPU machine without network (jax, flax, optax, orbax, torch... but no ml_collections,
# tensorboardX, TensorFlow): `make wheels` here puts the pure-Python wheels it lacks and the
# CIFAR-10 subset into .wheels/ (ignored); carry .wheels/ there and run `make accelerator-check`.
GPU_WHEELS ?= ml_collections==1.1.0 tensorboardX==2.6.5
SHARED_DATA ?= ../shared/data/cifar10_subset.npz

wheels: $(STAMP)
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: -d .wheels $(GPU_WHEELS)
	@mkdir -p .wheels/data
	@if test -f $(SHARED_DATA); then cp $(SHARED_DATA) .wheels/data/; \
	else echo "note: $(SHARED_DATA) is missing: pass ARGS=--data=PATH on the GPU machine"; fi

accelerator-check:
	@if ls .wheels/*.whl >/dev/null 2>&1; then $(PYTHON) -m pip install --quiet --no-index \
	  --no-deps --no-compile --upgrade --target .wheels/site .wheels/*.whl; fi
	PYTHONPATH=$(CURDIR)/.wheels/site$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 \
	  $(PYTHON) experiments/accelerator_check.py $(ARGS)

clean:
	rm -rf $(VENV) workdirs .jax_test_cache
