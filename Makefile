# Two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLKIT := $(VENV)/bin/toolkit
OUT ?= demo-out

.PHONY: demo test install install-test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install when pyproject.toml changes (stamp files).
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -qq -e '.[plots]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -qq -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	@bash scripts/demo.sh $(TOOLKIT) $(OUT)

test: install-test
	$(PY) -m pytest -q

# Not part of `make test`: timings belong in bench/, with ratios against baselines from the same run.
bench: install-test
	for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(OUT) build dist *.egg-info
