#!/usr/bin/env bash
# Starts diffusion_jax.main on every worker at once, in the background; or stops it (--stop).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/run.sh --name=NAME --zone=ZONE --config=CONFIG --workdir=WORKDIR
                     [--mode=train|sample|eval] [--config.KEY=VALUE ...] [--project=PROJECT]
                     [--dry-run] [-- MORE MAIN FLAGS...]
       launch/run.sh --name=NAME --zone=ZONE --stop [--dry-run]

Starts `python -m diffusion_jax.main --config=CONFIG --workdir=WORKDIR --mode=MODE ...` in
~/$REMOTE_DIR on all workers at once (`gcloud ... ssh --worker=all`), under nohup, so it goes on
after ssh returns; each worker logs to ~/$LOG_FILE (default ~/ddpm.log; follow it with
launch/logs.sh) and keeps the job's pid next to it. The workers join one JAX job by themselves.
--config.KEY=VALUE overrides and everything after `--` are passed to main as they are.
A relative CONFIG is read from the copied checkout. WORKDIR should be on Cloud Storage
(gs://BUCKET/RUN) so that all workers share the checkpoints and resume from them; give tfds
datasets there too: --config.data.data_dir=gs://BUCKET/tfds.
It refuses to start while the last job started on a worker is still running.
  --stop     send SIGTERM to that job on every worker: it saves a checkpoint and exits
  --dry-run  print the gcloud command instead of running it
Flags override the environment variables TPU_NAME, ZONE and PROJECT.
USAGE
}

CONFIG=
WORKDIR=
MODE=train
STOP=0
MAIN_ARGS=()
while (($#)); do
  SHIFT=1
  case $1 in
    --config | --config=*)
      flag_value "$@"
      CONFIG=$VALUE
      ;;
    --workdir | --workdir=*)
      flag_value "$@"
      WORKDIR=$VALUE
      ;;
    --mode | --mode=*)
      flag_value "$@"
      MODE=$VALUE
      ;;
    --config.*) MAIN_ARGS+=("$1") ;;
    --stop) STOP=1 ;;
    --)
      shift
      MAIN_ARGS+=("$@")
      break
      ;;
    *) parse_common "$@" ;;
  esac
  shift "$SHIFT"
done
require_tpu
check_remote_names

running=$(job_running)
if ((STOP)); then
  tpu_ssh all "if $running; then kill \"\$(cat $PID_FILE)\" && echo \"sent SIGTERM\";\
 else echo \"no job running\"; fi"
  exit 0
fi

[[ -n $CONFIG ]] || die "no config: pass --config=configs/cifar10.py"
[[ -n $WORKDIR ]] || die "no workdir: pass --workdir=gs://BUCKET/RUN"
if [[ $WORKDIR != gs://* ]]; then
  warn "--workdir=$WORKDIR is not on gs://: each worker keeps its own, which works on a" \
    "single-host TPU only"
fi

# main's arguments, quoted for the workers' shell.
args=$(command_line --config="$CONFIG" --workdir="$WORKDIR" --mode="$MODE" \
  ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})
# shellcheck disable=SC2088
python="~/$REMOTE_DIR-venv/bin/python"
remote=(
  "cd ~/$REMOTE_DIR || exit 1;"
  "[ -x $python ] || { echo \"no $python: run launch/setup.sh first\" >&2; exit 1; };"
  "if $running; then echo \"a job is already running: launch/run.sh --stop ends it\" >&2;"
  "exit 1; fi;"
  "PYTHONUNBUFFERED=1 nohup $python -m diffusion_jax.main $args > ~/$LOG_FILE 2>&1 < /dev/null &"
  "echo \$! > $PID_FILE"
)
tpu_ssh all "${remote[*]}"
