#!/usr/bin/env bash
# Copies a run's workdir (checkpoints, samples, eval results, TensorBoard logs) to this machine.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/fetch.sh --workdir=WORKDIR --dest=LOCAL_DIR [--name=NAME] [--zone=ZONE]
                       [--project=PROJECT] [--dry-run]

A gs:// WORKDIR is synced with `gcloud storage rsync --recursive` (no TPU needed); a path on the
TPU VM is copied from worker 0 with `gcloud compute tpus tpu-vm scp --recurse`.
USAGE
}

WORKDIR=
DEST=
while (($#)); do
  case "$1" in
    --workdir=*) WORKDIR=${1#*=} ;;
    --dest=*) DEST=${1#*=} ;;
    *) parse_common "$1" || die "unknown flag $1 (see --help)" ;;
  esac
  shift
done
[[ -n $WORKDIR ]] || die "no workdir: pass --workdir=gs://BUCKET/NAME"
[[ -n $DEST ]] || die "no destination: pass --dest=LOCAL_DIR"
if [[ $WORKDIR == gs://* ]]; then
  run mkdir -p "$DEST"
  run gcloud storage rsync --recursive "$WORKDIR" "$DEST"
else
  require_name
  location_flags
  run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$WORKDIR" "$DEST" \
    "${LOCATION[@]}" --worker=0
fi
