#!/usr/bin/env bash
# Copies a run's workdir (checkpoints, samples, eval results, TensorBoard logs) to this machine.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/fetch.sh --workdir=WORKDIR [--dest=LOCAL_DIR] [--no-checkpoints] [--dry-run]
                       [--name=NAME --zone=ZONE [--project=PROJECT]]

Copies WORKDIR to LOCAL_DIR (default: ./ and WORKDIR's last part; files already there are
updated, none are deleted):
  gs://...  `gcloud storage rsync --recursive`; no TPU needed. --no-checkpoints leaves out
            WORKDIR/checkpoints (hundreds of MB each for CIFAR10).
  else      `gcloud compute tpus tpu-vm scp --recurse` from worker 0 of the TPU VM NAME (into
            LOCAL_DIR/ if LOCAL_DIR exists); a relative WORKDIR is taken, as run.sh does,
            relative to ~/$REMOTE_DIR there.
--dry-run prints the commands instead of running them. Flags override the environment
variables TPU_NAME, ZONE and PROJECT.
USAGE
}

WORKDIR=
DEST=
CHECKPOINTS=1
while (($#)); do
  SHIFT=1
  case $1 in
    --workdir | --workdir=*)
      flag_value "$@"
      WORKDIR=$VALUE
      ;;
    --dest | --dest=*)
      flag_value "$@"
      DEST=$VALUE
      ;;
    --no-checkpoints) CHECKPOINTS=0 ;;
    *) parse_common "$@" ;;
  esac
  shift "$SHIFT"
done
[[ -n $WORKDIR ]] || die "no workdir: pass --workdir=gs://BUCKET/RUN"
WORKDIR=${WORKDIR%/}
if [[ -z $DEST ]]; then
  DEST=./${WORKDIR##*/}
  [[ $DEST != ./ && $DEST != ./. && $DEST != ./.. ]] || die "no destination: pass --dest=LOCAL_DIR"
fi

if [[ $WORKDIR == gs://* ]]; then
  run mkdir -p "$DEST"
  if ((CHECKPOINTS)); then
    run gcloud storage rsync --recursive "$WORKDIR" "$DEST"
  else
    run gcloud storage rsync --recursive --exclude='^checkpoints/' "$WORKDIR" "$DEST"
  fi
else
  ((CHECKPOINTS)) || die "--no-checkpoints works with a gs:// workdir only"
  require_tpu
  check_remote_names
  case $WORKDIR in
    /*) remote_path=$WORKDIR ;;
    \~/*) remote_path=${WORKDIR#\~/} ;; # scp paths are relative to the home directory
    *) remote_path=$REMOTE_DIR/$WORKDIR ;;
  esac
  run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$remote_path" "$DEST" --zone="$ZONE" \
    ${PROJECT:+"--project=$PROJECT"} --worker=0
fi
