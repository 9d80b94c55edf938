# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): defaults from the environment, flag parsing,
# and `run`, which under --dry-run prints a command on one line instead of running it.
#
# Defaults come from the environment; the flag in brackets overrides each:
#   TPU_NAME (--name)   ZONE (--zone)   PROJECT (--project)
#   ACCELERATOR_TYPE (--accelerator-type)   RUNTIME_VERSION (--runtime-version)
# and for the workers: REMOTE_DIR (the code, ~/REMOTE_DIR; its venv is ~/REMOTE_DIR-venv),
# PYTHON_VERSION (of that venv) and LOG_FILE (~/ddpm.log; the job's pid goes in ~/ddpm.pid).
#
# Kept to bash 3.2 (macOS's /bin/bash): no ${x@Q} or mapfile, and no "${a[@]}" of empty arrays.

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-} # empty: Google's recommended one for ACCELERATOR_TYPE
REMOTE_DIR=${REMOTE_DIR:-diffusion_jax}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
LOG_FILE=${LOG_FILE:-ddpm.log}
# shellcheck disable=SC2088 # ~ is for the workers' shell
PID_FILE="~/${LOG_FILE%.*}.pid"
DRY_RUN=0
VALUE=
SHIFT=1

# A usage error: one line on stderr, exit status 2.
die() {
  echo "error: $*" >&2
  exit 2
}

# Anything else that stops a script (a missing tool, a refusal): one line, exit status 1.
fail() {
  echo "error: $*" >&2
  exit 1
}

warn() {
  echo "warning: $*" >&2
}

# shellcheck disable=SC2034 # the scripts' loops read VALUE and SHIFT
# Reads the value of the flag in $1, written --flag=VALUE or --flag VALUE, into VALUE and sets
# SHIFT to the number of arguments it used. Call it with all the remaining arguments.
flag_value() {
  if [[ $1 == *=* ]]; then
    VALUE=${1#*=}
    SHIFT=1
  elif (($# > 1)) && [[ $2 != -* ]]; then
    VALUE=$2
    SHIFT=2
  else
    die "$1 needs a value (see --help)"
  fi
}

# Handles the flags every script takes (call it with all the remaining arguments); anything
# else is an error.
parse_common() {
  case $1 in
    --name | --name=*)
      flag_value "$@"
      TPU_NAME=$VALUE
      ;;
    --zone | --zone=*)
      flag_value "$@"
      ZONE=$VALUE
      ;;
    --project | --project=*)
      flag_value "$@"
      PROJECT=$VALUE
      ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    -*) die "unknown flag $1 (see --help)" ;;
    *) die "unexpected argument $1 (see --help)" ;;
  esac
}

# The TPU name and zone, which every command on a TPU needs.
require_tpu() {
  local valid='^[a-z]([-a-z0-9]*[a-z0-9])?$' # regexes in variables: bash 3.2 parses them alike
  [[ -n $TPU_NAME ]] || die "no TPU name: pass --name=NAME or set TPU_NAME"
  [[ $TPU_NAME =~ $valid ]] ||
    die "bad TPU name $TPU_NAME: lowercase letters, digits and hyphens, starting with a letter"
  [[ -n $ZONE ]] || die "no zone: pass --zone=ZONE (e.g. us-central2-b) or set ZONE"
}

# REMOTE_DIR and LOG_FILE go unquoted into commands run on the workers (and REMOTE_DIR into an
# rm -rf there), so they must be plain names under the home directory.
check_remote_names() {
  local name plain='^[A-Za-z0-9_][A-Za-z0-9._-]*$' version='^[0-9]+(\.[0-9]+)*$'
  for name in "$REMOTE_DIR" "$LOG_FILE"; do
    [[ $name =~ $plain ]] ||
      die "REMOTE_DIR and LOG_FILE must be plain file names (letters, digits, . _ -), not '$name'"
  done
  [[ $PYTHON_VERSION =~ $version ]] || die "bad PYTHON_VERSION '$PYTHON_VERSION'"
}

# Prints one word so that a shell reads it back as the same word: plain words as they are,
# words with control characters escaped by printf %q, others in single quotes (each ' in them
# written '\'') that start after the name of a --flag=.
quote_word() {
  local plain='^[A-Za-z0-9_./:=,@%+-]+$' flag='^--[A-Za-z0-9_-]+=' q="'" prefix='' rest=$1
  if [[ $rest =~ $plain ]]; then
    printf '%s' "$rest"
    return
  elif [[ $rest == *[[:cntrl:]]* ]]; then
    printf '%q' "$rest"
    return
  elif [[ $rest =~ $flag ]]; then
    prefix=${BASH_REMATCH[0]}
    rest=${rest#"$prefix"}
  fi
  printf '%s' "$prefix$q"
  while [[ $rest == *"$q"* ]]; do
    printf '%s' "${rest%%"$q"*}$q\\$q$q"
    rest=${rest#*"$q"}
  done
  printf '%s' "$rest$q"
}

# Prints a command on one line, each word quoted by quote_word.
command_line() {
  local word sep=''
  for word in "$@"; do
    printf '%s' "$sep"
    quote_word "$word"
    sep=' '
  done
  echo
}

# Runs a command, echoing it to stderr first; under --dry-run only prints it, on stdout.
run() {
  if ((DRY_RUN)); then
    command_line "$@"
    return
  fi
  if ! command -v "$1" >/dev/null; then
    [[ $1 != gcloud ]] || fail "gcloud not found: install it (https://cloud.google.com/sdk)"
    fail "$1 not found"
  fi
  echo "+ $(command_line "$@")" >&2
  "$@"
}

# A test, for the workers' shell, that the job run.sh last started there is still running.
job_running() {
  echo "[ -f $PID_FILE ] && kill -0 \"\$(cat $PID_FILE)\" 2>/dev/null"
}

# `gcloud compute tpus tpu-vm ssh` with a command, on the given workers ('all' or an index).
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+"--project=$PROJECT"} \
    --worker="$1" --command="$2"
}
