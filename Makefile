# Two commands for a fresh machine with Python 3.11 and pip:
#   make train   set up .venv, install jaxeff, train the default debug model on CPU
#   make test    set up .venv with the dev, parity and aot extras (compilers for H100 and TPU) and run the whole suite
#   make docs    regenerate docs/config.md and configs/jaxeff.schema.json from jaxeff/config/
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/debug.yaml
WORKDIR ?= runs/debug

.PHONY: train test docs setup setup-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

setup: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

# The aot compilers (CUDA plugin, libtpu) pinned to the jax version in use, so that they never move jax: the tests
# compile the kernels and train steps for an H100 and TPU chips (`jaxeff plan`).
setup-dev: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev,parity]"
	$(BIN)/python -m pip install --quiet "jax[cuda12,tpu]==$$($(BIN)/python -c 'import jax; print(jax.__version__)')"

train: setup
	$(BIN)/jaxeff train --config $(CONFIG) --workdir $(WORKDIR)

test: setup-dev
	$(BIN)/python -m pytest -n 2 --dist loadfile -q -p no:cacheprovider

docs: setup
	$(BIN)/python -m jaxeff.config.reference --write

clean:
	rm -rf $(VENV) runs
