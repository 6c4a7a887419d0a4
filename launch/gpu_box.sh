#!/usr/bin/env bash
# One machine with one or more NVIDIA GPUs: a virtual environment with the CUDA build of
# jax, then the run (the default mesh is data parallel over every GPU it sees).
#
#   launch/gpu_box.sh --config=configs/imagenet.py --workdir=/data/runs/imagenet \
#       --config.data.data_dir=/data/tfds
#
# Rerunning the same command resumes the run. VENV picks the environment's folder.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-gpu}"
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r requirements.txt
  "$VENV/bin/pip" install -q -U "jax[cuda12]"
fi
exec "$VENV/bin/python" -m resgen_jax.main "$@"
