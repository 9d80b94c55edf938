#!/usr/bin/env bash
# One prepared command for the lent GPU machine (run from the repository root).
#
#   benchmarks/device.sh --fetch-wheels   here, beforehand: download the wheels the lent image
#                                         lacks (benchmarks/device_wheels.txt) into .whl/
#   benchmarks/device.sh                  there: install .whl/ into /tmp/site, then run
#                                         benchmarks/device.py under an 8-minute limit
#   benchmarks/device.sh --rehearse       here: the same run on this CPU, in a venv that holds
#                                         only the lent image's packages (device_image.txt)
#
# The lent machine's python3 already has jax (CUDA 13), flax, optax, orbax, chex, torch and
# tensorboard, but no ml_collections or diffusers, and no network: those travel as wheels.
# Results: $OUT/results_gpu.json, $OUT/device.log (OUT defaults to ./device_out).
# On the device tool: run(command="bash benchmarks/device.sh", carry=[".whl"], timeout_s=540).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS_LIST=benchmarks/device_wheels.txt
IMAGE_LIST=benchmarks/device_image.txt
MAX_WHEEL_MIB=40
LIMIT_S=480          # the whole run, wheel install included, on the GPU (8 minutes)
REHEARSE_LIMIT_S=900 # the CPU rehearsal (reduced sizes, a slower machine)
OUT=${OUT:-$PWD/device_out}

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

requirements() { grep -v '^\s*#' "$1" | grep -v '^\s*$'; }

fetch_wheels() {
  local tmp
  tmp=$(mktemp -d .whl.new.XXXX)
  trap 'rm -rf "$tmp"' EXIT
  # cp312 manylinux x86_64, the lent image's Python; each wheel named in the list, nothing more.
  requirements "$WHEELS_LIST" | xargs python3 -m pip download --quiet --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$tmp"
  local want got bytes
  want=$(requirements "$WHEELS_LIST" | wc -l)
  got=$(find "$tmp" -name '*.whl' | wc -l)
  [ "$got" -eq "$want" ] || { echo "error: $got wheels for $want requirements" >&2; exit 1; }
  bytes=$(du -cb "$tmp"/*.whl | tail -1 | cut -f1)
  if [ "$bytes" -ge $((MAX_WHEEL_MIB * 1024 * 1024)) ]; then
    echo "error: the wheels total $((bytes / 1024 / 1024)) MiB, over $MAX_WHEEL_MIB MiB" >&2
    exit 1
  fi
  rm -rf .whl && mv "$tmp" .whl && trap - EXIT
  ls -l .whl
  echo "$got wheels, $((bytes / 1024)) KiB in all, in .whl/"
}

install_wheels() {  # $1: target folder; puts it first on PYTHONPATH
  ls .whl/*.whl >/dev/null 2>&1 || {
    echo "error: no wheels in .whl/: run benchmarks/device.sh --fetch-wheels first" >&2
    exit 2
  }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$1" .whl/*.whl
  export PYTHONPATH="$1:$PWD"
}

run_on_device() {
  mkdir -p "$OUT"
  install_wheels /tmp/site
  set -o pipefail
  timeout --kill-after=10 "$((LIMIT_S - 20))" python3 -u benchmarks/device.py \
    --out="$OUT" --budget_s="$((LIMIT_S - 40))" 2>&1 | tee "$OUT/device_stdout.log"
}

rehearse() {
  local venv=${REHEARSE_VENV:-$HOME/.cache/diffusion_jax/rehearse-venv}
  local python=${REHEARSE_PYTHON:-python3.12}
  if [ ! -x "$venv/bin/python3" ]; then
    echo "building $venv ($python, packages of $IMAGE_LIST; once)"
    "$python" -m venv "$venv"
    "$venv/bin/python3" -m pip install -q --upgrade pip
    "$venv/bin/python3" -m pip install -q -r "$IMAGE_LIST"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  # The lent image lacks these; the rehearsal must get them from .whl/ only, or not at all.
  local absent
  absent=$(python3 -c '
import importlib.util
names = ("ml_collections", "diffusers", "importlib_metadata", "tensorflow",
         "tensorflow_datasets", "clu")
print(" ".join(n for n in names if importlib.util.find_spec(n)))' 2>/dev/null)
  if [ -n "$absent" ]; then
    echo "error: $venv has $absent, which the lent image lacks; remove them or the venv" >&2
    exit 1
  fi
  REHEARSE_SITE=$(mktemp -d /tmp/diffusion_jax_rehearse_site.XXXX)
  trap 'rm -rf "$REHEARSE_SITE"' EXIT
  install_wheels "$REHEARSE_SITE"
  mkdir -p "$OUT"
  set -o pipefail
  timeout --kill-after=10 "$REHEARSE_LIMIT_S" python3 -u benchmarks/device.py --rehearse \
    --out="$OUT" --budget_s="$((REHEARSE_LIMIT_S - 30))" 2>&1 | tee "$OUT/device_stdout.log"
}

case "${1:-}" in
  --fetch-wheels) fetch_wheels ;;
  --rehearse) rehearse ;;
  '') run_on_device ;;
  -h | --help) usage ;;
  *) usage >&2; exit 2 ;;
esac
