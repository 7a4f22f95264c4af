#!/usr/bin/env bash
# Cloud TPU VM slice (e.g. v5p-16: several hosts): run the same command on every host.
#   launch/tpu-pod.sh TPU_NAME ZONE configs/debug.yaml [overrides...]
# On TPU VMs `jaxeff train` lets JAX read the slice's metadata (worker hostnames, this worker's id),
# so no coordinator flags are needed. The workdir must be a filesystem path shared by all hosts
# (e.g. a GCS bucket mounted with gcsfuse, or Filestore); jaxeff writes config.yaml and TensorBoard
# files there with ordinary file I/O.
set -euo pipefail
TPU_NAME=${1:?usage: tpu-pod.sh TPU_NAME ZONE CONFIG [overrides...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
shift 3
WORKDIR=${WORKDIR:-/mnt/shared/jaxeff/$(basename "$CONFIG" .yaml)}

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd ~/jaxeff 2>/dev/null || git clone https://github.com/YOUR_ORG/jaxeff ~/jaxeff && cd ~/jaxeff
  python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'
  .venv/bin/jaxeff train --config $CONFIG --workdir $WORKDIR $*
"
