# The two commands of the README. Both create (or reuse) the project's virtual environment.
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to the releases that install (and run on CPU) on the project machines
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint browser venv test-diffusers-matrix

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
	$(MAKE) --no-print-directory test-diffusers-matrix

# The diffusers matrix: the drop-in contract and bit-identity tests (`pytest -m dropin`) on the oldest diffusers
# pyproject.toml declares (its lower bound, read from there) and on the newest release under its upper bound.
# Each version gets a small venv that sees .venv's packages (a .pth file) and holds only what pip has to change
# for that diffusers (diffusers itself, and e.g. an older huggingface_hub/transformers where it needs them);
# `pip check` then proves the mix is one pip would give a user.
DIFFUSERS_OLDEST := $(shell sed -n 's/^ *"diffusers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
DIFFUSERS_NEWEST := 0.42.1
MATRIX := $(DIFFUSERS_OLDEST:%=.venv-diffusers-%) $(DIFFUSERS_NEWEST:%=.venv-diffusers-%)
PURELIB := import sysconfig; print(sysconfig.get_paths()["purelib"])
BASE_PTH := import sysconfig; print("import site; site.addsitedir(%r)" % sysconfig.get_paths()["purelib"])

.venv-diffusers-%/.installed: $(VENV)/.installed
	rm -rf $(@D)
	$(BIN)/python -m venv --without-pip $(@D)
	$(BIN)/python -c '$(BASE_PTH)' > "$$($(@D)/bin/python -c '$(PURELIB)')/diffmem-base-venv.pth"
	$(@D)/bin/python -m pip install --quiet "diffusers==$*" -e .
	$(@D)/bin/python -m pip check
	touch $@

test-diffusers-matrix: $(MATRIX:%=%/.installed)
	@test -n "$(DIFFUSERS_OLDEST)" || (echo 'pyproject.toml: no "diffusers>=X,<Y" line to read the oldest diffusers from'; exit 2)
	@for v in $(MATRIX); do \
		echo "== drop-in tests on diffusers $$($$v/bin/python -c 'import diffusers; print(diffusers.__version__)')"; \
		$$v/bin/python -m pytest -m dropin -q -p no:cacheprovider || exit 1; \
	done
