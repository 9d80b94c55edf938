#!/usr/bin/env bash
# Creates a Cloud TPU VM (or queues one with --queued).
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/create.sh --name=NAME [--zone=ZONE] [--accelerator_type=TYPE] [--version=RUNTIME]
                        [--project=PROJECT] [--spot] [--queued] [--dry-run]

Creates the TPU VM NAME (e.g. --accelerator_type=v4-32 for 4 hosts). --spot asks for spot
capacity; --queued goes through queued resources (waits for capacity instead of failing).
--dry-run prints the gcloud command without running it.
Defaults: ZONE=us-central2-b ACCELERATOR_TYPE=v4-8 RUNTIME_VERSION=tpu-ubuntu2204-base, or the
environment variables of the same names; TPU_NAME and PROJECT likewise.
USAGE
}

SPOT=0
QUEUED=0
while (($#)); do
  case "$1" in
    --accelerator_type=*) ACCELERATOR_TYPE=${1#*=} ;;
    --version=*) RUNTIME_VERSION=${1#*=} ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    *) parse_common "$1" || die "unknown flag $1 (see --help)" ;;
  esac
  shift
done
require_name
location_flags
extra=()
if ((SPOT)); then
  extra+=(--spot)
fi
if ((QUEUED)); then
  run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
    "${LOCATION[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$RUNTIME_VERSION" "${extra[@]}"
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
fi
