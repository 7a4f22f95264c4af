# Two commands for a fresh machine with Python 3.11 and pip:
#   make train   set up .venv, install jaxeff, train the default debug model on CPU
#   make test    set up .venv with the dev, parity and aot extras (compilers for H100 and TPU) and run the whole suite;
#                as root it first installs the Debian packages slurm-wlm and munge if missing (setup-cluster: the
#                SLURM tests start a one-node cluster, launch/slurm/local-cluster.sh); otherwise those tests skip
#   make docs    regenerate docs/config.md and configs/jaxeff.schema.json from jaxeff/config/
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/debug.yaml
WORKDIR ?= runs/debug

.PHONY: train test docs setup setup-dev setup-cluster clean

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

# tests/test_slurm.py needs slurmctld, slurmd and munged: installed here when running as root (CI), a note otherwise
# (the tests then skip, or fail when CI is set). The daemons they start are their own, not the packages' services.
SLURM_TOOLS = slurmctld slurmd munged sbatch
setup-cluster:
	@PATH="$$PATH:/usr/sbin:/sbin"; missing=""; \
	for tool in $(SLURM_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "setup-cluster: installing slurm-wlm and munge (apt-get) for tests/test_slurm.py"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends slurm-wlm munge >/dev/null; \
	else \
		echo "setup-cluster: missing$$missing and not root (or no apt-get): tests/test_slurm.py will skip" \
			"(as root: apt-get install slurm-wlm munge)"; \
	fi

train: setup
	$(BIN)/jaxeff train --config $(CONFIG) --workdir $(WORKDIR)

test: setup-dev setup-cluster
	$(BIN)/python -m pytest -n 2 --dist loadfile -q -p no:cacheprovider

docs: setup
	$(BIN)/python -m jaxeff.config.reference --write

clean:
	rm -rf $(VENV) runs
