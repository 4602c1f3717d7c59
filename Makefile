# Two commands do everything: `make demo` (train the tiny model SFT -> DPO on the CPU) and `make test`.
# Both create .venv/ at the repo root first when it is missing.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh
	touch $@

demo: $(STAMP)
	$(VENV)/bin/python recipes/sft_dpo.py experiment=demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) outputs runs multirun
