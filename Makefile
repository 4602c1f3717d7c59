# Two commands do everything: `make demo` (train the tiny model SFT -> DPO on the CPU) and `make test`.
# Both create .venv/ at the repo root first when it is missing. `make test-fast` is the edit loop:
# everything but the tests marked slow (those that train a model end to end or launch processes), and
# the property tests with a quarter of their examples (tests/conftest.py). Both run two pytest workers
# (pytest-xdist), each taking whole files; the multi-rank drills run one at a time (tests/conftest.py).
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh
	touch $@

demo: $(STAMP)
	$(VENV)/bin/python recipes/sft_dpo.py experiment=demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m "not slow" --hypothesis-profile=edit-loop tests

clean:
	rm -rf $(VENV) outputs runs multirun
