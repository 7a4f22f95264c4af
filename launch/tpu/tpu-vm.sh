#!/usr/bin/env bash
# jaxeff on a Cloud TPU VM slice (e.g. v5p-16, v4-32: several hosts): ship this checkout to every host,
# install it there, and start the same `jaxeff train` on all hosts at once (gcloud ... --worker=all).
#
#   launch/tpu/tpu-vm.sh [--dry-run] [--no-install] TPU_NAME ZONE CONFIG WORKDIR [key.sub=value ...]
#   launch/tpu/tpu-vm.sh my-v5p-16 us-east5-a configs/my-run.yaml gs://my-bucket/runs/my-run train.steps=100000
#   DRY_RUN=1 launch/tpu/tpu-vm.sh ...    # same as --dry-run
#
#   --dry-run     print the commands it would run (copy-pasteable), run none of them
#   --no-install  the hosts already have `jaxeff` on PATH (a custom image): ship only the config
# The gcloud project is gcloud's configured one (or CLOUDSDK_CORE_PROJECT=...).
#
# WORKDIR must be one place that every host reaches, given as the hosts see it:
#   gs://BUCKET/PATH   jaxeff reads and writes the bucket directly (the TPU VM's service account needs
#                      write access to it)
#   /mnt/shared/PATH   or a shared filesystem mounted at the same path on every host (Filestore over NFS,
#                      or a bucket mounted with gcsfuse)
# A host-local path would give every host its own half of each checkpoint, so it is refused.
#
# What runs: `git archive HEAD` of this checkout (committed files only) and CONFIG are copied to every
# host's home directory; each host unpacks the source into ~/jaxeff-launch/src, installs it with the
# [tpu] extra into ~/jaxeff-launch/venv, and runs `jaxeff train` there with JAXEFF_CLUSTER=tpu, which
# makes jaxeff start jax.distributed and JAX read the slice's layout (worker hostnames, this host's
# worker number) from the TPU metadata server. Output of all hosts comes back to this terminal.
#
# Failures: if a host dies, the others stop within JAXEFF_FAILURE_TIMEOUT seconds (default 100) with
# JAX's "The following tasks are unhealthy (stopped sending heartbeats)", and this script exits
# non-zero. On SIGTERM (maintenance, preemption) the hosts save one checkpoint together and exit 143.
# Either way, once the slice is healthy again, run the same command: training resumes from the last
# checkpoint in WORKDIR. The processes are tied to the ssh sessions: run this from a machine that stays
# connected (tmux, Cloud Shell), or they stop when it disconnects.
set -euo pipefail

usage="usage: launch/tpu/tpu-vm.sh [--dry-run] [--no-install] TPU_NAME ZONE CONFIG WORKDIR [key.sub=value ...]"
die() { echo "tpu-vm.sh: $*" >&2; exit 2; }

dry_run=${DRY_RUN:-0}
[ "$dry_run" = 0 ] || [ "$dry_run" = 1 ] || die "DRY_RUN must be 0 or 1, got '$dry_run'"
install=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --no-install) install=0; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    --) shift; break ;;
    -*) echo "$usage" >&2; die "unknown option $1" ;;
    *) break ;;
  esac
done
if [ $# -lt 4 ]; then
  echo "$usage" >&2
  exit 2
fi
tpu_name=$1 zone=$2 config=$3 workdir=$4
shift 4
[ -f "$config" ] || die "config $config: no such file"
case "$workdir" in
  gs://?*|/*) ;;
  *) die "WORKDIR '$workdir' must be gs://BUCKET/PATH or an absolute path of a filesystem shared by all hosts" ;;
esac
for override in "$@"; do
  case "$override" in
    *=*) ;;
    *) die "override '$override' is not key.sub=value" ;;
  esac
done

# quote ARG...: the arguments as one line of shell words (bare when safe, else in single quotes).
quote() {
  local out="" word
  for word in "$@"; do
    case "$word" in
      "" | *[!A-Za-z0-9_./:=@%+,-]*) word="'${word//\'/\'\\\'\'}'" ;;
    esac
    out="${out:+$out }$word"
  done
  printf '%s' "$out"
}

# run CMD...: print it (dry run) or run it.
run() {
  if [ "$dry_run" = 1 ]; then
    quote "$@"; echo
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
stage=${TMPDIR:-/tmp}/jaxeff-tpu-vm.XXXXXX   # made by mktemp -d when not a dry run
if [ "$dry_run" = 0 ]; then
  command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk/docs/install)"
  stage=$(mktemp -d "$stage")
  trap 'rm -rf "$stage"' EXIT
  if [ "$install" = 1 ] && [ -n "$(git -C "$src" status --porcelain --untracked-files=no)" ]; then
    echo "tpu-vm.sh: warning: uncommitted changes in $src are not shipped (git archive HEAD)" >&2
  fi
fi

# The remote command, run by bash on every host (~/jaxeff-config.yaml: expanded there).
train="train --config ~/jaxeff-config.yaml $(quote --workdir "$workdir" "$@")"
if [ "$install" = 1 ]; then
  remote="set -e; mkdir -p ~/jaxeff-launch; rm -rf ~/jaxeff-launch/src"
  remote+="; tar -xzf ~/jaxeff-src.tar.gz -C ~/jaxeff-launch"
  remote+="; [ -x ~/jaxeff-launch/venv/bin/python ] || python3 -m venv ~/jaxeff-launch/venv"
  remote+="; ~/jaxeff-launch/venv/bin/pip install -q -e ~/jaxeff-launch/src\"[tpu]\""
  remote+="; cd ~/jaxeff-launch/src; JAXEFF_CLUSTER=tpu exec ~/jaxeff-launch/venv/bin/jaxeff $train"
else
  remote="set -e; JAXEFF_CLUSTER=tpu exec jaxeff $train"
fi

if [ "$install" = 1 ]; then
  run git -C "$src" archive --format=tar.gz --prefix=src/ -o "$stage/jaxeff-src.tar.gz" HEAD
  run gcloud compute tpus tpu-vm scp "$stage/jaxeff-src.tar.gz" "$tpu_name:jaxeff-src.tar.gz" \
    --zone="$zone" --worker=all
fi
run gcloud compute tpus tpu-vm scp "$config" "$tpu_name:jaxeff-config.yaml" --zone="$zone" --worker=all
run gcloud compute tpus tpu-vm ssh "$tpu_name" --zone="$zone" --worker=all --command "$remote"
