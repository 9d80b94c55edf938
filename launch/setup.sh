#!/usr/bin/env bash
# Copies this repository (its committed files) to every worker and installs it with jax[tpu].
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/setup.sh --name=NAME [--zone=ZONE] [--project=PROJECT] [--dry-run]

Packs the committed files of this repository (git archive HEAD), copies the tarball to every
worker of the TPU VM, unpacks it into ~/$REMOTE_DIR and runs pip install -e ".[tpu]" there,
on all workers at once. Run it again after each commit you want on the TPU.
USAGE
}

while (($#)); do
  parse_common "$1" || die "unknown flag $1 (see --help)"
  shift
done
require_name
location_flags
repo=$(cd "$(dirname "$0")/.." && pwd)
tarball=${TMPDIR:-/tmp}/diffusion_jax.tar.gz
run git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:~/diffusion_jax.tar.gz" \
  "${LOCATION[@]}" --worker=all
tpu_ssh all "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/diffusion_jax.tar.gz -C ~/$REMOTE_DIR \
&& cd ~/$REMOTE_DIR && python3 -m pip install -q -e '.[tpu]'"
