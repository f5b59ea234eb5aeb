# The two commands of the README. Both create (or reuse) the project's virtual environment.
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to the releases that install (and run on CPU) on the project machines
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint browser venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH) -e ".[test]"
	touch $@

demo: venv
	$(BIN)/diffmem demo

# headless Chromium renders the HTML reports in the tests (Debian package)
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

lint: venv
	$(BIN)/ruff check diffmem pipelines tests benchmarks
	$(BIN)/ruff format --check diffmem pipelines tests benchmarks

test: venv browser lint
	$(BIN)/python -m pytest
