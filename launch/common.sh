# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): defaults, flag parsing, and `run`, which prints
# a command instead of running it under --dry-run.
#
# Defaults come from the environment and flags override them:
#   TPU_NAME (--name), ZONE (--zone), PROJECT (--project), ACCELERATOR_TYPE (--accelerator_type),
#   RUNTIME_VERSION (--version), REMOTE_DIR (where the code lives on every worker), LOG_FILE.

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-diffusion_jax}
LOG_FILE=${LOG_FILE:-ddpm.log}
DRY_RUN=0

die() {
  echo "error: $*" >&2
  exit 2
}

# Handles the flags every script takes; returns 1 for a flag it does not know.
parse_common() {
  case "$1" in
    --name=*) TPU_NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) return 1 ;;
  esac
}

require_name() {
  [[ -n $TPU_NAME ]] || die "no TPU name: pass --name=NAME or set TPU_NAME"
}

# Runs a command, or under --dry-run prints it, shell-quoted, on one line.
run() {
  if ((DRY_RUN)); then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

# The zone and project flags every gcloud TPU command takes.
location_flags() {
  LOCATION=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then
    LOCATION+=(--project="$PROJECT")
  fi
}

# gcloud compute tpus tpu-vm ssh on the given workers ('all' or an index) with a command.
tpu_ssh() {
  local worker=$1 command=$2
  location_flags
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$worker" \
    --command="$command"
}
