#!/usr/bin/env bash
# Copies this repository's committed files to every worker and installs them with jax[tpu].
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/setup.sh --name=NAME --zone=ZONE [--project=PROJECT] [--dry-run]

On every worker of the TPU VM at once (--worker=all):
  1. packs the committed files of this checkout (`git archive HEAD`; uncommitted changes are
     not copied, and a warning says so) and copies the tarball with `gcloud ... scp`;
  2. replaces ~/$REMOTE_DIR (default ~/diffusion_jax) with its contents;
  3. makes the venv ~/$REMOTE_DIR-venv with Python $PYTHON_VERSION (default 3.12) through uv,
     once (the TPU images' own Python, 3.10, is too old), and runs
     `uv pip install -e ".[tpu,tfds,grain]"` there. The workers need internet access (the default).
Run it again after each commit you want on the TPU (not while a job runs); it keeps the venv.
--dry-run prints the commands instead of running them. Flags override the environment
variables TPU_NAME, ZONE and PROJECT.
USAGE
}

while (($#)); do
  SHIFT=1
  parse_common "$@"
  shift "$SHIFT"
done
require_tpu
check_remote_names

repo=$(cd "$(dirname "$0")/.." && pwd)
git -C "$repo" rev-parse --verify --quiet HEAD >/dev/null ||
  fail "$repo is not a git checkout with a commit: setup.sh copies the committed files"
if ! git -C "$repo" diff --quiet HEAD --; then
  warn "uncommitted changes in $repo are not copied: setup.sh copies commit" \
    "$(git -C "$repo" rev-parse --short HEAD)"
fi

tmp_dir=${TMPDIR:-/tmp}
tarball=${tmp_dir%/}/$REMOTE_DIR-$TPU_NAME.tar.gz
# shellcheck disable=SC2088 # ~ is for the workers' shell
venv="~/$REMOTE_DIR-venv"
# uv brings its own Python; the variable lets newer pips install uv outside a venv (PEP 668).
remote=(
  "set -e"
  "if $(job_running); then echo \"a job is running: launch/run.sh --stop ends it\" >&2; exit 1; fi"
  "rm -rf ~/$REMOTE_DIR"
  "mkdir ~/$REMOTE_DIR"
  "tar -xzf ~/$REMOTE_DIR.tar.gz -C ~/$REMOTE_DIR"
  "rm ~/$REMOTE_DIR.tar.gz"
  "cd ~/$REMOTE_DIR"
  "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user --no-warn-script-location uv"
  "[ -x $venv/bin/python ] || python3 -m uv venv -q --python $PYTHON_VERSION $venv"
  "python3 -m uv pip install -q --python $venv/bin/python -e \".[tpu,tfds,grain]\""
)
remote_command=$(printf '%s; ' "${remote[@]}")

run git -C "$repo" archive --format=tar.gz --output="$tarball" HEAD
run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REMOTE_DIR.tar.gz" --zone="$ZONE" \
  ${PROJECT:+"--project=$PROJECT"} --worker=all
tpu_ssh all "${remote_command%; }"
