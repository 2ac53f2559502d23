# qcourse: two commands do everything — `make lab` and `make test` (see README.md).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LAB_ARGS ?=

.PHONY: setup assets sandbox-tools browser-tools lab test test-fast test-other-kernels bench demo clean-venv

# The virtual environment, rebuilt when the lock or the package metadata changes.
$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; qcourse needs Python 3.11 (set PYTHON=/path/to/python3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

# Offline models and data (pinned by sha256, cached in $$QCOURSE_CACHE or ~/.cache/qcourse);
# the first run also fine-tunes the sentiment classifier once (a few minutes on 2 cores).
assets: $(STAMP)
	$(PY) -m qcore.zoo prepare

# bubblewrap boxes the kernels of `qcourse autograde`; installed where we may (root with apt),
# otherwise grading falls back to resource limits and says so.
sandbox-tools:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -q bubblewrap >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
	   apt-get install -y -q bubblewrap >/dev/null 2>&1)); } || \
	  echo "note: bubblewrap not installed; autograding will use resource limits only"

# Debian's Chromium for the browser test (tests/browser), driven by Playwright without a download;
# without it that test is skipped.
browser-tools:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
	   apt-get install -y -q chromium chromium-driver >/dev/null 2>&1)); } || \
	  echo "note: chromium not installed; the browser test will be skipped"

setup: $(STAMP) assets sandbox-tools browser-tools

lab: setup
	$(VENV)/bin/qcourse lab $(LAB_ARGS)

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

# The fast suite as another CPU would run it: scalar ATen kernels and oneDNN's AVX2 kernels
# (docs/numerics-across-cpus.md); `make test` already regenerates the references and grades the
# solutions under both.
test-other-kernels: setup
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -m "not slow" qcore tests/unit tests/labs tests/zoo

# Every table prints even when one misses a target; the exit status says whether all were met.
# (bench_labs.py times each lab's master, the lab tests' run: several minutes on 2 cores; bench_judging.py
# grades each solution as judged now and with the in-kernel tests of before, side by side; bench_cluster.py
# grades a class locally and on a Dask cluster of 2 workers on this machine.)
BENCHES := bench_numerics bench_ptq bench_causal_lm bench_llm_weights bench_labs bench_judging bench_cluster
bench: setup
	@failed=""; for b in $(BENCHES); do $(PY) bench/$$b.py || failed="$$failed $$b"; done; \
	  if [ -n "$$failed" ]; then echo "targets missed:$$failed"; exit 1; fi

demo: setup
	$(PY) bench/demo.py

clean-venv:
	rm -rf $(VENV)
