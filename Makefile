# Two commands on a fresh machine:  make run   |   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= out
WORK   ?= work
NPROCS ?= 2
export NIPYPE_NO_ET := 1
export MPLBACKEND := Agg

.PHONY: all setup sysdeps run test test-fast bench clean

all: run

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# System packages the browser tests need (Debian's Chromium). Installed when missing and we are root.
sysdeps:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: chromium not found and not root; browser tests will be skipped"; fi; \
	fi

run: $(STAMP)
	$(BIN)/lesionpipe run sample_scans $(OUT) -w $(WORK) --nprocs $(NPROCS)

test: $(STAMP) sysdeps
	$(BIN)/python -m pytest -n $(NPROCS) -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e and not browser"

bench: $(STAMP)
	$(BIN)/python scripts/bench_visit.py

clean:
	rm -rf $(OUT) $(WORK) .pytest_cache
