# Two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
# `make test-fast` is the day-to-day lane: every test but those marked slow, no lint, no browser install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLKIT := $(VENV)/bin/toolkit
OUT ?= demo-out

LINT_PATHS := toolkit export serve tests bench scripts

.PHONY: demo test test-fast lint browser kserve-client perf-analyzer install install-test bench clean

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

# Lint first: ruff (rules and the 110-column limit in pyproject's [tool.ruff]) and mypy, non-strict, over
# toolkit/ export/ serve/ ([tool.mypy]). Both must be clean.
test: install-test browser kserve-client perf-analyzer lint
	$(PY) -m pytest -q

# Under 90 s on a 2-core machine: `@pytest.mark.slow` marks what would push it past that (and still runs
# in `make test`). Run `$(PY) -m pytest -m "not slow" --durations=30` to see what to mark.
test-fast: install-test
	$(PY) -m pytest -q -m "not slow"

# Both run, so one pass reports everything; either finding fails the target.
lint: install-test
	@status=0; \
	echo "ruff check $(LINT_PATHS)"; $(PY) -m ruff check $(LINT_PATHS) || status=1; \
	echo "mypy (files in [tool.mypy])"; $(PY) -m mypy || status=1; \
	exit $$status

# The page test (tests/test_serve_page.py) drives Debian's chromium + chromium-driver: installed here once,
# when missing, where apt-get can (as root, or with password-less sudo). Where it cannot, `make test` goes
# on and that test skips with its reason.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then root=""; elif sudo -n true 2>/dev/null; then root="sudo -n"; \
	else echo "note: chromium missing and no root to install it; the browser test will skip"; exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "note: chromium missing and no apt-get to install it; the browser test will skip"; exit 0; fi; \
	echo "installing chromium + chromium-driver (apt-get) for the browser test"; \
	{ $$root apt-get update -qq && $$root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		chromium chromium-driver; } >/dev/null \
		|| echo "note: apt-get could not install chromium; the browser test will skip"

# KServe's Python SDK pins pandas < 3 and more, so its gRPC client gets a venv of its own; the test that
# drives it against our server (tests/test_serve_kserve_grpc.py) runs it there, and skips with the reason
# where this could not be installed.
KSERVE_VENV := .venv-kserve
kserve-client:
	@if [ -x $(KSERVE_VENV)/bin/python ] && $(KSERVE_VENV)/bin/python -c "import kserve" 2>/dev/null; then exit 0; fi; \
	echo "installing KServe's client into $(KSERVE_VENV) for the gRPC conformance test"; \
	{ $(PYTHON) -m venv $(KSERVE_VENV) && $(KSERVE_VENV)/bin/python -m pip install -qq 'kserve==0.21.0'; } \
		>/dev/null 2>&1 || echo "note: could not install kserve; its gRPC test will skip"

# Triton's perf_analyzer (2.51.0, from the tritonclient wheel; libb64-0d from apt, libcudart from PyPI) in
# bench/.tools/, for the server's shared-memory test (tests/test_serve_workers.py) and the bench; where it
# cannot be installed, `make test` goes on and that test skips with its reason.
perf-analyzer: install-test
	@if [ -x bench/.tools/perf_analyzer ] && ldconfig -p 2>/dev/null | grep -q libb64.so.0d; then exit 0; fi; \
	$(PY) bench/bench_perf_analyzer.py --setup >/dev/null 2>&1 \
		|| echo "note: could not install perf_analyzer; its test will skip"

# Not part of `make test`: timings belong in bench/, with ratios against baselines from the same run.
bench: install-test
	for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(OUT) build dist *.egg-info
