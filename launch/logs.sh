#!/usr/bin/env bash
# Follows the log of a job started by run.sh on one worker (worker 0, the one that logs).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/logs.sh --name=NAME --zone=ZONE [--worker=N] [--project=PROJECT] [--dry-run]

Prints the last 100 lines of ~/$LOG_FILE (default ~/ddpm.log) on worker N (default 0: only
worker 0 logs training progress) and follows it (`tail -F`). Ctrl-C stops following, not the job.
--dry-run prints the gcloud command instead of running it. Flags override the environment
variables TPU_NAME, ZONE and PROJECT.
USAGE
}

WORKER=0
while (($#)); do
  SHIFT=1
  case $1 in
    --worker | --worker=*)
      flag_value "$@"
      WORKER=$VALUE
      ;;
    *) parse_common "$@" ;;
  esac
  shift "$SHIFT"
done
require_tpu
check_remote_names
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker takes one worker's index, not '$WORKER'"
tpu_ssh "$WORKER" "tail -n 100 -F ~/$LOG_FILE"
