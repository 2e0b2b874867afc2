# The two commands of the README. Both set up everything on a fresh machine and are quick after.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.moleserve-installed
TEST_STAMP := $(VENV)/.moleserve-test-installed

.PHONY: serve test model bench clean

$(STAMP): pyproject.toml scripts/install.sh
	VENV=$(VENV) scripts/install.sh
	touch $@

$(TEST_STAMP): pyproject.toml scripts/install.sh
	VENV=$(VENV) scripts/install.sh test
	touch $(STAMP) $@

model: $(STAMP)
	$(PY) -c "from server.model import ensure_default_model; print(ensure_default_model())"

serve: model
	$(VENV)/bin/moleserve serve --host $(HOST) --port $(PORT) --first-run-bank

test: $(TEST_STAMP)
	$(VENV)/bin/ruff check --select F,E741 --quiet .
	$(PY) -c "from server.model import ensure_default_model; print(ensure_default_model())"
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
