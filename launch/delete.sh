#!/usr/bin/env bash
# Deletes the TPU VM (or its queued resource). The workdir on gs:// is kept.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/delete.sh --name=NAME --zone=ZONE [--queued] [--yes] [--project=PROJECT]
                        [--dry-run]

Deletes the TPU VM NAME (`gcloud compute tpus tpu-vm delete`), or with --queued the queued
resource NAME and the TPU VM it brought (`gcloud compute tpus queued-resources delete --force`):
use --queued for a TPU made with `create.sh --queued`. Asks first unless --yes or --dry-run.
Files on the workers are lost; nothing on gs:// is touched. --dry-run prints the gcloud command
instead of running it. Flags override the environment variables TPU_NAME, ZONE and PROJECT.
USAGE
}

QUEUED=0
YES=0
while (($#)); do
  SHIFT=1
  case $1 in
    --queued) QUEUED=1 ;;
    --yes) YES=1 ;;
    *) parse_common "$@" ;;
  esac
  shift "$SHIFT"
done
require_tpu

if ((!YES && !DRY_RUN)); then
  [[ -t 0 ]] || fail "not deleting $TPU_NAME without confirmation: pass --yes"
  read -r -p "Delete the TPU $TPU_NAME in $ZONE and everything on its disks? [y/N] " answer ||
    answer=
  [[ $answer == [yY]* ]] || fail "not deleted"
fi
if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" --zone="$ZONE" \
    ${PROJECT:+"--project=$PROJECT"} --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" \
    ${PROJECT:+"--project=$PROJECT"} --quiet
fi
