#!/usr/bin/env bash
# Deletes the TPU VM (or its queued resource). The gs:// workdir is kept.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/delete.sh --name=NAME [--queued] [--yes] [--zone=ZONE] [--project=PROJECT]
                        [--dry-run]

Deletes the TPU VM NAME, or with --queued the queued resource NAME and its TPU. Asks first
unless --yes (or --dry-run). Data on gs:// is not touched.
USAGE
}

QUEUED=0
YES=0
while (($#)); do
  case "$1" in
    --queued) QUEUED=1 ;;
    --yes) YES=1 ;;
    *) parse_common "$1" || die "unknown flag $1 (see --help)" ;;
  esac
  shift
done
require_name
location_flags
if ((!YES && !DRY_RUN)); then
  read -r -p "Delete TPU $TPU_NAME in $ZONE? [y/N] " answer
  [[ $answer == [yY]* ]] || die "not deleted"
fi
if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
fi
