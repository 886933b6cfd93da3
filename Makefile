# Both `make demo` and `make test` create or refresh .venv by themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# azure-iot-device pins paho-mqtt<2: it gets its own venv (tests/test_transport_azure.py runs there).
AZURE_VENV := .venv-azure
AZURE_STAMP := $(AZURE_VENV)/.installed

.PHONY: demo test lint bench venv venv-azure clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

$(AZURE_STAMP): pyproject.toml
	test -x $(AZURE_VENV)/bin/python || $(PY) -m venv $(AZURE_VENV)
	$(AZURE_VENV)/bin/python -m pip install -q --upgrade pip
	$(AZURE_VENV)/bin/python -m pip install -q -e '.[azure]' 'pytest>=8' 'pytest-timeout>=2.2'
	touch $(AZURE_STAMP)

venv-azure: $(AZURE_STAMP)

demo: $(STAMP)
	$(BIN)/edgeloop demo $(ARGS)

test: $(STAMP) $(AZURE_STAMP)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy runtime cloud devices edgeloop

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(AZURE_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
