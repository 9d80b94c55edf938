#!/usr/bin/env bash
# Creates a Cloud TPU VM, or with --queued asks for one through a queued resource.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/create.sh --name=NAME --zone=ZONE --accelerator-type=TYPE [--runtime-version=V]
                        [--project=PROJECT] [--spot] [--queued] [--dry-run]

Creates the TPU VM NAME with `gcloud compute tpus tpu-vm create`. TYPE is e.g. v4-8 (one host)
or v4-32 (4 hosts); the TPU versions live in particular zones (v4: us-central2-b).
  --spot             spot capacity: far cheaper, but it can be preempted at any time
  --queued           `gcloud compute tpus queued-resources create NAME --node-id=NAME`: waits in
                     a queue for capacity instead of failing when there is none
  --runtime-version  the TPU software version; default: Google's recommended one for TYPE
                     (v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite,
                     v4 and older: tpu-ubuntu2204-base)
  --dry-run          print the gcloud command instead of running it
Flags override the environment variables TPU_NAME, ZONE, ACCELERATOR_TYPE, RUNTIME_VERSION and
PROJECT (empty PROJECT: gcloud's configured project).
USAGE
}

# Google's recommended TPU software version for an accelerator type.
default_runtime_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

SPOT='' # the flag itself, or empty
QUEUED=0
while (($#)); do
  SHIFT=1
  case $1 in
    --accelerator-type | --accelerator-type=*)
      flag_value "$@"
      ACCELERATOR_TYPE=$VALUE
      ;;
    --runtime-version | --runtime-version=*)
      flag_value "$@"
      RUNTIME_VERSION=$VALUE
      ;;
    --spot) SPOT=--spot ;;
    --queued) QUEUED=1 ;;
    *) parse_common "$@" ;;
  esac
  shift "$SHIFT"
done
require_tpu
[[ -n $ACCELERATOR_TYPE ]] ||
  die "no accelerator type: pass --accelerator-type=TYPE (e.g. v4-32) or set ACCELERATOR_TYPE"
RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}

if ((QUEUED)); then
  # The queued resource and the TPU VM it brings share the name, so the other scripts find it.
  run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
    --zone="$ZONE" ${PROJECT:+"--project=$PROJECT"} --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$RUNTIME_VERSION" ${SPOT:+"$SPOT"}
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
    ${PROJECT:+"--project=$PROJECT"} --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" ${SPOT:+"$SPOT"}
fi
