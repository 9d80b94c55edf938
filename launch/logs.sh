#!/usr/bin/env bash
# Follows the log of worker 0 (the one that logs and writes samples and metrics).
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/logs.sh --name=NAME [--worker=0] [--zone=ZONE] [--project=PROJECT] [--dry-run]

Follows ~/$LOG_FILE on one worker (default 0; Ctrl-C stops following, not the job).
USAGE
}

WORKER=0
while (($#)); do
  case "$1" in
    --worker=*) WORKER=${1#*=} ;;
    *) parse_common "$1" || die "unknown flag $1 (see --help)" ;;
  esac
  shift
done
require_name
tpu_ssh "$WORKER" "tail -n 100 -F ~/$LOG_FILE"
