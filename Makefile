# Two commands do all set-up: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test browser clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lplgrad_jax.main --config=configs/digits.py --workdir=$${WORKDIR:-workdirs/demo} $(ARGS)

# The labeling page's browser test drives headless Chromium; without it (no root, no Debian
# packages) the test is skipped with its reason and the HTTP tests still run.
test: $(STAMP)
	-@$(MAKE) --no-print-directory browser
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

clean:
	rm -rf $(VENV) workdirs
