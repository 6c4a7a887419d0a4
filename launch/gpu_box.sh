#!/usr/bin/env bash
# One machine with one or more NVIDIA GPUs: a virtual environment with the CUDA build of
# jax, then the run (the default mesh is data parallel over every GPU it sees).
#
#   launch/gpu_box.sh --config=configs/imagenet.py --workdir=/data/runs/imagenet \
#       --config.data.data_dir=/data/tfds
#
# Run it from the repository root (config paths are relative to it). Rerunning the same
# command resumes the run. VENV picks the environment's folder.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$REPO/.venv-gpu}"
if [[ ! -f "$VENV/.installed" ]]; then  # marked only after a complete install
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$REPO/requirements.txt"
  "$VENV/bin/pip" install -q -U "jax[cuda12]"
  touch "$VENV/.installed"
fi
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "$VENV/bin/python" -m resgen_jax.main "$@"
