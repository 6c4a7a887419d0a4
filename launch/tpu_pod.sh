#!/usr/bin/env bash
# Cloud TPU VM pod slice: create it, install the code on every worker, run one command on
# all workers at once, follow the log, delete it.
#
#   export TPU_NAME=resgen ZONE=us-central2-b ACCELERATOR=v4-64 PROJECT=my-project
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh install            # copies this checkout, pip installs jax[tpu]
#   launch/tpu_pod.sh run --config=configs/imagenet.py --workdir=gs://BUCKET/imagenet \
#       --config.data.data_dir=gs://BUCKET/tfds
#   launch/tpu_pod.sh logs               # worker 0's log (only process 0 writes metrics)
#   launch/tpu_pod.sh delete
#
# Every worker runs the same `python -m resgen_jax.main ...`; JAX finds the other workers
# by itself on a pod slice (train/distributed.py), and the workdir must be shared storage
# (a gs:// bucket) since every worker writes its checkpoint shards there.
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-64}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-resgen_jax}"
LOG="${LOG:-resgen.log}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

run() {  # prints, and runs unless DRY_RUN=1
  echo "+ $(printf '%q ' "$@")"
  [[ "${DRY_RUN:-0}" == 1 ]] || "$@"
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
    --command="$1"
}

command="${1:?usage: $0 create|install|run ARGS...|logs|delete}"
shift
case "$command" in
  create)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  install)
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    staging="$(mktemp -d)"
    trap 'rm -rf "$staging"' EXIT
    archive="$staging/resgen_jax.tar.gz"
    # The code only: no git history, environments, caches or run directories.
    run tar -czf "$archive" -C "$repo" --exclude=.git --exclude='.venv*' \
      --exclude=__pycache__ --exclude=.pytest_cache -- resgen_jax configs launch \
      requirements.txt README.md
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:~/resgen_jax.tar.gz" \
      --zone="$ZONE" $PROJECT_FLAG --worker=all
    dir="$(printf '%q' "$REMOTE_DIR")"
    on_all_workers "mkdir -p $dir && tar -xzf resgen_jax.tar.gz -C $dir && cd $dir && \
      pip install -q -r requirements.txt && pip install -q -U 'jax[tpu]'"
    ;;
  run)
    args="$(printf ' %q' "$@")"
    # RESGEN_DISTRIBUTED=auto: each worker joins the pod's process group (the TPU VM
    # metadata names the workers); stdin from /dev/null so ssh returns at once.
    on_all_workers "cd $(printf '%q' "$REMOTE_DIR") && RESGEN_DISTRIBUTED=auto nohup \
      python3 -m resgen_jax.main$args > ~/$(printf '%q' "$LOG") 2>&1 < /dev/null &"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=0 \
      --command="tail -n 100 -f ~/$(printf '%q' "$LOG")"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --quiet
    ;;
  *)
    echo "unknown command '$command': create | install | run ARGS... | logs | delete" >&2
    exit 2
    ;;
esac
