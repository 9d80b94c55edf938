#!/usr/bin/env bash
# Runs diffusion_jax.main on every worker at once, in the background, logging to ~/$LOG_FILE.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/run.sh --name=NAME --config=CONFIG --workdir=WORKDIR [--mode=train|sample|eval]
                     [--zone=ZONE] [--project=PROJECT] [--dry-run] [-- EXTRA FLAGS...]

Starts `python3 -m diffusion_jax.main --config=CONFIG --workdir=WORKDIR --mode=MODE EXTRA...`
on all workers at once (gcloud ... ssh --worker=all) under nohup, so the job goes on when the ssh
session ends; each worker logs to ~/$LOG_FILE (see launch/logs.sh). The workers join one JAX job
by themselves (jax.distributed on Cloud TPU VMs). Use a gs:// WORKDIR so every worker sees the
same checkpoints, e.g. --workdir=gs://BUCKET/ddpm_cifar10, and pass datasets with
-- --config.data.data_dir=gs://BUCKET/tfds
USAGE
}

CONFIG=
WORKDIR=
MODE=train
EXTRA=()
while (($#)); do
  case "$1" in
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --mode=*) MODE=${1#*=} ;;
    --)
      shift
      EXTRA=("$@")
      break
      ;;
    *) parse_common "$1" || die "unknown flag $1 (see --help)" ;;
  esac
  shift
done
require_name
[[ -n $CONFIG ]] || die "no config: pass --config=configs/cifar10.py"
[[ -n $WORKDIR ]] || die "no workdir: pass --workdir=gs://BUCKET/NAME"
args=(--config="$CONFIG" --workdir="$WORKDIR" --mode="$MODE" "${EXTRA[@]}")
quoted=$(printf '%q ' "${args[@]}")
tpu_ssh all "cd ~/$REMOTE_DIR && nohup python3 -m diffusion_jax.main ${quoted}> ~/$LOG_FILE 2>&1 &"
